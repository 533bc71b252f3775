"""Offline batches: decode the audio while the GPT still generates it.

Decoding a batch after its last frame puts the whole Decoder + Vocos pass (and its host copies) on
the critical path: for 512 ten-second utterances that was 0.3 s on an H100 host and up to 3.6 s
on an H200 host, next to ~4 s of GPT. The GPT step is bound by host work, so the GPU has room to
decode at the same time. `OverlappedDecode` is a frame watcher for `ChatTTS.infer_code`: once the
requests are submitted, a thread reads every request's frames from its frame file as the engine
writes them (the side channel of runners/outputs.py) and pushes them, `block` frames at a time,
through batched `StreamingDecoder`s, one per group of `group` requests in lockstep, on its own
CUDA stream. When the engine is done, `finish` takes the final frames, pushes each row's rest and
flushes it at its own length. The result equals `decode_utterances` up to the kernels' rounding
(the streamed decode equals the one-shot one; audio/stream.py).

A frame is pushed only once the record after it exists, so a frame that turns out to be a row's
last (its EOS is not audio) is never pushed early. `finish` compares the pushed codes with the
engine's final ones and decodes a row in one shot again if they differ (a frame re-sampled after
it was read), so the overlap can only cost time, never change audio.

Measured (H200, 2026-11-29, batch 512 of 10 s, bench_throughput --decode both): with the engine
core in the same process (VLLM_ENABLE_V1_MULTIPROCESSING=0) the thread's reads and copies hold the
GIL that the host-bound engine loop needs: one engine's GPT went from 1,006 to 707 audio-s/s and
end to end from 885 to 662; with 2 and 4 engines under MPS the overlap also lost (1,428 -> 1,344,
1,368 -> 1,306). So `ChatTTS.synthesize` leaves it off unless asked (`overlap_decode=True`); it is
for an engine core in its own process, where this process's GIL is free while the GPT runs
(not yet measured). Since those runs the thread reads all rows' records into one array by
syscalls alone (`FrameReader.read_records`), with no numpy copies under the GIL (also not yet
measured on a GPU).
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from chattts_vllm.audio.checkpoint import AudioModels
from chattts_vllm.audio.stream import StreamingDecoder
from chattts_vllm.gpt.requests import CodeResult
from chattts_vllm.runners.outputs import FrameReader, record_fields
from chattts_vllm.serving.pipeline import decode_utterances, frames_input, stream_decoder

BLOCK = 47                  # frames per push (1 s of audio): the tail left after the GPT is ~this
GROUP = 128                 # requests per batched decoder


class FrameWatcher(Protocol):
    """What `ChatTTS.infer_code` tells a watcher: the frame-file keys, then that the engine is done."""

    def start(self, keys: Sequence[str]) -> None: ...

    def stop(self) -> None: ...


class _Group:
    """Rows decoded in lockstep: their decoder, the codes pushed so far, the samples so far."""

    def __init__(self, rows: list[int], decoder: StreamingDecoder):
        self.rows = rows
        self.decoder = decoder
        self.pushed = 0
        self.codes: list[np.ndarray] = []            # (B, block, 4) per push
        self.wav: list[torch.Tensor] = []            # (B, S) per push, in host memory


class OverlappedDecode:
    """Watches a batch's frame files during generation and decodes them as they come."""

    def __init__(self, models: AudioModels, use_decoder: bool = True, block: int = BLOCK,
                 group: int = GROUP, poll_s: float = 0.02):
        self.models, self.use_decoder = models, use_decoder
        self.block, self.group, self.poll_s = block, group, poll_s
        self.groups: list[_Group] = []
        self.readers: list[FrameReader] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        device = next(models.vocos.parameters()).device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    # -- the frame-watcher protocol of ChatTTS.infer_code ----------------------------------------
    def start(self, keys: Sequence[str]) -> None:
        """The requests are submitted: follow their frame files."""
        self.readers = [FrameReader(k) for k in keys]
        n = len(keys)
        self.groups = [_Group(list(range(i, min(n, i + self.group))),
                              stream_decoder(self.models, self.use_decoder))
                       for i in range(0, n, self.group)]
        self._thread = threading.Thread(target=self._run, daemon=True, name="chattts-overlap-decode")
        self._thread.start()

    def stop(self) -> None:
        """The engine is done (the frame files are about to go): no more reads."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for r in self.readers:
            r.release()

    # -- while the engine runs ------------------------------------------------------------------
    def _stream_ctx(self):
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    def _run(self) -> None:
        try:
            with torch.inference_mode(), self._stream_ctx():
                while not self._stop.is_set():
                    if not any([self._advance(g) for g in list(self.groups)]):
                        self._stop.wait(self.poll_s)
        except BaseException as e:          # finish() decodes from scratch and reports nothing lost
            self.error = e

    def _advance(self, g: _Group) -> bool:
        """Push the group's next block if every row has it (and the frame after it). Rows that
        fall behind for good (ended, or preempted) are split off into a group of their own once
        the others are two frames further on."""
        stop = g.pushed + self.block
        ready = [k for k, r in enumerate(g.rows) if self.readers[r].has(stop)]
        if not ready:
            return False
        if len(ready) < len(g.rows):
            if not all(self.readers[g.rows[k]].has(stop + 2) for k in ready):
                return False                            # the rest may be a moment late
            rest = sorted(set(range(len(g.rows))) - set(ready))
            self.groups.append(self._split(g, rest))
            self._split(g, ready, into=g)
        # Every row's records straight into one array, by syscalls that release the GIL: the
        # host-bound engine loop in this process needs it (numpy copies would hold it).
        rec = np.empty((len(g.rows), self.block, self.readers[0].record // 4), np.int32)
        for j, r in enumerate(g.rows):
            self.readers[r].read_records(g.pushed, stop, timeout=1.0, out=rec[j])
        codes, hidden = record_fields(rec)
        g.codes.append(codes.copy())
        x = torch.from_numpy(hidden) if self.use_decoder else torch.from_numpy(codes).long()
        wav = g.decoder.push(x)
        g.wav.append(wav.float().cpu())             # waits for this stream only, off the GIL
        g.pushed = stop
        return True

    def _split(self, g: _Group, ks: list[int], into: _Group | None = None) -> _Group:
        """Rows `ks` of group `g` with their state, as a new group (or in place, `into=g`)."""
        dec = g.decoder.select(ks) if g.pushed else stream_decoder(self.models, self.use_decoder)
        out = into or _Group([], dec)
        out.rows, out.decoder, out.pushed = [g.rows[k] for k in ks], dec, g.pushed
        out.codes, out.wav = [c[ks] for c in g.codes], [w[ks] for w in g.wav]
        return out

    # -- after the engine -----------------------------------------------------------------------
    @torch.inference_mode()
    def finish(self, results: Sequence[CodeResult]) -> list[np.ndarray]:
        """Each row's waveform (float32, 24 kHz): its rest pushed and flushed at its own length."""
        self.stop()
        out: list[np.ndarray | None] = [None] * len(results)
        with self._stream_ctx():
            for g in self.groups:
                self._finish_group(g, results, out)
        # Rows not streamed (shorter than a block, a frame re-sampled after it was read, or the
        # thread failed): decoded in one shot, as without the overlap.
        rest = [i for i, w in enumerate(out) if w is None]
        for i, w in zip(rest, decode_utterances(self.models, [(results[i].codes, results[i].hidden)
                                                             for i in rest], self.use_decoder)):
            out[i] = w
        return out

    def _finish_group(self, g: _Group, results: Sequence[CodeResult], out: list) -> None:
        if self.error is not None or not g.pushed:
            return                                      # nothing streamed
        pushed = np.concatenate(g.codes, axis=1)        # (B, pushed, 4)
        same = [k for k, r in enumerate(g.rows)
                if results[r].num_frames >= g.pushed and np.array_equal(results[r].codes[:g.pushed], pushed[k])]
        by_length: dict[int, list[int]] = {}
        for k in same:
            by_length.setdefault(results[g.rows[k]].num_frames, []).append(k)
        for n, ks in by_length.items():
            dec = g.decoder.select(ks) if len(ks) < len(g.rows) else g.decoder
            tail = []
            if n > g.pushed:
                tail.append(dec.push(torch.stack([frames_input(results[g.rows[k]].codes[g.pushed:],
                                                               results[g.rows[k]].hidden[g.pushed:],
                                                               self.use_decoder) for k in ks])))
            tail.append(dec.flush())
            rest = torch.cat(tail, dim=1).float().cpu().numpy()
            for j, k in enumerate(ks):                  # one copy of each row's samples
                out[g.rows[k]] = np.concatenate([w[k].numpy() for w in g.wav] + [rest[j]])


@torch.inference_mode()
def warm_up_overlap(models: AudioModels, rows: set[int], frames: int, use_decoder: bool = True,
                    block: int = BLOCK) -> None:
    """Run every window shape that a batch of `frames`-frame utterances in groups of `rows` will
    push (as `OverlappedDecode` pushes them), so that Triton's JIT and autotuning happen here and
    not while the GPT runs."""
    width = models.decoder.frame_dim if use_decoder else 4
    device = next(models.vocos.parameters()).device
    for b in sorted(rows):
        dec = stream_decoder(models, use_decoder)
        x = torch.zeros(b, frames, width, device=device, dtype=torch.float32 if use_decoder else torch.int64)
        pushed = 0
        while pushed + block < frames:                  # a block waits for the frame after it
            dec.push(x[:, pushed:pushed + block])
            pushed += block
        dec.push(x[:, pushed:])
        dec.flush()
