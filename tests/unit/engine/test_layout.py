"""The rank layout and the reshard rule: every (layer, KV head) a destination needs comes exactly once, from its
canonical owner, for every pair of layouts."""

from __future__ import annotations

import itertools

import pytest

from engine.parallel.layout import Layout, LayoutError, pieces


def test_layer_ranges_are_contiguous_and_balanced() -> None:
    lay = Layout(pp=4)
    assert [lay.layer_range(10, s) for s in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_kv_heads_split_or_replicate() -> None:
    assert [Layout(tp=2).kv_head_range(4, r) for r in range(2)] == [(0, 2), (2, 4)]
    # 1 KV head on tp=2: replicated on both ranks.
    assert [Layout(tp=2).kv_head_range(1, r) for r in range(2)] == [(0, 1), (0, 1)]
    # 2 KV heads on tp=4: each on two adjacent ranks.
    assert [Layout(tp=4).kv_head_range(2, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert Layout(tp=4).canonical_tp_rank(2, 1) == 2


def test_rank_numbering_round_trips() -> None:
    lay = Layout(tp=2, pp=3)
    assert [lay.coords(r) for r in range(6)] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert all(lay.rank(*lay.coords(r)) == r for r in range(6))


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_reshard_covers_every_cell_once(num_kv_heads: int) -> None:
    num_layers = 6
    layouts = [Layout(tp, pp) for tp, pp in itertools.product((1, 2, 4), (1, 2, 3))]
    for src, dst in itertools.product(layouts, layouts):
        for rank in range(dst.world_size):
            layers, heads = dst.owned(rank, num_layers, num_kv_heads)
            got: list[tuple[int, int]] = []
            for p in pieces(src, layers, heads, num_layers, num_kv_heads):
                s_layers, s_heads = src.owned(p.src_rank, num_layers, num_kv_heads)
                assert s_layers[0] <= p.layers[0] < p.layers[1] <= s_layers[1]
                assert s_heads[0] <= p.heads[0] < p.heads[1] <= s_heads[1]
                got += itertools.product(range(*p.layers), range(*p.heads))
            assert sorted(got) == list(itertools.product(range(*layers), range(*heads))), (src, dst, rank)


def test_tp2_to_tp1_pulls_from_both_ranks() -> None:
    assert pieces(Layout(tp=2), (0, 4), (0, 4), 4, 4) == [
        pieces(Layout(tp=2), (0, 4), (0, 2), 4, 4)[0],
        pieces(Layout(tp=2), (0, 4), (2, 4), 4, 4)[0],
    ]
    assert [p.src_rank for p in pieces(Layout(tp=2), (0, 4), (0, 4), 4, 4)] == [0, 1]


def test_bad_layouts_are_typed_errors() -> None:
    with pytest.raises(LayoutError):
        Layout(tp=0)
    with pytest.raises(LayoutError, match="attention heads"):
        Layout(tp=3).check(num_layers=4, num_heads=8, num_kv_heads=2)
    with pytest.raises(LayoutError, match="KV heads"):
        Layout(tp=4).check(num_layers=4, num_heads=8, num_kv_heads=6)
    with pytest.raises(LayoutError, match="layers"):
        Layout(pp=5).check(num_layers=4, num_heads=8, num_kv_heads=2)
    with pytest.raises(LayoutError):
        pieces(Layout(), (0, 5), (0, 1), 4, 1)
