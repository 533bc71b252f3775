"""Model runner V2 glue (the GPU fast path): per-slot frame state, inputs and the ChatTTS sampler.

MRv2 keeps requests in persistent slots and hands every hook the batch-row -> slot mapping
(`input_batch.idx_mapping`), so all per-request state lives in slot-indexed GPU tensors and every
step is a handful of gathers and scatters with no host sync (async scheduling stays on):

- `codes[slot, position]`: the 4 codes of each audio position (prompt-audio frames and generated
  frames, by absolute position; the last column is a trash row for writes that must not land);
  it is the next input, the penalty window and, after a preemption, the re-prefill input;
- per-slot parameters (temperature x4, top-p, top-k, penalty, min_new_token, seed) and the speaker.

`prepare_inputs` fills one persistent `inputs_embeds` buffer (CUDA graphs replay its address) with
the ChatTTS input embedding; the sampler runs the fused CUDA kernel (`ops.sample_codebooks_from
_buffer`, twin: gpt/sampling.py), emits code0 or 625, and commits the frame. Codes and hidden states
go to the front end through the same side channel as on V1, written by a native worker thread
after an async device-to-host copy (runners/outputs.py `FrameSink`). On CUDA the embedding and the
commit + record packing are one Triton launch each (kernels/frame_glue.py: at batch 1 the step is
host-bound and the eager glue was ~80 launches); their PyTorch twins (runners/frame_glue.py, the
model's `embed_tokens`) run on CPU or with `CHATTTS_VLLM_FUSED_GLUE=0`.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from vllm.v1.core.sched.output import NewRequestData
from vllm.v1.worker.gpu.input_batch import InputBatch, get_num_sampled_and_rejected
from vllm.v1.worker.gpu.model_states.default import DefaultModelState
from vllm.v1.worker.gpu.sample.output import SamplerOutput
from vllm.v1.worker.gpu.states import RequestState

from chattts_vllm import ops
from chattts_vllm.config import AUDIO_EOS, EBREAK_ID, NUM_TEXT_TOKENS, NUM_VQ
from chattts_vllm.gpt.model import LogitsLayout, TokenInputs, split_code_logits
from chattts_vllm.gpt.sampling import RowParams, sample
from chattts_vllm.params import EngineRequest
from chattts_vllm.runners.frame_glue import (commit_and_pack_torch, fused_glue_kernels,
                                             token_embeddings_torch)
from chattts_vllm.runners.outputs import FrameSink, record_size
from chattts_vllm.runners.slot_values import StagedSlotValues, upload
from chattts_vllm.timeline import timeline

logger = logging.getLogger(__name__)
MAX_PARKED = 256


class _NoPenalties:
    """The runner reads `penalties_state.output_bin_counts`; None turns vLLM's bin counting off."""

    output_bin_counts = None


