"""Rate control's decision (`choose_rate`, pure) and its file; the shipped model's calibrated table puts both
prompt lengths at >= 6x fp16 inside the floor."""

from __future__ import annotations

from pathlib import Path

import pytest

from kv_transfer.codec.rate import RATE_FILE, RateChoice, RatePoint, RateTable, choose_rate, load_model_rate
from kv_transfer.errors import CodecError

SHIPPED = Path(__file__).resolve().parents[3] / "models" / "pdserve-tiny-py"


def pt(
    tokens: int, scale: float, bits: float, kl: float, top1: float = 1.0, recent: float = 8.0
) -> RatePoint:
    return RatePoint("l0", tokens, scale, recent, bits, kl, top1)


POINTS = (
    pt(256, 1.0, 3.2, 1e-6),
    pt(256, 2.0, 2.6, 4e-6),
    pt(256, 3.0, 2.2, 9e-6),
    pt(256, 2.5, 2.4, 5e-6, top1=0.98),  # cheaper than 2.0 but loses top-1
    pt(1024, 1.0, 2.6, 7e-6),
    pt(1024, 2.0, 2.0, 3e-5),
)


def test_fewest_bits_inside_the_floor_and_the_guard() -> None:
    assert choose_rate(256, 0.01, POINTS) == RateChoice(3.0, 8.0)  # the floor alone admits every point
    assert choose_rate(256, 0.01, POINTS, kl_guard=7e-6) == RateChoice(2.0, 8.0)  # not the top-1 loser
    assert choose_rate(256, 2e-6, POINTS) == RateChoice(1.0, 8.0)
    assert choose_rate(1024, 0.01, POINTS, kl_guard=7e-6) == RateChoice(1.0, 8.0)
    assert choose_rate(1024, 0.01, POINTS) == RateChoice(2.0, 8.0)


def test_nothing_admissible_spends_the_most_bits_and_no_points_keep_the_plan() -> None:
    assert choose_rate(256, 0.0, POINTS) == RateChoice(1.0, 8.0)  # least KL at that length
    assert choose_rate(256, 0.01, ()) is None


def test_nearest_calibrated_length_in_log_tokens_and_no_extrapolation_below() -> None:
    guard = 7e-6
    assert choose_rate(255, 0.01, POINTS, guard) is None  # shorter than any calibrated prompt: the plan
    assert choose_rate(1, 0.01, POINTS, guard) is None
    assert choose_rate(511, 0.01, POINTS, guard) == RateChoice(2.0, 8.0)  # nearer 256 than 1024 in log
    assert choose_rate(513, 0.01, POINTS, guard) == RateChoice(1.0, 8.0)
    assert choose_rate(5000, 0.01, POINTS, guard) == RateChoice(1.0, 8.0)


def test_rate_file_round_trip_and_bad_files(tmp_path: Path) -> None:
    table = RateTable(POINTS, {"l0": 7e-6})
    table.save(tmp_path)
    assert load_model_rate(tmp_path) == table
    (tmp_path / RATE_FILE).write_text('{"format": "other"}')
    with pytest.raises(CodecError):
        load_model_rate(tmp_path)
    (tmp_path / RATE_FILE).write_text("not json")
    with pytest.raises(CodecError):
        load_model_rate(tmp_path)
    assert load_model_rate(tmp_path / "nowhere") is None


@pytest.mark.skipif(not (SHIPPED / RATE_FILE).exists(), reason="the shipped model has no rate table")
def test_shipped_table_spends_the_floor_and_reaches_6x_where_served() -> None:
    """Every mode and length: the chosen point is within the floor, the guard and top-1, and no larger than the
    plan as is; cachegen_l0 (what a decoder holding the model pulls) is >= 6x fp16 at 256 and 1024 tokens."""
    table = load_model_rate(SHIPPED)
    assert table is not None
    for mode in ("plain", "l0"):
        points = table.for_mode(mode)
        assert choose_rate(128, 0.01, points, table.kl_guard[mode]) is None  # greedy prompts keep the plan
        for tokens in (256, 1024):
            choice = choose_rate(tokens, 0.01, points, table.kl_guard[mode])
            assert choice is not None
            (p,) = [
                p for p in points if (p.tokens, p.scale, p.recent) == (tokens, choice.scale, choice.recent)
            ]
            (plan,) = [q for q in points if q.tokens == tokens and q.scale == 1.0]
            assert p.kl <= min(0.01, table.kl_guard[mode]) and p.top1 >= 0.99 and p.bits <= plan.bits, p
            if mode == "l0" and tokens >= 256:
                assert 16 / p.bits >= 6.0, p
