"""CUDA-graph replay of the decode paths (audio/graphs.py): same results as the eager calls."""
from __future__ import annotations

import pytest
import torch

from chattts_vllm.audio.checkpoint import (decoder_shapes, load_decoder, load_vocos, random_state_dict,
                                           vocos_shapes)
from chattts_vllm.audio.graphs import (GraphCache, disable_cuda_graphs, enable_cuda_graphs,
                                       freeze_cuda_graphs)
from chattts_vllm.audio.stream import StreamingDecoder


def _tiny(device="cpu"):
    dec = load_decoder(random_state_dict(decoder_shapes(idim=8, odim=8, hidden=16, n_layer=1, bn_dim=8), 0),
                       device=device)
    voc = load_vocos(random_state_dict(vocos_shapes(dim=16, intermediate=32, n_layer=1), 1), device=device)
    return dec, voc


@torch.inference_mode()
def test_cpu_inputs_run_eagerly():
    dec, voc = _tiny()
    enable_cuda_graphs(dec), enable_cuda_graphs(voc)
    x = torch.randn(1, 5, 16)
    ref = voc.decode_frames(dec.decode_frames(x))
    for _ in range(3):
        assert torch.equal(voc.decode_frames(dec.decode_frames(x)), ref)
    assert dec._graph_caches["decode_frames"].captures == 0
    disable_cuda_graphs(dec), disable_cuda_graphs(voc)
    assert torch.equal(voc.decode_frames(dec.decode_frames(x)), ref)


@pytest.mark.gpu
@torch.inference_mode()
def test_graph_replay_equals_eager_on_gpu():
    """Real sizes, Triton kernels, bf16: replays are bit-identical to eager and own their output."""
    from chattts_vllm.audio.checkpoint import random_audio_state_dicts

    sd = random_audio_state_dicts(0)
    dec = load_decoder(sd["Decoder.safetensors"], device="cuda", dtype=torch.bfloat16)
    voc = load_vocos(sd["Vocos.safetensors"], device="cuda", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, t, 768, generator=g).cuda().bfloat16() for t in (60, 60, 61, 60)]
    eager = [voc.decode_frames(dec.decode_frames(x)) for x in xs]
    enable_cuda_graphs(dec), enable_cuda_graphs(voc)
    outs = [voc.decode_frames(dec.decode_frames(x)) for x in xs + xs]
    for got, want in zip(outs, eager + eager):
        assert torch.equal(got, want)
    assert outs[0].data_ptr() != outs[1].data_ptr()
    assert dec._graph_caches["decode_frames"].captures == 2        # T = 60 and (second time) 61
    assert dec._graph_caches["decode_frames"].replays >= 4


@pytest.mark.gpu
@torch.inference_mode()
def test_stream_with_graphs_equals_oneshot_on_gpu():
    from chattts_vllm.audio.checkpoint import random_audio_state_dicts

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    sd = random_audio_state_dicts(0)
    dec = load_decoder(sd["Decoder.safetensors"], device="cuda")
    voc = load_vocos(sd["Vocos.safetensors"], device="cuda")
    hidden = torch.randn(400, 768, generator=torch.Generator().manual_seed(0)).cuda()
    ref = voc(dec(hidden.T[None]))[0]
    enable_cuda_graphs(dec), enable_cuda_graphs(voc)
    s = StreamingDecoder(dec, voc)
    pieces = [s.push(hidden[i:i + 24]) for i in range(0, 400, 24)] + [s.flush()]
    got = torch.cat(pieces)
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= 1e-4
    assert voc._graph_caches["spectrum"].replays > 0


def test_graph_cache_counts_before_capture():
    calls = []
    cache = GraphCache(lambda x: calls.append(1) or x * 2, min_calls=3)
    x = torch.ones(3)
    assert torch.equal(cache(x), x * 2) and cache.captures == 0 and len(calls) == 1


@pytest.mark.gpu
@torch.inference_mode()
def test_frozen_caches_replay_what_they_hold_and_capture_nothing_new():
    """After `freeze_cuda_graphs`, a captured shape still replays and a new one runs eagerly with
    no capture (a server captures its warmed shapes, then never stalls its streams on a capture)."""
    dec, voc = _tiny("cuda")
    enable_cuda_graphs(dec)
    x5, x7 = torch.randn(2, 5, 16, device="cuda"), torch.randn(2, 7, 16, device="cuda")
    want5, want7 = dec._decode_frames(x5), dec._decode_frames(x7)
    dec.decode_frames(x5), dec.decode_frames(x5)                 # captured on the second call
    cache = dec._graph_caches["decode_frames"]
    assert cache.captures == 1 and freeze_cuda_graphs(dec) == 1
    for _ in range(3):
        assert torch.equal(dec.decode_frames(x7), want7)
        assert torch.equal(dec.decode_frames(x5), want5)
    assert cache.captures == 1 and cache.replays == 4            # x5's capture call, then 3 replays
    assert freeze_cuda_graphs(voc) == 0                          # no caches: nothing to freeze