class ChatTTSModelState(DefaultModelState):
    def __init__(self, vllm_config, model, encoder_cache, device):
        super().__init__(vllm_config, model, encoder_cache, device)
        S, L, H = self.max_num_reqs, self.max_model_len, model.config.hidden_size
        self.trash = L                                     # column for writes that must not land
        self.codes = torch.zeros(S, L + 1, NUM_VQ, dtype=torch.int32, device=device)
        self.is_code_np = np.zeros(S, dtype=bool)
        self.is_chattts_np = np.zeros(S, dtype=bool)
        f32, i64 = torch.float32, torch.int64
        self.values = StagedSlotValues({
            "is_code": ((), torch.bool, 0), "text_len": ((), i64, 0), "prompt_len": ((), i64, 0),
            "spk_pos": ((), i64, -1), "spk_vec": ((H,), f32, 0.0), "temperature": ((NUM_VQ,), f32, 1.0),
            "top_p": ((), f32, 1.0), "top_k": ((), i64, 20), "penalty": ((), f32, 1.0),
            "min_new": ((), i64, 0), "seed": ((), i64, 0)}, S, device)
        v = self.values.gpu
        self.is_code, self.text_len, self.prompt_len = v["is_code"], v["text_len"], v["prompt_len"]
        self.spk_pos, self.spk_vec, self.temperature = v["spk_pos"], v["spk_vec"], v["temperature"]
        self.top_p, self.top_k, self.penalty = v["top_p"], v["top_k"], v["penalty"]
        self.min_new, self.seed = v["min_new"], v["seed"]
        self.embeds = torch.zeros(self.max_num_tokens, H, dtype=self.dtype, device=device)
        self.glue = fused_glue_kernels(device)             # None: the PyTorch twins
        if self.glue is not None and getattr(model.model.embed_tokens, "tp_size", 1) != 1:
            self.glue = None                               # the kernel reads one unsharded table
        self.records = torch.zeros(S, record_size(H) // 4, dtype=torch.int32, device=device)
        self.slot_of: dict[str, int] = {}
        self.parked: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.sink = FrameSink(S, record_size(H) // 4)
        self.layout = LogitsLayout("text")
        self.timeline = timeline("engine")                 # None unless CHATTTS_VLLM_TIMELINE
        model.frame_inputs = self
        self._warm_commit_kernel()

    def _warm_commit_kernel(self) -> None:
        """Compile the commit kernel at start-up, with the argument types of a real step: vLLM's
        warm-up requests are plain text rows, which never reach it, so the first ChatTTS request
        compiled it (vLLM's JIT monitor flagged it in every server). No slot is a code slot yet,
        so nothing is committed; the records rows it writes are rewritten every step."""
        if self.glue is None:
            return
        dev, n = self.codes.device, 2
        i64 = dict(dtype=torch.int64, device=dev)
        try:
            self.glue.commit_and_pack(
                torch.zeros(n, NUM_VQ, **i64), self.codes, self.is_code, torch.zeros(n, **i64),
                torch.zeros(n, **i64), torch.zeros(n, **i64), torch.ones(n, dtype=torch.int32, device=dev),
                torch.zeros(n, self.records.shape[1] - 5, dtype=self.dtype, device=dev), self.trash,
                AUDIO_EOS, records=self.records)
        except Exception as e:  # a warm-up must not stop the engine: the first step compiles it
            logger.warning("chattts: commit kernel warm-up failed (%s); the first request compiles it", e)

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, req_index: int, new_req_data: NewRequestData) -> None:
        super().add_request(req_index, new_req_data)
        slot = req_index
        try:
            req = EngineRequest.from_extra_args(new_req_data.sampling_params.extra_args)
        except (TypeError, ValueError):  # malformed raw-API arguments must not kill the engine
            logger.warning("chattts: request %s has malformed chattts arguments; sampled greedily "
                           "as plain text", new_req_data.req_id)
            req = None
        if self.timeline is not None and req is not None:
            self.timeline.event("add", sink=req.sink)
        self.slot_of[new_req_data.req_id] = slot
        self.is_chattts_np[slot] = req is not None
        self.is_code_np[slot] = req is not None and req.mode == "code"
        # The file is sized once for every frame the request may write (records past it drop).
        prompt_len = len(new_req_data.prompt_token_ids or [])
        frames = new_req_data.sampling_params.max_tokens or self.max_model_len - prompt_len
        self.sink.open(slot, req.sink if self.is_code_np[slot] else None, frames)
        if req is None:
            self.values.stage(slot, is_code=False)
            return
        # Host rows only: `apply_staged_writes` sends every arrival of this step in one copy.
        temps = (req.temperature * NUM_VQ)[:NUM_VQ] if len(req.temperature) == 1 else req.temperature
        self.values.stage(slot, is_code=self.is_code_np[slot], temperature=temps, top_p=req.top_p,
                          top_k=req.top_k, penalty=req.repetition_penalty, min_new=req.min_new_token,
                          seed=req.seed, text_len=req.text_len, prompt_len=prompt_len,
                          spk_pos=req.spk_position if req.speaker is not None else -1)
        if req.speaker is not None:
            self.values.stage(slot, spk_vec=req.speaker_vector())
        if req.prompt_codes:
            pc = torch.tensor(req.prompt_codes, dtype=torch.int32)
            self.codes[slot, req.text_len:req.text_len + len(pc)] = self.upload(pc)
        parked = self.parked.pop(new_req_data.req_id, None)
        resumed = len(new_req_data.prefill_token_ids or []) - prompt_len
        if parked is not None:
            self.codes[slot].copy_(parked)
        elif resumed > 0:
            logger.warning("chattts: request %s resumed without its frame history; codes 1-3 of "
                           "its first %d frames are lost", new_req_data.req_id, resumed)

    def apply_staged_writes(self) -> None:
        super().apply_staged_writes()
        self.values.apply()

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        return upload(host, torch.device(self.device))

    def remove_request(self, req_id: str) -> None:
        slot = self.slot_of.pop(req_id, None)
        if slot is None:
            return
        self.sink.close(slot)
        if self.is_code_np[slot]:
            # Finished and preempted look alike here: keep the history for a possible resume.
            self.parked[req_id] = self.codes[slot].clone()
            while len(self.parked) > MAX_PARKED:
                self.parked.popitem(last=False)
        self.is_code_np[slot] = self.is_chattts_np[slot] = False

    # -- inputs ------------------------------------------------------------------------------
    def token_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor) -> TokenInputs | None:
        return None  # inputs_embeds always comes from prepare_inputs on this runner

    def _slot_of_tokens(self, input_batch: InputBatch, n: int) -> torch.Tensor:
        """[n] slot of each token (int32, as idx_mapping: the kernel reads it without a cast)."""
        if n == input_batch.num_reqs:           # one token per row (decode): row i is token i
            return input_batch.idx_mapping[:n]
        qsl = input_batch.query_start_loc[1:input_batch.num_reqs + 1]
        row = torch.searchsorted(qsl, torch.arange(n, device=qsl.device, dtype=qsl.dtype), right=True)
        return input_batch.idx_mapping[row.clamp(max=input_batch.num_reqs - 1)]

    def prepare_inputs(self, input_batch: InputBatch, req_states: RequestState) -> dict[str, Any]:
        out = super().prepare_inputs(input_batch, req_states)
        n = input_batch.num_tokens
        if self.timeline is not None:
            self.timeline.event("step", rows=input_batch.num_reqs, tokens=n)
        ids, pos = input_batch.input_ids[:n], input_batch.positions[:n]
        slot = self._slot_of_tokens(input_batch, n)
        state = (self.is_code, self.text_len, self.spk_pos, self.spk_vec, self.codes, self.trash)
        if self.glue is not None:
            emb = self.model.model.embed_tokens.weight
            self.glue.token_embeddings(self.embeds, ids, pos, slot, *state, emb,
                                       [e.weight for e in self.model.emb_code])
        else:
            self.embeds[:n] = token_embeddings_torch(self.model.embed_tokens, ids, pos.long(),
                                                     slot.long(), *state)
        self.layout = self._layout(input_batch.idx_mapping_np[:input_batch.num_reqs])
        out["inputs_embeds"] = self.embeds[:input_batch.num_tokens_after_padding]
        return out

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict[str, Any]:
        out = super().prepare_dummy_inputs(num_reqs, num_tokens)
        out["inputs_embeds"] = self.embeds[:num_tokens]
        return out

    def _layout(self, slots: np.ndarray) -> LogitsLayout:
        code = self.is_code_np[slots]
        if not code.any():
            return LogitsLayout("text")
        if code.all():
            return LogitsLayout("code", narrow=True)
        return LogitsLayout("mixed", self.upload(torch.from_numpy(code)))

    def logits_layout(self, num_rows: int) -> LogitsLayout:
        rows = self.layout.code_rows
        if rows is not None and len(rows) != num_rows:
            return LogitsLayout("text")
        return self.layout

    def custom_sampler(self, sampler):
        return ChatTTSSampler(self, sampler), None


