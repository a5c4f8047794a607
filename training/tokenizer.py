"""Byte-level BPE tokenizer trained with the ``tokenizers`` library.

GPT-2-style byte-level BPE: the ByteLevel pre-tokenizer (no prefix space) maps every byte to a printable
symbol, so any text round-trips exactly and there is no unknown token; the ByteLevel decoder undoes it. The
only special token is ``<|endoftext|>`` (id 0), used as both BOS and EOS and placed before every document;
the post-processor prepends it when encoding with special tokens (prompts), ``encode`` here does not (corpus).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from training import EOT


def train_tokenizer(texts: Iterable[str], vocab_size: int = 6144, min_frequency: int = 2) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(EOT) == 0
    add_bos(tok)
    return tok


def add_bos(tok: Tokenizer) -> None:
    """Encoding with special tokens (the default of ``Tokenizer.encode`` and of transformers) prepends
    ``<|endoftext|>``, as every training document starts after one: a prompt is read as the start of a file."""
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B:1", special_tokens=[(EOT, 0)]
    )


# The shipped model's chat template (tokenizer_config.json "chat_template", Hugging Face convention): each
# message as "<|role|>\ncontent\n" in plain text, then "<|assistant|>\n" for the reply. The model was trained on
# code only, so a chat is just text it continues; the markers are ordinary tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "{{ raise_exception('role must be system, user or assistant, got ' ~ message['role']) }}\n"
    "{% endif %}\n"
    "<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "<|assistant|>\n"
    "{% endif %}\n"
)


def save_hf_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    """Write tokenizer.json (+ tokenizer_config.json so ``AutoTokenizer`` loads it as a fast tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=None,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(str(out_dir))
    # transformers 5 writes its own class name ("TokenizersBackend"); the 4.x name loads in both.
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as stored in the corpus: no BOS added; ``<|endoftext|>`` in the text becomes
    the special token (id 0). (``tok.encode(prompt).ids`` is the prompt form, with the BOS.)"""
    return tok.encode(text, add_special_tokens=False).ids
