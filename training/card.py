"""Model card (README.md) and loss-curve PNG of a trained model, from its training_log.json.

    .venv/bin/python -m training.card models/pdserve-tiny-py

The card's "Held-out perplexity" row is machine-read by tests/unit/training (``read_card_perplexity``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LOSS_PNG = "loss_curve.png"
PPL_ROW = "| Held-out perplexity |"


def read_card_perplexity(model_dir: str | Path) -> float:
    """The held-out perplexity recorded in a model card's results table."""
    for line in (Path(model_dir) / "README.md").read_text().splitlines():
        if line.startswith(PPL_ROW):
            return float(line[len(PPL_ROW) :].strip().strip("|").strip().split()[0])
    raise ValueError(f"no '{PPL_ROW}' row in the model card")


def plot_loss(log: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no loss-curve PNG", file=sys.stderr)
        return False
    tr = log["loss_log"]
    ev = log["heldout_log"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["tokens"] / 1e6 for r in tr], [r["loss"] for r in tr], lw=1, label="train (10-step mean)")
    if ev:
        n_eval = log["args"]["eval_tokens"]
        ax.plot(
            [r["tokens"] / 1e6 for r in ev],
            [r["heldout_loss"] for r in ev],
            "o-",
            ms=3,
            label=f"held-out (first {n_eval} tokens)",
        )
    ax.axhline(log["eval"]["unigram_loss"], color="gray", ls="--", lw=1, label="unigram baseline (held-out)")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{log['model_name']}: {log['training']['steps']} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def render_card(log: dict, has_png: bool) -> str:
    cfg = log["model"]["config"]
    tr, ev, m, d, a = log["training"], log["eval"], log["machine"], log["data"], log["args"]
    name = log["model_name"]
    held_files = ", ".join(f"`{f}`" for f in d["heldout_files"])
    long_phase = (
        f" The last {a['long_frac']:.0%} of the steps ran at {a['long_seq_len']} tokens "
        f"x {max(1, a['batch_size'] * a['seq_len'] // a['long_seq_len'])} sequences."
        if a["long_frac"] > 0
        else ""
    )
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "license: psf-2.0",
        "language: [code]",
        "tags: [llama, python, pdserve, tiny]",
        "---",
        "",
        f"# {name}",
        "",
        "A small Llama-architecture causal language model of Python source code, trained from scratch by",
        "pdserve (`training/`) so that the serving stack has a real model to run without downloading weights.",
        "It writes plausible-looking Python; it is not meant to be useful for anything else.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        "| Architecture | `LlamaForCausalLM` (RMSNorm, SwiGLU, RoPE, grouped-query attention) |",
        f"| Layers / hidden / MLP | {cfg['num_hidden_layers']} / {cfg['hidden_size']} / {cfg['intermediate_size']} |",
        f"| Attention heads | {cfg['num_attention_heads']} query, {cfg['num_key_value_heads']} key/value, "
        f"head dim {cfg['head_dim']} |",
        f"| Vocabulary | {cfg['vocab_size']} (byte-level BPE), embeddings tied to the LM head |",
        f"| Context | {cfg['max_position_embeddings']} positions (RoPE theta "
        f"{cfg['rope_parameters']['rope_theta']:g}); trained on {a['seq_len']} and {a['long_seq_len']} |",
        f"| Parameters | {log['model']['parameters']:,} |",
        f"| Weights | float32 safetensors ({_mb(log['model']['parameters'] * 4)}) |",
        "| Special token | `<\\|endoftext\\|>` = id 0 = BOS = EOS, placed before every document |",
        "",
        "## Data",
        "",
        f"The Python {d['python']} standard library's own `.py` sources, code and docstrings alike: every file",
        "under `sysconfig.get_paths()['stdlib']` except test suites (`test/`, `tests/`, `idle_test/`),",
        "`site-packages`, `_sysconfigdata*` and the generated `encodings` character-map tables",
        f"(`training/data.py`). {d['files_total']} files, split by file with a fixed rule (SHA-256 of the relative",
        f"path): {d['train_files']} files / {d['train_chars']:,} characters / {d['train_tokens']:,} tokens for",
        f"training, {len(d['heldout_files'])} files / {d['heldout_chars']:,} characters / {d['heldout_tokens']:,}",
        "tokens held out. The held-out split is committed here as `heldout.txt` (documents joined with",
        "`<|endoftext|>`), so the evaluation below reproduces on any machine, whatever its Python version.",
        f"Held-out files: {held_files}.",
        "",
        "## Tokenizer",
        "",
        f"Byte-level BPE trained with Hugging Face `tokenizers` on the training split: vocabulary {cfg['vocab_size']},",
        "GPT-2 byte-to-unicode alphabet (every byte sequence round-trips, no unknown token), ByteLevel",
        "pre-tokenizer without prefix space, min pair frequency 2, one special token `<|endoftext|>`.",
        "`tokenizer.json` (+ `tokenizer_config.json` for `AutoTokenizer`).",
        "",
        "## Chat template",
        "",
        "`tokenizer_config.json` carries a plain-text chat template (`chat_template`, Hugging Face convention), used by",
        "pdserve's `/v1/chat/completions` and by transformers' `apply_chat_template`: each message as",
        "`<|role|>` on its own line followed by its content and a newline (roles `system`, `user`, `assistant`; any other",
        "is refused), then `<|assistant|>` and a newline for the reply. The markers are ordinary text (the model was",
        "trained on code only, with no chat data), so a chat is just a document the model continues; pdserve tokenizes",
        'the rendered text like any prompt (BOS first). `[{"role": "user", "content": "def add(a, b):"}]` renders as',
        "`<|user|>\\ndef add(a, b):\\n<|assistant|>\\n`.",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| Command | `{log['command']}` |",
        f"| Steps | {tr['steps']} ({tr['stop_reason']}) |",
        f"| Tokens seen | {tr['tokens_seen']:,} ({tr['epochs']:.2f} epochs of the training split) |",
        f"| Batch | {a['batch_size']} x {a['seq_len']} tokens, shuffled non-overlapping windows.{long_phase} |",
        f"| Optimizer | AdamW (0.9, 0.95), weight decay {a['weight_decay']}, peak LR {a['lr']:g}, "
        f"{a['warmup']} warmup steps, cosine to {a['min_lr_frac']:g}x, grad clip {a['grad_clip']:g}; fp32 |",
        f"| Seed | {a['seed']} |",
        f"| Training time | {tr['train_seconds'] / 60:.1f} min training loop, {tr['total_seconds'] / 60:.1f} min "
        "end to end (data, tokenizer, training, evaluation) |",
        f"| Machine | {m['cpu']}, {m['torch_threads']} torch threads ({m['cpu_count']} CPUs visible), "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"tokenizers {m['tokenizers']} |",
        f"| Final training loss | {tr['final_train_loss']:.4f} |",
        "",
    ]
    if has_png:
        lines += [f"![loss curve]({LOSS_PNG})", ""]
    lines += [
        "## Results (held-out split)",
        "",
        f"Perplexity over non-overlapping {ev['ctx']}-token windows of the whole held-out token stream",
        "(`training.eval.heldout_perplexity`: every token but the first predicted once, each window from an",
        "empty context). The unigram baseline is fitted on the training split's token counts with add-one",
        "smoothing (`unigram_counts.json`) and scored on the same targets.",
        "",
        "| | |",
        "|---|---|",
        f"| Tokens scored | {ev['heldout_tokens_scored']:,} |",
        f"| Held-out loss | {ev['heldout_loss']:.4f} nats/token |",
        f"{PPL_ROW} {ev['heldout_ppl']:.3f} |",
        f"| Unigram perplexity | {ev['unigram_ppl']:.1f} |",
        f"| Ratio model / unigram | {ev['ratio']:.4f} |",
        "",
        "## Sample",
        "",
        f"Greedy continuation of `{log['sample']['prompt']}` (BOS first, 64 new tokens, repetition penalty",
        f"{log['sample'].get('repetition_penalty', 1.0)} as in `generation_config.json`), as generated. A model",
        "this small writes Python-shaped text, not correct programs; under plain greedy decoding it loops.",
        '`pdserve generate --local "def fibonacci(n):"` prints the same continuation.',
        "",
        "```text",
        log["sample"]["greedy_64_tokens"].rstrip(),
        "```",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tok = AutoTokenizer.from_pretrained("models/{name}")',
        f'model = AutoModelForCausalLM.from_pretrained("models/{name}")',
        'ids = tok("def fibonacci(n):", return_tensors="pt").input_ids',
        "out = model.generate(ids, max_new_tokens=64, do_sample=False)",
        "print(tok.decode(out[0], skip_special_tokens=True))",
        "```",
        "",
        "Encoding with special tokens (the default of `tokenizers` and transformers) prepends `<|endoftext|>`",
        "as a BOS, which the model expects: every training document starts after one, so the prompt reads as",
        "the start of a file. Generation stops at `<|endoftext|>` (id 0).",
        "",
        "## Files",
        "",
        "`config.json`, `generation_config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,",
        "`heldout.txt` (the held-out split), `unigram_counts.json` (baseline), `training_log.json` (the full",
        f"training log this card is generated from), `{LOSS_PNG}`. The KV codecs' calibration, written beside",
        "them by `pdserve calibrate MODEL_DIR`: `cachegen_tables.safetensors` and `cachegen_plan.json` (CacheGen's",
        "bit plans and static tables), `cachegen_transform.safetensors` (its transform and per-level steps),",
        "`codec_profiles.json` (the codec profiles the gateway's `--codec auto` reads).",
        "",
        "## Reproduce",
        "",
        "```sh",
        f".venv/bin/{log['command']}",
        ".venv/bin/pdserve calibrate MODEL_DIR   # the KV codecs' files (the --out directory)",
        "```",
        "",
        "Same seed and `--steps` give the same tokenizer, data order and schedule; bit-identical weights",
        "additionally need the same stdlib (Python version) and CPU kernels (torch version, thread count).",
        *(
            [
                "",
                f"Note: this run's schedule was paced by the wall-time budget for {tr['time_paced_steps']} of its "
                f"{tr['steps']} steps",
                "(the machine was shared and slower than planned), so a rerun reproduces the procedure and the",
                "data, not these exact weights. On 2 idle cores the step count paces the run and it reproduces.",
            ]
            if tr.get("schedule") == "time"
            else []
        ),
        "",
    ]
    return "\n".join(lines)


def write_card(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir)
    log = json.loads((model_dir / "training_log.json").read_text())
    has_png = plot_loss(log, model_dir / LOSS_PNG)
    path = model_dir / "README.md"
    path.write_text(render_card(log, has_png))
    return path


if __name__ == "__main__":
    print(write_card(sys.argv[1] if len(sys.argv) > 1 else "models/pdserve-tiny-py"))