class ChatTTSSampler:
    """Replaces vLLM's MRv2 sampler for ChatTTS rows; plain requests get a greedy text token."""

    def __init__(self, state: ChatTTSModelState, base) -> None:
        self.state = state
        self.req_states = base.req_states
        self.sampling_states = base.sampling_states
        self.penalties_state = _NoPenalties()

    def add_request(self, req_idx: int, prompt_len: int, sampling_params) -> None:
        self.sampling_states.add_request(req_idx, sampling_params)

    def apply_staged_writes(self) -> None:
        self.sampling_states.apply_staged_writes()

    def __call__(self, logits: torch.Tensor, input_batch: InputBatch) -> SamplerOutput:
        st = self.state
        num_reqs = input_batch.num_reqs
        slots_np = input_batch.idx_mapping_np[:num_reqs]
        slot = input_batch.idx_mapping[:num_reqs].long()
        pos = input_batch.positions[input_batch.logits_indices][:num_reqs].long()
        num_sampled, num_rejected = get_num_sampled_and_rejected(
            input_batch.seq_lens.new_ones(num_reqs), input_batch.seq_lens, input_batch.cu_num_logits,
            input_batch.idx_mapping, self.req_states.prefill_len.gpu)
        code_rows = st.is_code_np[slots_np]
        sampled = None
        if code_rows.any():
            sampled = self._sample_code(logits, input_batch, slot, pos, num_sampled)
        if not code_rows.all():
            text = self._sample_text(logits, slot, pos, slots_np)
            sampled = text if sampled is None else torch.where(st.is_code[slot], sampled, text)
        if st.timeline is not None:
            st.timeline.event("sampled")                # host side: the step's launches are queued
        return SamplerOutput(sampled_token_ids=sampled.view(-1, 1), logprobs_tensors=None,
                             num_nans=None, num_sampled=num_sampled, num_rejected=num_rejected)

    def _sample_code(self, logits, input_batch, slot, pos, num_sampled) -> torch.Tensor:
        st = self.state
        code_logits = split_code_logits(logits)
        first = st.prompt_len[slot]
        frame = (pos + 1 - first).clamp(min=0)          # index of the frame this row samples
        codes = ops.sample_codebooks_from_buffer(
            code_logits, st.codes, slot, first, frame, st.temperature[slot], st.top_p[slot],
            st.top_k[slot], st.penalty[slot], frame < st.min_new[slot], st.seed[slot], frame)
        hidden = st.model.last_hidden_states[:len(slot)]
        args = (codes, st.codes, st.is_code, slot, first, frame, num_sampled, hidden, st.trash,
                AUDIO_EOS)
        if st.glue is not None:
            sampled, records = st.glue.commit_and_pack(*args, records=st.records)
        else:
            sampled, records = commit_and_pack_torch(*args)
        self._export(input_batch, records)
        return sampled

    def _export(self, input_batch, records: torch.Tensor) -> None:
        """Async copy of the rows' side-channel records (marker 0: none), pushed to the sink
        behind it on the stream."""
        st = self.state
        n = len(records)
        host = st.sink.take_buffer()
        host[:n].copy_(records, non_blocking=True)
        st.sink.submit(input_batch.idx_mapping_np[:n], host, n)

    def _sample_text(self, logits, slot, pos, slots_np) -> torch.Tensor:
        """Refine rows (rare on the serving path) use the PyTorch twin; other requests are greedy."""
        st = self.state
        text = logits[:, :NUM_TEXT_TOKENS].float() if logits.shape[1] >= NUM_TEXT_TOKENS else None
        if text is None:
            return torch.zeros(len(slot), dtype=torch.int64, device=logits.device)
        greedy = text.argmax(dim=-1)
        if not st.is_chattts_np[slots_np].any():
            return greedy
        n = len(slot)
        step = (pos + 1 - st.prompt_len[slot]).clamp(min=0)
        hist = torch.full((n, 16), -1, dtype=torch.int64, device=logits.device)
        all_ids = self.req_states.all_token_ids.gpu
        for w in range(16):  # the last 16 generated ids (prompt excluded), -1 padded
            idx = st.prompt_len[slot] + step - 16 + w
            ok = idx >= st.prompt_len[slot]
            hist[:, w] = torch.where(ok, all_ids[slot, idx.clamp(min=0)].long(), -1)
        p = RowParams(temperature=st.temperature[slot, 0], top_p=st.top_p[slot], top_k=st.top_k[slot],
                      repetition_penalty=st.penalty[slot], mask_eos=step < st.min_new[slot],
                      seed=st.seed[slot], counter=step, stream=torch.zeros_like(step))
        refined = sample(text, hist, p, EBREAK_ID)
        chattts = st.upload(torch.from_numpy(st.is_chattts_np[slots_np]))
        return torch.where(chattts, refined, greedy)
