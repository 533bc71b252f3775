"""The sampling chain alone against upstream's logits processors, on random logits and histories."""
from __future__ import annotations

import pytest
import torch
from ChatTTS.model.processors import CustomRepetitionPenaltyLogitsProcessorRepeat
from transformers.generation import TopKLogitsWarper, TopPLogitsWarper

from chattts_vllm.gpt.sampling import RowParams, counter_uniform, draw, process_logits

V = 626
EOS = 625
CONFIGS = [  # (temperature, top_p, top_k, penalty, steps of history, mask_eos)
    (0.3, 0.7, 20, 1.05, 0, False),
    (0.3, 0.7, 20, 1.05, 5, True),
    (1.0, 0.9, 50, 1.2, 16, False),
    (0.7, 0.5, 3, 1.05, 40, False),
    (0.05, 1.0, 626, 1.0, 20, True),
    (2.0, 0.2, 1, 1.5, 16, False),
    (0.5, 0.95, 7, 0.9, 10, False),
]


def _upstream(logits, hist, t, p, k, pen, mask_eos):
    x = logits / t
    if pen != 1.0:
        x = CustomRepetitionPenaltyLogitsProcessorRepeat(pen, V - 1, 16)(hist, x)
    x = TopPLogitsWarper(p, min_tokens_to_keep=3)(None, x)
    x = TopKLogitsWarper(k, min_tokens_to_keep=3)(None, x)
    if mask_eos:
        x[:, EOS] = -torch.inf
    return torch.softmax(x, dim=-1)


def _window(hist: torch.Tensor) -> torch.Tensor:
    """Our history format: the last 16 ids, -1 padded on the left."""
    out = torch.full((hist.shape[0], 16), -1, dtype=torch.int64)
    w = hist[:, -16:]
    if w.shape[1]:
        out[:, 16 - w.shape[1]:] = w
    return out


def _params(rows, configs, seed=0, counter=0):
    return RowParams(
        temperature=torch.tensor([c[0] for c in configs for _ in range(rows)]),
        top_p=torch.tensor([c[1] for c in configs for _ in range(rows)]),
        top_k=torch.tensor([c[2] for c in configs for _ in range(rows)]),
        repetition_penalty=torch.tensor([c[3] for c in configs for _ in range(rows)]),
        mask_eos=torch.tensor([c[5] for c in configs for _ in range(rows)]),
        seed=torch.full((rows * len(configs),), seed, dtype=torch.int64),
        counter=torch.full((rows * len(configs),), counter, dtype=torch.int64),
        stream=torch.arange(rows * len(configs), dtype=torch.int64) % 4,
    )


def test_processed_distribution_matches_upstream():
    g = torch.Generator().manual_seed(0)
    rows = 12
    logits, windows, refs = [], [], []
    for t, p, k, pen, steps, mask_eos in CONFIGS:
        lg = torch.randn(rows, V, generator=g) * 3
        hist = torch.randint(0, 40, (rows, steps), generator=g)  # small id range: real repeats
        refs.append(_upstream(lg.clone(), hist, t, p, k, pen, mask_eos))
        logits.append(lg)
        windows.append(_window(hist))
    # One mixed batch: every row carries its own parameters.
    ours = torch.softmax(process_logits(torch.cat(logits), torch.cat(windows),
                                        _params(rows, CONFIGS), EOS), dim=-1)
    ref = torch.cat(refs)
    assert torch.equal(ours > 0, ref > 0), "different candidate sets"
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


def test_penalty_applies_beyond_upstream_row_limit():
    """Upstream zeroes the penalty counts of rows >= 625 (156+ requests x 4 codebooks); we don't."""
    g = torch.Generator().manual_seed(1)
    rows = 640
    lg = torch.randn(rows, V, generator=g)
    hist = torch.randint(0, 5, (rows, 16), generator=g)
    cfg = [(1.0, 1.0, 626, 1.3, 16, False)]
    ours = process_logits(lg.clone(), hist, _params(rows, cfg), EOS)
    up = CustomRepetitionPenaltyLogitsProcessorRepeat(1.3, V - 1, 16)(hist, lg.clone())
    torch.testing.assert_close(ours[:625], up[:625], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours[625:], up[625:])          # upstream's quirk: unpenalised
    per_row = CustomRepetitionPenaltyLogitsProcessorRepeat(1.3, V - 1, 16)(hist[625:], lg[625:].clone())
    torch.testing.assert_close(ours[625:], per_row, rtol=1e-5, atol=1e-6)  # intended behaviour


def test_draw_depends_only_on_seed_counter_stream():
    g = torch.Generator().manual_seed(2)
    lg = torch.randn(8, V, generator=g)
    p = _params(8, [(1.0, 1.0, 626, 1.0, 0, False)], seed=42, counter=7)
    a = draw(lg, p)
    perm = torch.randperm(8, generator=g)
    p2 = RowParams(**{k: v[perm] for k, v in p.__dict__.items()})
    b = draw(lg[perm], p2)
    assert torch.equal(a[perm], b)
    p3 = _params(8, [(1.0, 1.0, 626, 1.0, 0, False)], seed=43, counter=7)
    assert not torch.equal(draw(lg, p3), a) or not torch.equal(
        counter_uniform(p3.seed, p3.counter, p3.stream, V), counter_uniform(p.seed, p.counter, p.stream, V))


def test_draw_follows_the_distribution():
    """Frequencies over many counters match softmax(processed) (Gumbel-max is exact sampling)."""
    torch.manual_seed(3)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0] + [-1e9] * (V - 4)])
    probs = torch.softmax(logits, -1)[0, :4]
    n = 20000
    p = RowParams(temperature=torch.ones(n), top_p=torch.ones(n), top_k=torch.full((n,), V),
                  repetition_penalty=torch.ones(n), mask_eos=torch.zeros(n, dtype=torch.bool),
                  seed=torch.full((n,), 5, dtype=torch.int64), counter=torch.arange(n),
                  stream=torch.zeros(n, dtype=torch.int64))
    ids = draw(logits.expand(n, V), p)
    freq = torch.bincount(ids, minlength=V)[:4].float() / n
    assert torch.allclose(freq, probs, atol=0.015), (freq, probs)


@pytest.mark.parametrize("seed", [0, 2**40 + 17, 2**62 + 5])
def test_uniform_noise_is_in_open_unit_interval(seed):
    n = 64
    u = counter_uniform(torch.full((n,), seed, dtype=torch.int64), torch.arange(n),
                        torch.zeros(n, dtype=torch.int64), V)
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01


def test_noise_is_strictly_below_one_where_24_bits_rounded_up():
    """(2**24 - 1 + 0.5) / 2**24 rounds to 1.0 in fp32; this key hit it with 24-bit noise."""
    u = counter_uniform(torch.tensor([5]), torch.tensor([79491]), torch.tensor([3]), V)
    assert float(u.max()) < 1.0
    lg = torch.full((1, V), -1e9)
    lg[0, :3] = torch.tensor([1.0, 0.5, 0.2])
    p = RowParams(temperature=torch.ones(1), top_p=torch.ones(1), top_k=torch.full((1,), 3),
                  repetition_penalty=torch.ones(1), mask_eos=torch.zeros(1, dtype=torch.bool),
                  seed=torch.tensor([5]), counter=torch.tensor([79491]), stream=torch.tensor([3]))
    assert int(draw(process_logits(lg, torch.full((1, 16), -1), p, EOS), p)) < 3
