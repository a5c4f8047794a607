"""Workload schedules and lengths: reproducible per seed, statistically right, within bounds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.workload import (
    Fixed,
    LogNormal,
    Uniform,
    Workload,
    arrival_offsets,
    load_trace,
    make_requests,
    make_seeded_requests,
    parse_length_dist,
    prompt_offsets,
    request_lengths,
)

SOURCE = list(range(1000, 1997))  # 997 distinct "token ids" (prime length)


def _wl(**kw) -> Workload:
    base: dict[str, Any] = {
        "name": "t",
        "n_requests": 200,
        "rate": 2.0,
        "prompt": Uniform(8, 64),
        "output": LogNormal(32, 0.6, 4, 128),
        "seed": 1,
    }
    base.update(kw)
    return Workload(**base)


def test_same_seed_identical_different_seed_different() -> None:
    a, b = make_requests(_wl(), SOURCE), make_requests(_wl(), SOURCE)
    assert a == b
    c = make_requests(_wl(seed=2), SOURCE)
    assert [r.scheduled_s for r in a] != [r.scheduled_s for r in c]
    assert [r.prompt_len for r in a] != [r.prompt_len for r in c]
    assert [r.output_len for r in a] != [r.output_len for r in c]
    assert [r.prompt_ids for r in a] != [r.prompt_ids for r in c]


def test_requests_shape() -> None:
    reqs = make_requests(_wl(), SOURCE)
    assert [r.index for r in reqs] == list(range(200))
    assert reqs[0].scheduled_s == 0.0
    times = [r.scheduled_s for r in reqs]
    assert times == sorted(times)
    for r in reqs:
        assert isinstance(r.prompt_ids, tuple) and all(isinstance(t, int) for t in r.prompt_ids)


def test_poisson_equals_gamma_cv1_and_rate_only_compresses_time() -> None:
    p = arrival_offsets(_wl(arrival="poisson"))
    g = arrival_offsets(_wl(arrival="gamma", cv=1.0))
    np.testing.assert_array_equal(p, g)
    slow, fast = make_requests(_wl(rate=1.0), SOURCE), make_requests(_wl(rate=4.0), SOURCE)
    np.testing.assert_allclose([r.scheduled_s for r in fast], [r.scheduled_s / 4 for r in slow], rtol=1e-12)
    assert [(r.prompt_ids, r.output_len) for r in slow] == [(r.prompt_ids, r.output_len) for r in fast]
    assert _wl().with_rate(4.0) == _wl(rate=4.0)


def test_changing_one_distribution_keeps_the_others() -> None:
    a = make_requests(_wl(), SOURCE)
    b = make_requests(_wl(output=Fixed(7)), SOURCE)
    assert [(r.scheduled_s, r.prompt_ids) for r in a] == [(r.scheduled_s, r.prompt_ids) for r in b]


def test_poisson_mean_interarrival_and_cv() -> None:
    gaps = np.diff(arrival_offsets(_wl(n_requests=40_000, rate=4.0, seed=11)))
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    assert (gaps >= 0).all()


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_cv_and_mean(cv: float) -> None:
    gaps = np.diff(arrival_offsets(_wl(n_requests=60_000, rate=3.0, arrival="gamma", cv=cv, seed=5)))
    assert gaps.mean() == pytest.approx(1 / 3, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_length_distributions_within_bounds() -> None:
    rng = np.random.default_rng(0)
    assert (Fixed(17).sample(rng, 10) == 17).all()
    u = Uniform(32, 64).sample(rng, 20_000)
    assert u.min() == 32 and u.max() == 64  # both ends inclusive
    assert u.mean() == pytest.approx(48, rel=0.02)
    ln = LogNormal(256, 0.5, 16, 1024).sample(rng, 20_000)
    assert ln.min() >= 16 and ln.max() <= 1024
    assert np.median(ln) == pytest.approx(256, rel=0.03)
    clipped = LogNormal(256, 3.0, 100, 300).sample(rng, 5_000)
    assert clipped.min() == 100 and clipped.max() == 300
    prompt, output = request_lengths(_wl(n_requests=2_000))
    assert prompt.min() >= 8 and prompt.max() <= 64
    assert output.min() >= 4 and output.max() <= 128
    for bad in (
        lambda: Fixed(0),
        lambda: Uniform(5, 4),
        lambda: LogNormal(-1, 1),
        lambda: LogNormal(10, 1, 20, 5),
    ):
        with pytest.raises(ValueError):
            bad()


def test_prompts_are_contiguous_wrapping_slices_at_distinct_offsets() -> None:
    wl = _wl(n_requests=997, prompt=Uniform(1, 3000))  # prompts longer than the source wrap around
    reqs = make_requests(wl, SOURCE)
    offs = prompt_offsets(wl, len(SOURCE))
    assert len(set(offs.tolist())) == 997  # every offset distinct
    n = len(SOURCE)
    for r, o in zip(reqs, offs, strict=True):
        assert r.prompt_ids == tuple(SOURCE[(o + j) % n] for j in range(r.prompt_len))
    assert any(r.prompt_len > n for r in reqs)
    # A composite-length source still gets pairwise distinct offsets.
    assert len(set(prompt_offsets(_wl(n_requests=1000), 1000).tolist())) == 1000
    with pytest.raises(ValueError):
        make_requests(_wl(), [])


def test_parse_length_dist() -> None:
    assert parse_length_dist("fixed:128") == Fixed(128)
    assert parse_length_dist("uniform:32,512") == Uniform(32, 512)
    assert parse_length_dist("lognormal:256,0.8") == LogNormal(256.0, 0.8)
    assert parse_length_dist("lognormal:256,0.8,16,1024") == LogNormal(256.0, 0.8, 16, 1024)
    for bad in ("fixed", "normal:3", "uniform:1", "fixed:x", "uniform:9,3"):
        with pytest.raises(ValueError):
            parse_length_dist(bad)


def test_workload_validation_and_to_dict() -> None:
    for kw in ({"rate": 0.0}, {"n_requests": 0}, {"cv": 0.0}, {"arrival": "burst"}, {"arrival": "trace"}):
        with pytest.raises(ValueError):
            _wl(**kw)
    d = _wl().to_dict()
    json.dumps(d)
    assert d["prompt"] == {"kind": "uniform", "lo": 8, "hi": 64}
    assert d["output"]["kind"] == "lognormal" and d["trace"] is None


def test_csv_trace(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text("prompt_len,output_len,arrival_s\n10,3,0.0\n20,4,0.5\n30,5,0.5\n")
    trace = load_trace(path)
    assert len(trace) == 3 and trace.arrival_s == (0.0, 0.5, 0.5)
    # Lengths replay in order and wrap; arrivals stay Poisson.
    reqs = make_requests(Workload("tr", 5, 1.0, trace=trace), SOURCE)
    assert [(r.prompt_len, r.output_len) for r in reqs] == [(10, 3), (20, 4), (30, 5), (10, 3), (20, 4)]
    # Arrivals replayed verbatim.
    replay = make_requests(Workload("tr", 3, 1.0, arrival="trace", trace=trace), SOURCE)
    assert [r.scheduled_s for r in replay] == [0.0, 0.5, 0.5]
    with pytest.raises(ValueError):
        Workload("tr", 4, 1.0, arrival="trace", trace=trace)  # cannot invent arrivals past the trace

    no_arrival = tmp_path / "lens.csv"
    no_arrival.write_text("prompt_len,output_len\n7,2\n")
    assert load_trace(no_arrival).arrival_s is None
    with pytest.raises(ValueError):
        Workload("tr", 1, 1.0, arrival="trace", trace=load_trace(no_arrival))
    for body in (
        "prompt,output\n1,2\n",
        "prompt_len,output_len\n0,2\n",
        "prompt_len,output_len\n",
        "prompt_len,output_len,arrival_s\n1,1,2.0\n1,1,1.0\n",
    ):
        bad = tmp_path / "bad.csv"
        bad.write_text(body)
        with pytest.raises(ValueError):
            load_trace(bad)


def test_seeded_requests_run_the_seeds_one_after_another() -> None:
    wl = _wl(n_requests=5, rate=4.0)
    reqs, seed_of = make_seeded_requests(wl, SOURCE, [1, 2, 3])
    assert seed_of == [1] * 5 + [2] * 5 + [3] * 5
    assert [r.index for r in reqs] == list(range(15))
    times = [r.scheduled_s for r in reqs]
    assert times == sorted(times)
    for i, seed in enumerate((1, 2, 3)):
        alone = make_requests(Workload(**{**wl.__dict__, "seed": seed}), SOURCE)
        part = reqs[5 * i : 5 * i + 5]
        assert [r.prompt_ids for r in part] == [r.prompt_ids for r in alone]
        assert [r.output_len for r in part] == [r.output_len for r in alone]
        # the same gaps within a seed; one mean gap (0.25 s) between the seeds
        assert np.diff([r.scheduled_s for r in part]) == pytest.approx(
            np.diff([r.scheduled_s for r in alone])
        )
        if i:
            assert part[0].scheduled_s - reqs[5 * i - 1].scheduled_s == pytest.approx(0.25)
    with pytest.raises(ValueError):
        make_seeded_requests(wl, SOURCE, [])
