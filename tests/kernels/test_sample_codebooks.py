"""The fused 4-codebook sampler (csrc/sample_codebooks.cu) against its twin, gpt/sampling.py.

CPU tests (CI): chattts_vllm.ops falls back to the twin. GPU tests (`pytest -m gpu`, after building
the extension: `python setup.py build_ext --inplace`): kernel and twin on the same CUDA batch give
identical codes and bit-identical processed logits, ragged batches and tie/boundary cases included.
"""
from __future__ import annotations

import pytest
import torch

from chattts_vllm import ops
from chattts_vllm.gpt import sampling
from chattts_vllm.gpt.sampling import RowParams

V = 626
EOS = 625
W = 16


def make_batch(b: int, seed: int = 0, device: str = "cpu", dtype=torch.float32) -> dict:
    """B requests with mixed parameters, partial windows (-1 padded) full of repeats, some EOS ids."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 3.0, 10.0])[torch.randint(0, 3, (b, 1, 1), generator=g)]
    logits = torch.randn(b, 4, V, generator=g) * scale
    history = torch.randint(0, 40, (b, 4, W), generator=g)
    history[torch.rand(b, 4, W, generator=g) < 0.05] = EOS
    filled = torch.randint(0, W + 1, (b, 1, 1), generator=g)
    history[(torch.arange(W).view(1, 1, W) < W - filled).expand(b, 4, W)] = -1
    logits[:, :, :40] += 2.0                                   # the penalised ids are contenders

    def pick(values, dtype_):
        v = torch.tensor(values, dtype=dtype_)
        return v[torch.randint(0, len(values), (b,), generator=g)]

    temperature = torch.empty(b, 4).uniform_(0.05, 1.5, generator=g)
    temperature[torch.rand(b, 4, generator=g) < 0.3] = 0.3
    batch = dict(
        logits=logits.to(dtype),
        history=history,
        temperature=temperature,
        top_p=pick([0.1, 0.5, 0.7, 0.9, 0.95, 1.0], torch.float32),
        top_k=pick([1, 3, 5, 20, 50, 626, 2000], torch.int64),
        penalty=pick([1.0, 1.05, 1.2, 0.9], torch.float32),
        mask_eos=torch.rand(b, generator=g) < 0.3,
        seed=torch.randint(-2**62, 2**62, (b,), generator=g),
        counter=torch.randint(0, 4000, (b,), generator=g),
    )
    return {k: v.to(device) for k, v in batch.items()}


def twin(batch: dict, processed: torch.Tensor | None = None) -> torch.Tensor:
    args = dict(batch)
    return sampling.sample_frames(args.pop("logits"), args.pop("history"), **args, eos_id=EOS,
                                  processed=processed)


def kernel(batch: dict, processed: torch.Tensor | None = None) -> torch.Tensor:
    args = dict(batch)
    return ops.sample_codebooks(args.pop("logits"), args.pop("history"), **args, eos_id=EOS,
                                processed=processed)


def rows(batch: dict) -> RowParams:
    """The per-row RowParams written out by hand (batch-major, then codebook; stream = codebook)."""
    b = batch["top_p"].shape[0]
    per_row = lambda t: t.repeat_interleave(4)  # noqa: E731
    return RowParams(temperature=batch["temperature"].reshape(-1), top_p=per_row(batch["top_p"]),
                     top_k=per_row(batch["top_k"]), repetition_penalty=per_row(batch["penalty"]),
                     mask_eos=per_row(batch["mask_eos"]), seed=per_row(batch["seed"]),
                     counter=per_row(batch["counter"]), stream=torch.arange(4).repeat(b))


def buffer_layout(batch: dict, seed: int = 0):
    """Writes each request's window into a per-slot code buffer [S, T, 4] at shuffled slots."""
    g = torch.Generator().manual_seed(seed)
    hist = batch["history"].cpu()
    b = hist.shape[0]
    slots, t = b + 3, 3 * W + 8
    codes = torch.randint(0, V, (slots, t, 4), generator=g, dtype=torch.int32)
    slot = torch.randperm(slots, generator=g)[:b]
    first = torch.randint(0, W + 8, (b,), generator=g)
    num = (hist >= 0).sum(-1)[:, 0]                        # make_batch fills the 4 rows alike
    num = torch.where(num == W, num + torch.randint(0, W, (b,), generator=g), num)  # > W frames too
    for r in range(b):
        j, n = int(num[r]), int((hist[r, 0] >= 0).sum())
        codes[slot[r], first[r] + j - n: first[r] + j] = hist[r, :, W - n:].T.to(torch.int32)
    dev = batch["logits"].device
    return codes.to(dev), slot.to(dev), first.to(dev), num.to(dev)


# -- CPU: the fallback is the twin -------------------------------------------------------------

def test_cpu_falls_back_to_twin():
    batch = make_batch(9, seed=1)
    proc = torch.empty(9, 4, V)
    codes = kernel(batch, processed=proc)
    flat = dict(logits=batch["logits"].reshape(36, V), history=batch["history"].reshape(36, W))
    expected = sampling.sample(flat["logits"], flat["history"], rows(batch), EOS).view(9, 4)
    assert codes.dtype == torch.int64 and codes.shape == (9, 4)
    assert torch.equal(codes, expected)
    assert torch.equal(proc.view(36, V), sampling.process_logits(flat["logits"], flat["history"],
                                                                 rows(batch), EOS))


def test_cpu_buffer_windows_equal_dense_history():
    batch = make_batch(7, seed=2)
    codes, slot, first, num = buffer_layout(batch)
    assert torch.equal(sampling.codebook_windows(codes, slot, first, num, W),
                       torch.where(batch["history"] >= 0, batch["history"], -1))
    args = {k: v for k, v in batch.items() if k not in ("logits", "history")}
    got = ops.sample_codebooks_from_buffer(batch["logits"], codes, slot, first, num, **args, eos_id=EOS)
    assert torch.equal(got, kernel(batch))


