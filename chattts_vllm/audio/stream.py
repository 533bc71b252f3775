"""Incremental decoding: GPT frames in blocks → audio, equal to the one-shot decode.

Every conv in the Decoder/DVAE and Vocos is centred (non-causal), so an output frame is final once
`context` frames to its right exist. Each push therefore recomputes only a bounded window:

  mel stage    new GPT frames + the mel context on both sides (75 mel frames ≈ 38 GPT frames)
  vocoder      new mel frames + Vocos' context (27) + the 3 ISTFT frames whose overlap-add tail
               the next samples still need

and emits the samples whose every contribution is known. `flush()` ends the utterance: the right
edge then gets the same zero padding as the one-shot decode, so the concatenated stream equals
`vocos(decoder(frames))` up to float rounding. Work per push is O(block + context), never the prefix;
`chunks` records the frames each stage processed so callers (and tests) can check that.

A decoder may also carry a batch of utterances in lockstep (pushes of (B, T_new, D), samples out
as (B, S)): an offline batch then decodes while the GPT still generates, one launch sequence per
block for all rows. `select(rows)` splits off some rows with their state, for rows whose lengths
part ways (each flushes at its own end).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ChunkStats:
    """Frames run through each stage by one push/flush, and the samples it emitted."""
    new_frames: int
    decoder_frames: int
    vocoder_frames: int
    samples: int


@dataclass
class _Buffer:
    """A sliding window of time steps [start, start + T) of a growing (B, T, D) sequence."""
    data: torch.Tensor | None = None
    start: int = 0

    @property
    def end(self) -> int:
        return self.start + (0 if self.data is None else self.data.shape[1])

    def append(self, rows: torch.Tensor) -> None:
        self.data = rows if self.data is None else torch.cat([self.data, rows], dim=1)

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Steps [lo, hi), contiguous (the GPU kernels read rows at fixed strides)."""
        return self.data[:, lo - self.start:hi - self.start].contiguous()

    def drop_before(self, idx: int) -> None:
        if self.data is not None and idx > self.start:
            cut = min(idx, self.end) - self.start
            self.data, self.start = self.data[:, cut:], self.start + cut

    def select(self, rows: list[int]) -> _Buffer:
        return _Buffer(None if self.data is None else self.data[rows], self.start)


@dataclass
class StreamingDecoder:
    """Feed GPT frames, get waveform pieces; one utterance (or one lockstep batch) per instance.

    mel_model: a `Decoder` (rows are 768-d hidden states) or a `DVAE` (rows are 4 codes).
    vocos:     the `Vocos` vocoder.
    The first push fixes the form: (T_new, D) frames give 1-D samples, (B, T_new, D) give (B, S).
    """
    mel_model: torch.nn.Module
    vocos: torch.nn.Module
    chunks: list[ChunkStats] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._frames = _Buffer()        # GPT frames still needed as context
        self._mel = _Buffer()           # final mel frames still needed as context
        self._spec_done = 0             # spectral frames whose samples are out (the ISTFT run end)
        self._emitted = 0               # samples returned so far
        self._ended = False
        self._batched: bool | None = None           # set by the first push
        p = next(self.vocos.parameters())
        self.device = p.device

    @property
    def samples_emitted(self) -> int:
        return self._emitted

    @torch.inference_mode()
    def push(self, frames: torch.Tensor) -> torch.Tensor:
        """(T_new, 768) hidden states or (T_new, 4) codes → the newly final samples (float32, 1-D);
        (B, T_new, D) → (B, S)."""
        if self._ended:
            raise RuntimeError("push() after flush(): start a new StreamingDecoder per utterance")
        if frames.dim() not in (2, 3) or self._batched not in (None, frames.dim() == 3):
            form = {None: "(T_new, D) or (B, T_new, D)", False: "(T_new, D)", True: "(B, T_new, D)"}
            raise ValueError(f"expected {form[self._batched]} frames, got {tuple(frames.shape)}")
        self._batched = frames.dim() == 3
        x = frames if self._batched else frames[None]
        if self._frames.data is not None and x.shape[0] != self._frames.data.shape[0]:
            raise ValueError(f"a push of {x.shape[0]} rows to a decoder of {self._frames.data.shape[0]}")
        self._frames.append(x.to(self.device))
        return self._step(x.shape[1])

    @torch.inference_mode()
    def flush(self) -> torch.Tensor:
        """End of utterance: the remaining samples (the right edge is padded like the one-shot decode)."""
        if self._ended:
            return torch.zeros(self._shape(0), device=self.device)
        self._ended = True
        return self._step(0)

    @property
    def rows(self) -> int:
        return 1 if self._frames.data is None else self._frames.data.shape[0]

    def select(self, rows: list[int]) -> StreamingDecoder:
        """A decoder for `rows` of this batch, with their state so far (this one is left as is)."""
        if not self._batched:
            raise ValueError("select() needs a batched decoder")
        sub = StreamingDecoder(self.mel_model, self.vocos)
        sub._frames, sub._mel = self._frames.select(rows), self._mel.select(rows)
        sub._spec_done, sub._emitted, sub._ended, sub._batched = (
            self._spec_done, self._emitted, self._ended, True)
        return sub

    def _shape(self, samples: int) -> tuple[int, ...]:
        return (self.rows, samples) if self._batched else (samples,)

    def _step(self, new: int) -> torch.Tensor:
        dec_n = self._mel_stage()
        voc_n, wav = self._vocoder_stage()
        self.chunks.append(ChunkStats(new, dec_n, voc_n, wav.shape[-1]))
        return wav if self._batched else wav[0]

    def _mel_stage(self) -> int:
        """Decode the GPT-frame window whose mel frames just became final; returns its length."""
        ctx, n_frames, m_done = self.mel_model.context, self._frames.end, self._mel.end
        m_lim = 2 * n_frames if self._ended else max(0, 2 * n_frames - ctx)
        if m_lim <= m_done:
            return 0
        g0 = max(0, (m_done - ctx) // 2)
        rows = self._frames.rows(g0, n_frames)
        mel = self.mel_model.decode_frames(rows)                          # (B, 2·(n − g0), n_mels)
        self._mel.append(mel[:, m_done - 2 * g0:m_lim - 2 * g0].float())
        self._frames.drop_before(max(0, (m_lim - ctx) // 2))
        return rows.shape[1]

    def _vocoder_stage(self) -> tuple[int, torch.Tensor]:
        """Vocode the mel window whose spectral frames just became final; ISTFT the complete part."""
        ctx, m_end = self.vocos.context, self._mel.end
        j1 = m_end if self._ended else max(0, m_end - ctx)
        empty = torch.zeros(self.rows, 0, device=self.device)
        if j1 <= self._spec_done and not (self._ended and m_end > 0 and j1 > 0):
            return 0, empty
        overlap = self.vocos.head.istft.window.shape[0] // self.vocos.hop_length - 1
        j0 = max(0, self._spec_done - overlap)              # frames whose OLA tail is still open
        m0, m1 = max(0, j0 - ctx), min(m_end, j1 + ctx)
        spec = self.vocos.spectrum(self._mel.rows(m0, m1))[:, j0 - m0:j1 - m0]
        wav = self.vocos.head.istft(spec, first=j0 == 0, last=self._ended)
        start = 0 if j0 == 0 else (j0 + 1) * self.vocos.hop_length   # output index of wav[0]
        wav = wav[:, self._emitted - start:]
        self._emitted += wav.shape[1]
        self._spec_done = j1
        self._mel.drop_before(max(0, j1 - overlap - ctx))
        return m1 - m0, wav
