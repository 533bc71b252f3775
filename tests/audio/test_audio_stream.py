"""Incremental streaming: concatenated chunks == one-shot decode (max abs diff <= 1e-4, fp32), and the
work per chunk is bounded by block + context whatever the utterance length."""
from __future__ import annotations

import pytest
import torch
from audio_upstream import one_thread, state_dicts

from chattts_vllm.audio.checkpoint import (decoder_shapes, load_decoder, load_dvae, load_vocos,
                                           random_state_dict, vocos_shapes)
from chattts_vllm.audio.stream import StreamingDecoder
from streaming import stream as _stream


_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def full_models():
    sd = state_dicts(0)
    return (load_decoder(sd["Decoder.safetensors"]), load_dvae(sd["DVAE.safetensors"]),
            load_vocos(sd["Vocos.safetensors"]))


@pytest.fixture(scope="module")
def tiny_models():
    """Narrow models with the real depth, hence the real receptive fields (75 and 27 mel frames)."""
    dec = load_decoder(random_state_dict(decoder_shapes(idim=8, odim=16, hidden=16, bn_dim=8), 3))
    voc = load_vocos(random_state_dict(vocos_shapes(dim=16, intermediate=32), 4))
    return dec, voc


@torch.inference_mode()
def test_stream_hidden_states_equals_oneshot(full_models):
    dec, _, voc = full_models
    hidden = torch.randn(130, 768, generator=torch.Generator().manual_seed(0))
    ref = voc(dec(hidden.T[None]))[0]
    assert ref.shape[0] == 512 * 130 - 256
    got, s = _stream(dec, voc, hidden, [24, 1, 7, 24, 40])
    diff = (got - ref).abs().max().item()
    print(f"stream vs one-shot (Decoder path) max abs diff {diff:.2e}, {len(s.chunks)} chunks")
    assert got.shape == ref.shape and diff <= 1e-4


@torch.inference_mode()
def test_stream_codes_equals_oneshot(full_models):
    _, dvae, voc = full_models
    codes = torch.randint(0, 625, (90, 4), generator=torch.Generator().manual_seed(1))
    ref = voc(dvae(codes.T[None]))[0]
    got, _ = _stream(dvae, voc, codes, [24])
    diff = (got - ref).abs().max().item()
    print(f"stream vs one-shot (DVAE path) max abs diff {diff:.2e}")
    assert got.shape == ref.shape and diff <= 1e-4


@pytest.mark.parametrize("total", [1, 2, 3, 5, 40])
@torch.inference_mode()
def test_stream_short_and_ragged(tiny_models, total):
    dec, voc = tiny_models
    x = torch.randn(total, 16, generator=torch.Generator().manual_seed(total))
    ref = voc(dec(x.T[None]))[0]
    for sizes in ([1], [2, 3], [total]):
        got, _ = _stream(dec, voc, x, sizes)
        assert got.shape == ref.shape == (512 * total - 256,)
        assert (got - ref).abs().max().item() <= 1e-4


@torch.inference_mode()
def test_stream_work_per_chunk_is_bounded(tiny_models):
    dec, voc = tiny_models
    total, block = 3000, 24                    # a 64 s utterance
    x = torch.randn(total, 16, generator=torch.Generator().manual_seed(7))
    got, s = _stream(dec, voc, x, [block])
    ctx_d, ctx_v = dec.context, voc.context
    assert (ctx_d, ctx_v) == (75, 27)
    *pushes, last = s.chunks
    dec_max = max(c.decoder_frames for c in pushes)
    voc_max = max(c.vocoder_frames for c in pushes)
    print(f"per push: decoder <= {dec_max} GPT frames, vocoder <= {voc_max} mel frames; "
          f"flush: {last.decoder_frames}, {last.vocoder_frames}")
    assert dec_max <= block + ctx_d + 1                 # block + mel context (in GPT frames)
    assert voc_max <= 2 * block + 2 * ctx_v + 3         # block + both Vocos contexts + ISTFT tail
    # The flush finishes the held-back right context: a constant, too.
    assert last.decoder_frames <= ctx_d + 1 and last.vocoder_frames <= ctx_d + 2 * ctx_v + 3
    assert sum(c.decoder_frames for c in s.chunks) <= total * (1 + (ctx_d + 1) / block)
    assert sum(c.samples for c in s.chunks) == got.shape[0] == 512 * total - 256
    # Buffers hold only context, not the prefix.
    assert s._frames.data.shape[1] <= 2 * block + ctx_d and s._mel.data.shape[1] <= 4 * block + 2 * ctx_v
    ref = voc(dec(x.T[None]))[0]
    assert (got - ref).abs().max().item() <= 1e-4


def test_push_after_flush_raises(tiny_models):
    s = StreamingDecoder(*tiny_models)
    s.push(torch.randn(3, 16))
    s.flush()
    with pytest.raises(RuntimeError):
        s.push(torch.randn(1, 16))