# -- GPU: kernel == twin on the same CUDA batch -----------------------------------------------

def _check(batch: dict) -> None:
    b = batch["logits"].shape[0]
    pk = torch.full((b, 4, V), float("nan"), device="cuda")
    pt = torch.empty(b, 4, V, device="cuda")
    got, want = kernel(batch, processed=pk), twin(batch, processed=pt)
    bad_rows = (pk != pt).any(-1).nonzero().tolist()
    assert not bad_rows, f"processed logits differ in rows {bad_rows[:8]} of {b}x4"
    assert torch.equal(got, want), f"codes differ at {(got != want).nonzero().tolist()[:8]}"
    assert torch.equal(torch.softmax(pk, -1), torch.softmax(pt, -1))


@pytest.mark.gpu
def test_extension_is_built():
    assert torch.cuda.is_available()
    assert ops.HAS_CUDA_OPS, "build csrc first: pip install --no-build-isolation --no-deps -e ."


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 7, 16, 33, 256, 1000])   # torch's cumsum tile: 2 << (8, 7, 6, 5, 4, 4)
def test_kernel_matches_twin(b):
    _check(make_batch(b, seed=b, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits(dtype):
    _check(make_batch(64, seed=3, device="cuda", dtype=dtype))


@pytest.mark.gpu
def test_ties():
    """Coarse logits: tied values at the top-p boundary (stable sort order) and at the k-th value."""
    batch = make_batch(128, seed=4, device="cuda")
    batch["logits"] = (batch["logits"] * 2).round() / 2
    batch["penalty"].fill_(1.0)
    _check(batch)


@pytest.mark.gpu
def test_top_p_boundary_is_bit_exact():
    """1 - top_p equal to one of the twin's own cumulative sums: an ulp off flips that position."""
    b = 96
    batch = make_batch(b, seed=5, device="cuda")
    batch["logits"] = torch.randn_like(batch["logits"]) * 0.5        # flat: cum spans [0.5, 1)
    batch["temperature"].fill_(1.0)
    p = rows(batch)
    x = sampling.apply_repetition_penalty(
        sampling.apply_temperature(batch["logits"].reshape(4 * b, V), p.temperature),
        batch["history"].reshape(4 * b, W), p.repetition_penalty)
    cum = torch.sort(x, dim=-1).values.softmax(-1).cumsum(-1)         # as apply_top_p, same 4B rows
    g = torch.Generator().manual_seed(5)
    hits = 0
    for r in range(b):
        k = int(torch.randint(0, 4, (1,), generator=g))
        c = cum[4 * r + k]
        cand = ((c >= 0.5) & (c < 1.0)).nonzero().flatten()
        cand = cand[cand < V - 3]
        if len(cand):
            j = cand[int(torch.randint(0, len(cand), (1,), generator=g))]
            batch["top_p"][r] = 1.0 - c[j]                              # exact (Sterbenz) ...
            hits += bool(1 - batch["top_p"][r] == c[j])                 # ... and so is 1 - top_p
    assert hits > b // 2
    batch["top_k"].fill_(V)
    _check(batch)


@pytest.mark.gpu
def test_strided_logits():
    """Rows of a wider logits buffer, as compute_logits may hand them over."""
    batch = make_batch(40, seed=6, device="cuda")
    wide = torch.randn(40, 4 * V + 24, device="cuda")
    wide[:, : 4 * V] = batch["logits"].reshape(40, 4 * V)
    batch["logits"] = wide[:, : 4 * V].view(40, 4, V)
    assert not batch["logits"].is_contiguous()
    _check(batch)


@pytest.mark.gpu
def test_buffer_layout_matches_dense():
    batch = make_batch(50, seed=7, device="cuda")
    codes, slot, first, num = buffer_layout(batch)
    args = {k: v for k, v in batch.items() if k not in ("logits", "history")}
    pk = torch.empty(50, 4, V, device="cuda")
    got = ops.sample_codebooks_from_buffer(batch["logits"], codes, slot, first, num, **args,
                                           eos_id=EOS, processed=pk)
    pt = torch.empty(50, 4, V, device="cuda")
    assert torch.equal(got, twin(batch, processed=pt))
    assert torch.equal(pk, pt)
    assert torch.equal(got, kernel(dict(batch, history=batch["history"].int())))


@pytest.mark.gpu
def test_noise_never_reaches_one():
    """Seed 5, frame 79491, codebook 3, code 216 once gave u == 1.0 (24-bit noise rounded up), so
    a removed code could be drawn through -inf + inf = NaN. With 23-bit noise u < 1: the removed
    code is never drawn, and kernel and twin agree."""
    u = sampling.counter_uniform(torch.tensor([5]), torch.tensor([79491]), torch.tensor([3]), V)
    assert float(u[0, 216]) < 1.0
    batch = make_batch(2, seed=8, device="cuda")
    batch["seed"][:] = 5
    batch["counter"][:] = 79491
    batch["logits"][0, 3, 216] = -50.0                          # removed by top-p/top-k in row 0
    batch["logits"][1, 3, 216] = 50.0                           # kept in row 1
    _check(batch)
    assert int(kernel(batch)[0, 3]) == int(twin(batch)[0, 3]) != 216


@pytest.mark.gpu
def test_rejects_bad_shapes():
    batch = make_batch(3, device="cuda")
    with pytest.raises((RuntimeError, ValueError), match="626"):
        kernel(dict(batch, logits=batch["logits"][:, :, :600]))
    with pytest.raises((RuntimeError, ValueError), match="history"):
        kernel(dict(batch, history=batch["history"][:2]))
