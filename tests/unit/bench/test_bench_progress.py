"""The stderr progress bar draws only on a TTY and never when quiet."""

from __future__ import annotations

import io

from bench.progress import Progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_silent_when_not_a_tty() -> None:
    s = io.StringIO()
    with Progress(10, "x", stream=s) as bar:
        for _ in range(10):
            bar.update()
    assert s.getvalue() == ""
    assert bar.done == 10


def test_silent_when_quiet() -> None:
    s = _Tty()
    with Progress(3, stream=s, quiet=True) as bar:
        bar.update(3)
    assert s.getvalue() == ""


def test_draws_on_tty() -> None:
    s = _Tty()
    with Progress(4, "rate 2.0", stream=s, width=8, min_interval=0.0) as bar:
        bar.update()
        assert bar.render().startswith("rate 2.0 [##......] 1/4")
        bar.update(10)  # clamped to total
    text = s.getvalue()
    assert "\r" in text and text.endswith("\n")
    assert "[########] 4/4" in text
    bar.close()  # idempotent
    assert s.getvalue() == text


def test_zero_total() -> None:
    s = _Tty()
    with Progress(0, stream=s, width=4) as bar:
        assert bar.render().startswith("[####] 0/0")
