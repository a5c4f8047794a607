"""training.data / training.tokenizer on small synthetic inputs (no model needed)."""

from __future__ import annotations

from training import EOT
from training.data import Doc, collect_stdlib, join_docs, split_docs
from training.tokenizer import encode, train_tokenizer


def test_split_is_deterministic_disjoint_and_bounded():
    docs = [Doc(f"pkg/mod{i}.py", f"def f{i}(x):\n    return x + {i}\n" * (i % 7 + 1)) for i in range(300)]
    train, held = split_docs(docs, heldout_chars=2000, max_file_chars=200)
    assert split_docs(list(reversed(docs)), heldout_chars=2000, max_file_chars=200) == (train, held)
    assert {d.relpath for d in train}.isdisjoint({d.relpath for d in held})
    assert len(train) + len(held) == len(docs)
    assert 1800 <= sum(len(d.text) for d in held) <= 2200
    assert all(len(d.text) <= 200 for d in held)
    assert [d.relpath for d in held] == sorted(d.relpath for d in held)


def test_collect_skips_tests_and_charmaps(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\r\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text("assert 1\n")
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / "pkg" / "tests" / "t.py").write_text("assert 1\n")
    (tmp_path / "pkg" / "b.py").write_text("y = 2\n")
    (tmp_path / "cp0.py").write_text('""" Python Character Mapping Codec cp0 generated from X"""\n')
    (tmp_path / "_sysconfigdata_x.py").write_text("build_time_vars = {}\n")
    (tmp_path / "bad.py").write_bytes(b"\xff\xfe = 1\n")
    (tmp_path / "notes.txt").write_text("not python\n")
    docs = collect_stdlib(tmp_path)
    assert [(d.relpath, d.text) for d in docs] == [("a.py", "x = 1\n"), ("pkg/b.py", "y = 2\n")]


def test_tokenizer_round_trips_and_splits_documents():
    texts = ["def add(a, b):\n    return a + b\n", "class Foo:\n    pass\n", "# héllo wörld ✓\n"] * 20
    tok = train_tokenizer(texts, vocab_size=300)
    joined = join_docs([Doc(str(i), t) for i, t in enumerate(texts[:3])])
    ids = encode(tok, joined)
    assert tok.decode(ids, skip_special_tokens=False) == joined
    assert ids.count(0) == 3 and ids[0] == 0 and tok.id_to_token(0) == EOT
    # every byte is representable: arbitrary text round-trips without an unknown token
    odd = "\x00\x7f 🐍 \t\t"
    assert tok.decode(encode(tok, odd)) == odd