@pytest.mark.gpu
@torch.inference_mode()
def test_stream_equals_oneshot_on_gpu_triton():
    """The same exactness on CUDA with the Triton kernels (fp32, TF32 off in the eager reference)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    sd = state_dicts(0)
    dec = load_decoder(sd["Decoder.safetensors"], device="cuda")
    voc = load_vocos(sd["Vocos.safetensors"], device="cuda")
    hidden = torch.randn(300, 768, generator=torch.Generator().manual_seed(0)).cuda()
    ref = voc(dec(hidden.T[None]))[0]
    got, s = _stream(dec, voc, hidden, [24, 7, 40])
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= 1e-4
    assert max(c.decoder_frames for c in s.chunks[:-1]) <= 40 + dec.context + 1


@pytest.mark.gpu
@torch.inference_mode()
def test_stream_equals_oneshot_on_gpu_triton_bf16():
    """In bf16, as served: a streamed window runs on the same kernels as the one-shot decode, so only
    the last float32 steps (the inverse FFT's batch-dependent rounding) may differ. A window cast
    from the float32 mel buffer has 200-byte rows; before they were re-laid for the TMA kernel it
    ran on the pointer kernel, and the H100 server test saw ~1e-2 relative differences."""
    sd = state_dicts(0)
    dec = load_decoder(sd["Decoder.safetensors"], device="cuda", dtype=torch.bfloat16)
    voc = load_vocos(sd["Vocos.safetensors"], device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(300, 768, generator=torch.Generator().manual_seed(0)).cuda()
    ref = voc(dec(hidden.T[None].to(torch.bfloat16)))[0].float()
    got, _ = _stream(dec, voc, hidden, [24, 7, 40])
    assert got.shape == ref.shape
    assert (got.float() - ref).abs().max().item() <= 2e-3 * ref.abs().max().item()


@torch.inference_mode()
def test_batched_stream_equals_each_row_oneshot(tiny_models):
    """Rows pushed in lockstep as one (B, T, D) batch: each row's samples equal its own one-shot
    decode; `select` splits rows off with their state, and each part flushes at its own length."""
    dec, voc = tiny_models
    lengths = [50, 50, 33, 41]
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(n, 16, generator=g) for n in lengths]
    s = StreamingDecoder(dec, voc)
    head = [s.push(torch.stack([x[a:b] for x in xs])) for a, b in [(0, 7), (7, 20), (20, 33)]]
    assert all(h.dim() == 2 and h.shape[0] == 4 for h in head)
    head = torch.cat(head, dim=1)
    got = {}
    for rows in ([0, 1], [2], [3]):
        part = s.select(rows)
        n = lengths[rows[0]]
        tail = [part.push(torch.stack([xs[r][33:n] for r in rows]))] if n > 33 else []
        tail = torch.cat(tail + [part.flush()], dim=1)
        for j, r in enumerate(rows):
            got[r] = torch.cat([head[r], tail[j]])
    for r, x in enumerate(xs):
        ref = voc(dec(x.T[None]))[0]
        assert got[r].shape == ref.shape == (512 * lengths[r] - 256,)
        assert (got[r] - ref).abs().max().item() <= 1e-4


def test_batched_and_single_pushes_do_not_mix(tiny_models):
    s = StreamingDecoder(*tiny_models)
    s.push(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match=r"\(B, T_new, D\)"):
        s.push(torch.randn(3, 16))
    with pytest.raises(ValueError, match="3 rows"):
        s.push(torch.randn(3, 1, 16))
    single = StreamingDecoder(*tiny_models)
    single.push(torch.randn(3, 16))
    with pytest.raises(ValueError):
        single.select([0])


@pytest.mark.gpu
@torch.inference_mode()
def test_batched_stream_equals_oneshot_on_gpu_triton_bf16():
    """Lockstep rows on the Triton kernels in bf16 (the offline overlap's decode, serving/overlap.py):
    each row as close to its one-shot decode as the single-row stream is."""
    sd = state_dicts(0)
    dec = load_decoder(sd["Decoder.safetensors"], device="cuda", dtype=torch.bfloat16)
    voc = load_vocos(sd["Vocos.safetensors"], device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(5, 300, 768, generator=torch.Generator().manual_seed(0)).cuda()
    s = StreamingDecoder(dec, voc)
    got = torch.cat([s.push(hidden[:, a:a + 47]) for a in range(0, 282, 47)]
                    + [s.push(hidden[:, 282:]), s.flush()], dim=1).float()
    for r in range(5):
        ref = voc(dec(hidden[r].T[None].to(torch.bfloat16)))[0].float()
        assert got[r].shape == ref.shape
        assert (got[r] - ref).abs().max().item() <= 2e-3 * ref.abs().max().item()
