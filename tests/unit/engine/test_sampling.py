from __future__ import annotations

import pytest
import torch

from engine.params import SamplingParams
from engine.sampling import filter_top_k_top_p, sample
from pdserve.errors import InvalidRequest


def _logits(n: int, v: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = _logits(5)
    assert sample(logits, [SamplingParams()] * 5, [0] * 5) == logits.argmax(-1).tolist()


def test_top_k_1_equals_greedy_even_when_hot():
    logits = _logits(8, seed=1)
    params = [SamplingParams(temperature=5.0, top_k=1, seed=i) for i in range(8)]
    assert sample(logits, params, list(range(8))) == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_varies_with_step_and_seed():
    row = _logits(1, seed=2)
    p = SamplingParams(temperature=1.0, seed=1234)
    draws = [sample(row, [p], [step])[0] for step in range(40)]
    assert draws == [sample(row, [p], [step])[0] for step in range(40)]
    assert len(set(draws)) > 3, "different steps must draw independently"
    other = [sample(row, [SamplingParams(temperature=1.0, seed=99)], [step])[0] for step in range(40)]
    assert other != draws


def test_seeded_sampling_is_independent_of_batch_composition():
    logits = _logits(6, seed=3)
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=7 + i) for i in range(6)]
    steps = [3, 0, 5, 1, 9, 2]
    together = sample(logits, params, steps)
    alone = [sample(logits[i : i + 1], [params[i]], [steps[i]])[0] for i in range(6)]
    order = [5, 2, 0, 4, 1, 3]
    shuffled = sample(logits[order], [params[i] for i in order], [steps[i] for i in order])
    assert together == alone
    assert [together[i] for i in order] == shuffled


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    p = SamplingParams(temperature=1.0, seed=5)
    counts = torch.bincount(torch.tensor([sample(logits, [p], [s])[0] for s in range(2000)]), minlength=3)
    freqs = counts.float() / 2000
    torch.testing.assert_close(freqs, torch.tensor([0.7, 0.2, 0.1]), atol=0.04, rtol=0)


def test_top_p_and_top_k_filtering():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = filter_top_k_top_p(logits, top_k=0, top_p=0.8).isfinite().tolist()
    assert kept == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    kept = filter_top_k_top_p(logits, top_k=0, top_p=0.81).isfinite().tolist()
    assert kept == [True, True, True, False]
    assert filter_top_k_top_p(logits, top_k=0, top_p=0.01).isfinite().tolist() == [True, False, False, False]
    assert filter_top_k_top_p(logits, top_k=3, top_p=1.0).isfinite().tolist() == [True, True, True, False]
    p = SamplingParams(temperature=1.0, top_p=0.5, seed=0)
    assert {sample(logits[None], [p], [s])[0] for s in range(50)} == {0}


@pytest.mark.parametrize(
    ("params", "prompt_len", "message"),
    [
        (SamplingParams(), 0, "prompt is empty"),
        (SamplingParams(max_tokens=0), 5, "max_tokens"),
        (SamplingParams(max_tokens=-3), 5, "max_tokens"),
        (SamplingParams(max_tokens=60), 41, "exceeds the model's maximum length 100"),
        (SamplingParams(temperature=-0.1), 5, "temperature"),
        (SamplingParams(temperature=float("nan")), 5, "temperature"),
        (SamplingParams(top_p=0.0), 5, "top_p"),
        (SamplingParams(top_p=1.5), 5, "top_p"),
        (SamplingParams(top_k=-1), 5, "top_k"),
        (SamplingParams(stop=("",)), 5, "stop"),
    ],
)
def test_validate_rejects_bad_requests(params: SamplingParams, prompt_len: int, message: str):
    with pytest.raises(InvalidRequest, match=message):
        params.validate(prompt_len, max_model_len=100)


def test_validate_accepts_edge_values():
    SamplingParams(max_tokens=60, top_p=1.0, top_k=0, temperature=0.0).validate(40, max_model_len=100)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -1.0, 1.5, 0.5]])
    p = SamplingParams(repetition_penalty=2.0)
    # token 0 seen (2.0 -> 1.0 < 1.5): the unseen token 2 wins; token 1 (negative) is pushed further down
    assert sample(logits, [p], [0], [[0, 1, 1]]) == [2]
    assert sample(logits, [SamplingParams()], [0], [[0, 1]]) == [0]  # 1.0 = off
    assert sample(logits, [p], [0], None) == [0]  # no history: nothing to penalise
    from engine.sampling import apply_repetition_penalty

    out = apply_repetition_penalty(logits, [p], [[0, 1]])
    assert out.tolist() == [[1.0, -2.0, 1.5, 0.5]] and logits[0, 0] == 2.0  # a copy


@pytest.mark.parametrize("rp", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_repetition_penalty_is_invalid_request(rp: float):
    with pytest.raises(InvalidRequest, match="repetition_penalty"):
        SamplingParams(repetition_penalty=rp).validate(4, 64)


def test_runner_builds_histories_only_for_a_repetition_penalty():
    from engine.runner import histories
    from engine.sequence import Sequence

    plain = Sequence("a", [1, 2], SamplingParams())
    plain.output_ids.append(3)
    penalised = Sequence("b", [4], SamplingParams(repetition_penalty=1.5))
    assert histories([plain, plain]) is None  # sample() would not read them
    assert histories([plain, penalised]) == [[1, 2, 3], [4]]
    # and the penalty still reaches the logits through them: token 0 seen, so token 1 wins
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    seq = Sequence("c", [0], SamplingParams(repetition_penalty=2.0))
    assert sample(logits, [seq.params], [0], histories([seq])) == [1]
    assert sample(logits, [plain.params], [0], histories([plain])) == [0]
