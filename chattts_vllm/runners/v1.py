"""V1 model-runner glue (the CPU engine): per-request frame state and ChatTTS sampling.

vLLM's V1 runner keeps a persistent batch: row r of the logits, and the r-th run of tokens in the
forward, belong to the same request, and a custom logits processor sees every change of that
mapping (`BatchUpdate`) before each forward. So one object, `V1BatchState`, mirrors the batch:
- the logits processor updates it and samples with `gpt.sampling` (all ChatTTS parameters per row);
- the model asks it, per forward, for each token's codes and speaker row (`token_inputs`) and for
  which logits rows are code rows (`logits_layout`).

Each sampled frame is written to its request's frame history (the penalty window and the next input)
and to the side channel (runners/outputs.py). The engine-visible token is code0, or 625 for EOS.

Preemption: V1 drops a preempted request from the batch and later re-adds it with its prompt and
output ids. Its frame history is parked under its sink key when it leaves without having finished,
and restored on re-add, so the re-prefilled positions get the same code embeddings.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from chattts_vllm.config import (AUDIO_EOS, EBREAK_ID, HIDDEN_SIZE, NUM_TEXT_TOKENS, NUM_VQ,
                                 REPETITION_WINDOW)
from chattts_vllm.gpt.model import LogitsLayout, TokenInputs, live_model, split_code_logits
from chattts_vllm.gpt.sampling import RowParams, sample
from chattts_vllm.params import EngineRequest
from chattts_vllm.runners.outputs import FrameWriter, frame_path
from chattts_vllm.timeline import timeline

logger = logging.getLogger(__name__)
MAX_PARKED = 1024


class RequestFrames:
    """Worker-side state of one ChatTTS request: parameters, frame history, side channel."""

    def __init__(self, req: EngineRequest, prompt_ids: list[int], output_ids: list[int],
                 max_tokens: int, stop_ids: set[int]):
        self.req = req
        self.prompt_len = len(prompt_ids)
        self.output_ids = output_ids            # vLLM's live list of this request's outputs
        self.max_tokens = max_tokens
        self.stop_ids = stop_ids
        self.is_code = req.mode == "code"
        self.frames = np.zeros((max_tokens + 1, NUM_VQ), dtype=np.int16)
        self.prompt_codes = (np.asarray(req.prompt_codes, dtype=np.int64).reshape(-1, NUM_VQ)
                             if req.prompt_codes else None)
        self.speaker = (torch.from_numpy(req.speaker_vector().copy())
                        if req.speaker is not None and req.spk_position is not None else None)
        self.writer = (FrameWriter(req.sink, capacity=max_tokens)    # sized once
                       if self.is_code and req.sink else None)

    @property
    def num_generated(self) -> int:
        return len(self.output_ids)

    def finished(self) -> bool:
        out = self.output_ids
        return bool(out) and (out[-1] in self.stop_ids or len(out) >= self.max_tokens)

    def token_codes(self, positions: np.ndarray) -> np.ndarray:
        """[n, 4] codes of the tokens at these positions; -1 marks a text token."""
        codes = np.full((len(positions), NUM_VQ), -1, dtype=np.int64)
        if not self.is_code:
            return codes
        text_len, p_len = self.req.text_len, self.prompt_len
        if self.prompt_codes is not None:
            m = (positions >= text_len) & (positions < p_len)
            codes[m] = self.prompt_codes[positions[m] - text_len]
        m = positions >= p_len
        codes[m] = self.frames[positions[m] - p_len]
        return codes

    def history(self, k: int | None) -> np.ndarray:
        """The last 16 generated ids of codebook k (or of the text), -1 padded on the left."""
        j = self.num_generated
        lo = max(0, j - REPETITION_WINDOW)
        h = np.full(REPETITION_WINDOW, -1, dtype=np.int64)
        if j > lo:
            h[REPETITION_WINDOW - (j - lo):] = (self.frames[lo:j, k] if k is not None
                                                 else self.output_ids[lo:j])
        return h

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class V1BatchState:
    """Row r of the persistent batch -> RequestFrames (None for non-ChatTTS requests)."""

    def __init__(self, check_rows: bool = False) -> None:
        self.rows: dict[int, RequestFrames] = {}
        self.parked: OrderedDict[str, np.ndarray] = OrderedDict()
        # Debug aid (CHATTTS_VLLM_CHECK_ROWS=1): before each sampling step, check that every row's
        # frame history agrees with the engine's own token list (frame j's engine token is code 0).
        self.check_rows = check_rows
        self.retired_by_move = 0     # how often a one-way move vacated an occupied row (tests)
        self.timeline = timeline("engine")                 # None unless CHATTTS_VLLM_TIMELINE

    # -- batch bookkeeping -------------------------------------------------------------------
    def update(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._remove(index)
        for index, params, prompt_ids, output_ids in batch_update.added:
            self._remove(index)
            state = self._make_state(params, prompt_ids or [], output_ids)
            if state is not None:
                self.rows[index] = state
                if self.timeline is not None:
                    self.timeline.event("add", sink=state.req.sink)
        for src, dst, direction in batch_update.moved:
            a, b = self.rows.pop(src, None), self.rows.pop(dst, None)
            if a is not None:
                self.rows[dst] = a
            if direction == MoveDirectionality.SWAP and b is not None:
                self.rows[src] = b
            elif b is not None:
                # vLLM fills an emptied slot by a move and then drops that slot from `removed`,
                # so a one-way move onto an occupied row is that row's removal.
                self.retired_by_move += 1
                self._retire(b)

    def _make_state(self, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> RequestFrames | None:
        req = EngineRequest.from_extra_args(params.extra_args)
        if req is None:
            return None
        stop_ids = set(params.stop_token_ids or []) | {AUDIO_EOS if req.mode == "code" else EBREAK_ID}
        state = RequestFrames(req, prompt_ids, output_ids, params.max_tokens or 1, stop_ids)
        parked = self.parked.pop(req.sink, None) if req.sink else None
        if parked is not None:
            n = min(len(parked), len(state.frames))
            state.frames[:n] = parked[:n]
        elif state.is_code and output_ids:
            logger.warning("chattts: a request re-entered the batch with %d frames but no frame "
                           "history; its codes 1-3 are lost", len(output_ids))
        return state

    def _remove(self, index: int) -> None:
        state = self.rows.pop(index, None)
        if state is not None:
            self._retire(state)

    def _retire(self, state: RequestFrames) -> None:
        """A request leaves the batch: finished, aborted, preempted or just not scheduled."""
        state.close()
        if state.is_code and state.req.sink and not state.finished():
            # Preempted (or aborted: the two look alike here). Keep the history for a re-add.
            self.parked[state.req.sink] = state.frames[: state.num_generated].copy()
            while len(self.parked) > MAX_PARKED:
                self.parked.popitem(last=False)

    def check_histories(self) -> None:
        """The CHATTTS_VLLM_CHECK_ROWS check over every code row now (raises AssertionError)."""
        code = sorted(r for r, s in self.rows.items() if s.is_code)
        _check_histories(code, [self.rows[r] for r in code])

    # -- model inputs ------------------------------------------------------------------------
    def token_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor) -> TokenInputs | None:
        if not self.rows or not is_forward_context_available():
            return None
        qsl = _query_start_loc()
        if qsl is None:
            return None
        n = input_ids.shape[0]
        if self.timeline is not None:
            self.timeline.event("step", rows=len(qsl) - 1, tokens=n)
        pos = positions.cpu().numpy()
        codes = np.full((n, NUM_VQ), -1, dtype=np.int64)
        spk_mask = torch.zeros(n, dtype=torch.bool)
        spk_vecs = torch.zeros(n, HIDDEN_SIZE)
        for r, state in self.rows.items():
            if r + 1 >= len(qsl):
                continue
            lo, hi = int(qsl[r]), int(qsl[r + 1])
            if hi <= lo:
                continue
            codes[lo:hi] = state.token_codes(pos[lo:hi])
            sp = state.req.spk_position
            if state.speaker is not None and pos[lo] <= sp <= pos[hi - 1]:
                i = lo + int(sp - pos[lo])
                spk_mask[i] = True
                spk_vecs[i] = state.speaker
        device = input_ids.device
        return TokenInputs(codes=torch.from_numpy(codes).to(device), speaker_mask=spk_mask.to(device),
                           speaker_vectors=spk_vecs.to(device))

    def logits_layout(self, num_rows: int) -> LogitsLayout:
        code = [r for r, s in self.rows.items() if r < num_rows and s.is_code]
        if not code:
            return LogitsLayout("text")
        if len(code) == num_rows:
            return LogitsLayout("code")
        mask = torch.zeros(num_rows, dtype=torch.bool)
        mask[code] = True
        return LogitsLayout("mixed", mask)

    # -- sampling ----------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        """Samples every ChatTTS row; returns logits where each such row has one finite entry."""
        code = sorted(r for r, s in self.rows.items() if s.is_code and r < logits.shape[0])
        text = sorted(r for r, s in self.rows.items() if not s.is_code and r < logits.shape[0])
        emit: dict[int, int] = {}
        if code:
            emit.update(self._sample_code(code, logits, hidden))
        if text:
            emit.update(self._sample_text(text, logits))
        if emit:
            rows = torch.tensor(list(emit.keys()), dtype=torch.int64, device=logits.device)
            ids = torch.tensor(list(emit.values()), dtype=torch.int64, device=logits.device)
            logits[rows] = float("-inf")
            logits[rows, ids] = 0.0
        if self.timeline is not None:
            self.timeline.event("sampled")
        return logits

    def _row_params(self, states: list[RequestFrames], per_row: int) -> RowParams:
        def rep(values, dtype):
            return torch.tensor(values, dtype=dtype).repeat_interleave(per_row)

        if per_row == NUM_VQ:
            temperature = torch.tensor([s.req.temperature for s in states], dtype=torch.float32).flatten()
        else:
            temperature = rep([s.req.temperature[0] for s in states], torch.float32)
        return RowParams(
            temperature=temperature,
            top_p=rep([s.req.top_p for s in states], torch.float32),
            top_k=rep([s.req.top_k for s in states], torch.int64),
            repetition_penalty=rep([s.req.repetition_penalty for s in states], torch.float32),
            mask_eos=rep([s.num_generated < s.req.min_new_token for s in states], torch.bool),
            seed=rep([s.req.seed for s in states], torch.int64),
            counter=rep([s.num_generated for s in states], torch.int64),
            stream=torch.arange(per_row, dtype=torch.int64).repeat(len(states)),
        )

    def _sample_code(self, rows: list[int], logits: torch.Tensor,
                     hidden: torch.Tensor | None) -> dict[int, int]:
        states = [self.rows[r] for r in rows]
        idx = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        code_logits = split_code_logits(logits[idx]).reshape(len(rows) * NUM_VQ, -1).cpu()
        history = torch.from_numpy(np.stack([s.history(k) for s in states for k in range(NUM_VQ)]))
        codes = sample(code_logits, history, self._row_params(states, NUM_VQ), AUDIO_EOS)
        codes = codes.view(len(rows), NUM_VQ).numpy()
        hid = hidden[idx].float().cpu().numpy() if hidden is not None else None
        out: dict[int, int] = {}
        if self.check_rows:
            _check_histories(rows, states)
        for i, (r, s) in enumerate(zip(rows, states)):
            frame = codes[i]
            if (frame == AUDIO_EOS).any():
                out[r] = AUDIO_EOS
                continue
            j = s.num_generated
            s.frames[j] = frame
            if s.writer is not None and hid is not None:
                s.writer.write(j, frame, hid[i])
            out[r] = int(frame[0])
        return out

    def _sample_text(self, rows: list[int], logits: torch.Tensor) -> dict[int, int]:
        states = [self.rows[r] for r in rows]
        idx = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        text_logits = logits[idx, :NUM_TEXT_TOKENS].cpu()
        history = torch.from_numpy(np.stack([s.history(None) for s in states]))
        ids = sample(text_logits, history, self._row_params(states, 1), EBREAK_ID)
        return {r: int(i) for r, i in zip(rows, ids.tolist())}


def _check_histories(rows: list[int], states: list[RequestFrames]) -> None:
    for r, s in zip(rows, states):
        j = s.num_generated
        bad = np.flatnonzero(s.frames[:j, 0] != np.asarray(s.output_ids[:j]))
        if bad.size:
            b = int(bad[0])
            raise AssertionError(f"row {r} sink {s.req.sink} seed {s.req.seed}: frame history "
                                 f"disagrees with the engine's tokens at {b} of {j}: "
                                 f"{s.frames[b:b + 4, 0].tolist()} vs {list(s.output_ids[b:b + 4])}")


def _query_start_loc() -> np.ndarray | None:
    meta = get_forward_context().attn_metadata
    if isinstance(meta, dict) and meta:
        qsl = getattr(next(iter(meta.values())), "query_start_loc", None)
        if qsl is not None:
            return qsl.cpu().numpy()
    return None


class ChatTTSLogitsProcessor(LogitsProcessor):
    """The ChatTTS sampler for vLLM's V1 runner; requests must use temperature 0 (greedy)."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.state = V1BatchState(check_rows=os.environ.get("CHATTTS_VLLM_CHECK_ROWS") == "1")
        self._instance_id = vllm_config.instance_id
        self._attached = None

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        req = EngineRequest.from_extra_args(sampling_params.extra_args)
        if req is None:
            return
        if req.mode == "code" and len(req.temperature) != NUM_VQ:
            raise ValueError(f"chattts code requests need {NUM_VQ} temperatures")
        if not all(t > 0 for t in req.temperature) or not (0 < req.top_p <= 1) or req.top_k < 1:
            raise ValueError("chattts: temperature > 0, 0 < top_p <= 1 and top_k >= 1 are required")
        if req.sink is not None:
            frame_path(req.sink)  # raises ValueError on a key that is not a plain token
        if sampling_params.temperature != 0.0:
            raise ValueError("chattts requests sample in the ChatTTS sampler; send temperature=0")

    def is_argmax_invariant(self) -> bool:
        return False

    def _attach(self):
        model = live_model(self._instance_id)
        if model is not None and model is not self._attached:
            model.frame_inputs = self.state
            self._attached = model
        return self._attached

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self._attach()
        self.state.update(batch_update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.state.rows:
            return logits
        model = self._attach()
        hidden = model.last_hidden_states if model is not None else None
        return self.state.sample(logits, hidden)
