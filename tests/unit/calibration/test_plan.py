"""CacheGen bit plans: the Lagrangian choice respects the budget and spends bits where KL is bought
cheapest; a planned model's tables carry the plan and the chunk size through save/load, and codecs use them."""

from __future__ import annotations

import shutil

import pytest
import torch

from calibration.plan import BUDGETS, PartCost, choose, plan_model, predicted
from kv_transfer.codec import CodecContext
from kv_transfer.codec.cachegen import CacheGenCodec
from kv_transfer.codec.cachegen_tables import TABLES_FILE, CacheGenTables, load_model_tables
from kv_transfer.codec.cachegen_v1 import parse_params
from kv_transfer.errors import CodecError


def synthetic_costs(sensitive: tuple[int, str]) -> dict[tuple[int, str, int], PartCost]:
    """Two layers; bits grow by ~1 per doubling of bins, KL falls 4x per doubling; `sensitive` has 100x KL."""
    costs = {}
    for layer in range(2):
        for kind in ("k", "v"):
            for i, bins in enumerate((4, 8, 16, 32)):
                scale = 100.0 if (layer, kind) == sensitive else 1.0
                costs[(layer, kind, bins)] = PartCost(bits=1.0 + i, kl=scale * 0.1 / 4**i)
    return costs


@pytest.mark.parametrize("budget", [1.0, 1.5, 2.0, 3.0, 4.0])
def test_choice_respects_the_budget_and_favours_the_sensitive_part(budget: float) -> None:
    costs = synthetic_costs((1, "k"))
    plan = choose(costs, 2, budget)
    assert predicted(costs, plan)["bits_per_element"] <= budget + 1e-9
    kb = {(layer, kind): b for layer, bins in enumerate(plan) for kind, b in zip("kv", bins, strict=True)}
    assert kb[(1, "k")] == max(kb.values())  # the part whose KL is 100x gets the most bins
    # no plan within the budget has a smaller summed KL (exhaustive over the 4^4 plans)
    best = min(
        predicted(costs, p)["kl_sum_of_parts"]
        for p in (
            ((a, b), (c, d))
            for a in (4, 8, 16, 32)
            for b in (4, 8, 16, 32)
            for c in (4, 8, 16, 32)
            for d in (4, 8, 16, 32)
        )
        if predicted(costs, p)["bits_per_element"] <= budget + 1e-9
    )
    assert predicted(costs, plan)["kl_sum_of_parts"] <= best * 1.5


def test_plan_a_model_end_to_end(tiny_model_dir, tmp_path) -> None:
    torch.manual_seed(0)
    tables, report = plan_model(
        str(tiny_model_dir), chunks=(32, 64), candidates=(4, 8, 16), prompt=96, continuation=16, windows=2
    )
    assert set(tables.plans) == set(BUDGETS) and tables.chunk_tokens in (32, 64)
    bits = {lv: report["plans"][lv]["bits_per_element"] for lv in BUDGETS}
    assert bits["low"] <= bits["default"] <= bits["high"]
    assert report["plans"]["low"]["kl_measured_together"] >= report["plans"]["high"]["kl_measured_together"]
    tables.save(tmp_path / TABLES_FILE)
    loaded = load_model_tables(tmp_path)
    assert loaded is not None and loaded.plans == tables.plans and loaded.chunk_tokens == tables.chunk_tokens
    # a codec whose context holds the tables (and no transform) uses the plan's bins, its chunk size and
    # static tables; so does the context made from the model directory
    k, v = torch.randn(150, 2, 32), torch.randn(150, 2, 32)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tables.save(model / TABLES_FILE)
    for ctx in (CodecContext(tables=loaded), CodecContext.from_model_dir(model)):
        codec = CacheGenCodec(ctx, "default")
        for layer in range(2):
            p = parse_params(codec.encode(k, v, layer)[0], tuple(k.shape))
            assert (p.k_bins, p.v_bins) == loaded.plans["default"][layer]
            assert p.chunks[0].tokens <= loaded.chunk_tokens and p.table_id == loaded.table_id


def test_bad_plans_are_codec_errors() -> None:
    with pytest.raises(CodecError):
        CacheGenTables({}, 2, plans={"default": ((8, 8),)})  # one layer of two
    with pytest.raises(CodecError):
        CacheGenTables({}, 1, plans={"default": ((7, 8),)})  # odd bins
    with pytest.raises(CodecError):
        CacheGenTables({}, 1, plans={"ultra": ((8, 8),)})  # no such level
