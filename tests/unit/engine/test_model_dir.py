"""Where the model comes from: a named directory is checked (a clear error naming the path), no name is the
shipped model (the checkout's, else the installed package's copy), and the wheel carries exactly the files
a service reads."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from engine import model_dir
from engine.model_dir import ModelNotFoundError, check_model_dir, resolve_model_dir, shipped_model_dir

REPO = Path(__file__).resolve().parents[3]


def test_a_named_directory_that_does_not_exist_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match=f"'{missing}' does not exist"):
        resolve_model_dir(str(missing))
    missing.mkdir()
    (missing / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="has no tokenizer.json"):
        check_model_dir(missing)


def test_no_name_is_the_shipped_model_of_the_checkout() -> None:
    assert resolve_model_dir(None) == resolve_model_dir("") == shipped_model_dir()
    assert Path(shipped_model_dir()) == REPO / "models" / "pdserve-tiny-py"


def test_outside_a_checkout_the_installed_copy_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    packaged = tmp_path / "site-packages" / "pdserve" / "models" / "pdserve-tiny-py"
    packaged.mkdir(parents=True)
    for name in model_dir.REQUIRED_FILES:
        shutil.copyfile(REPO / "models" / "pdserve-tiny-py" / name, packaged / name)
    monkeypatch.setattr(model_dir, "CHECKOUT_MODEL_DIR", tmp_path / "not-a-checkout")
    monkeypatch.setattr(model_dir, "packaged_model_dir", lambda: packaged)
    assert shipped_model_dir() == str(packaged)


def test_the_wheel_carries_the_runtime_files_named_here() -> None:
    """setup.py (which cannot import the package it builds) keeps its own copy of the list: the same one."""
    tree = ast.parse((REPO / "setup.py").read_text())
    lists = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(getattr(t, "id", "") == "SHIPPED_RUNTIME_FILES" for t in node.targets)
    ]
    assert lists == [model_dir.SHIPPED_RUNTIME_FILES]
    shipped = REPO / "models" / "pdserve-tiny-py"
    assert all((shipped / f).is_file() for f in model_dir.SHIPPED_RUNTIME_FILES)
    # training artefacts stay out of the wheel
    assert not {"training_log.json", "loss_curve.png", "heldout.txt"} & set(model_dir.SHIPPED_RUNTIME_FILES)
