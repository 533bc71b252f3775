"""ChatTTS's sampling chain on batched tensors: the one implementation every runner calls.

Order, exactly as upstream (per row; a code-pass request has one row per codebook):
temperature -> windowed repetition penalty -> top-p -> top-k (both keep >= 3) -> EOS mask below
min_new_token -> draw. All parameters are per row, so requests with different settings share a batch.

The draw is Gumbel-max with counter-based noise keyed by (seed, frame index, codebook, code). A
request's draws therefore depend on nothing but its own seed and position: not on its batch mates,
its batch row, chunked-prefill retries or preemption. The fused CUDA kernel (csrc/) hashes the same
way, so it can be checked bit for bit against this file.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from chattts_vllm.config import MIN_TOKENS_TO_KEEP, REPETITION_WINDOW

_M32 = 0xFFFFFFFF


@dataclass
class RowParams:
    """Per-row sampling parameters; R rows (batch x codebooks for the code pass)."""

    temperature: torch.Tensor          # [R] float32
    top_p: torch.Tensor                # [R] float32
    top_k: torch.Tensor                # [R] int64
    repetition_penalty: torch.Tensor   # [R] float32
    mask_eos: torch.Tensor             # [R] bool: step < min_new_token
    seed: torch.Tensor                 # [R] int64
    counter: torch.Tensor              # [R] int64: frame index (generated tokens so far)
    stream: torch.Tensor               # [R] int64: codebook index (0 for the text pass)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    return logits / temperature.unsqueeze(1)


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor,
                             penalty: torch.Tensor) -> torch.Tensor:
    """ChatTTS's penalty: alpha = penalty ** count over the window; logit<0 times alpha, else divided.

    `history` [R, W] holds each row's last W generated ids, -1 where the window is not yet full.
    Upstream also zeroes the counts of rows >= 625 (a bug: it meant vocabulary columns, so the
    penalty silently switches off beyond 156 requests in a batch); here every row is penalised.
    """
    rows, vocab = logits.shape
    valid = history >= 0
    counts = torch.zeros(rows, vocab + 1, dtype=torch.float32, device=logits.device)
    idx = torch.where(valid, history, torch.full_like(history, vocab))
    counts.scatter_add_(1, idx, valid.to(torch.float32))
    alpha = torch.pow(penalty.unsqueeze(1), counts[:, :vocab])
    return torch.where(logits < 0, logits * alpha, logits / alpha)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor,
                min_keep: int = MIN_TOKENS_TO_KEEP) -> torch.Tensor:
    """Drops the low tail whose total probability is <= 1 - top_p; keeps the best `min_keep`."""
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p).unsqueeze(1)
    remove_sorted[:, -min_keep:] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor,
                min_keep: int = MIN_TOKENS_TO_KEEP) -> torch.Tensor:
    """Keeps every logit >= the k-th largest (ties kept), k = max(top_k, min_keep)."""
    vocab = logits.shape[-1]
    k = top_k.clamp(min=min_keep, max=vocab)
    sorted_desc = torch.sort(logits, dim=-1, descending=True).values
    kth = sorted_desc.gather(1, (k - 1).unsqueeze(1))
    return logits.masked_fill(logits < kth, float("-inf"))


def process_logits(logits: torch.Tensor, history: torch.Tensor, p: RowParams,
                   eos_id: int) -> torch.Tensor:
    """The processed distribution's logits: softmax of this is what the draw samples from."""
    x = apply_temperature(logits.float(), p.temperature)
    x = apply_repetition_penalty(x, history, p.repetition_penalty)
    x = apply_top_p(x, p.top_p)
    x = apply_top_k(x, p.top_k)
    x[:, eos_id] = torch.where(p.mask_eos, torch.full_like(x[:, eos_id], float("-inf")), x[:, eos_id])
    return x


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser on int64 tensors (multipliers < 2**31 keep products in int64)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def counter_uniform(seed: torch.Tensor, counter: torch.Tensor, stream: torch.Tensor,
                    vocab: int) -> torch.Tensor:
    """Uniform noise in (0, 1), [R, vocab], a pure function of (seed, counter, stream, token)."""
    h = _mix32(seed & _M32)
    h = _mix32(h ^ ((seed >> 32) & _M32))
    h = _mix32(h ^ (counter & _M32))
    h = _mix32(h ^ (stream & _M32) ^ 0x27D4EB2F)
    tok = _mix32(torch.arange(vocab, dtype=torch.int64, device=seed.device) + 0x165667B1)
    bits = _mix32(h.unsqueeze(1) ^ tok.unsqueeze(0))
    # 23 bits: (2**23 - 0.5) / 2**23 is exact in fp32, so u < 1 and -log(-log(u)) stays finite (24
    # bits would round the top value to 1.0, making the noise +inf and a masked token drawable).
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def draw(processed: torch.Tensor, p: RowParams) -> torch.Tensor:
    """One draw per row from softmax(processed) by Gumbel-max; returns int64 [R]."""
    u = counter_uniform(p.seed, p.counter, p.stream, processed.shape[-1])
    gumbel = -torch.log(-torch.log(u))
    return torch.argmax(processed + gumbel, dim=-1)


def sample(logits: torch.Tensor, history: torch.Tensor, p: RowParams, eos_id: int) -> torch.Tensor:
    return draw(process_logits(logits, history, p, eos_id), p)


# -- the fused kernel's layout (chattts_vllm.ops.sample_codebooks falls back to these) ------------

def frame_params(temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                 penalty: torch.Tensor, mask_eos: torch.Tensor, seed: torch.Tensor,
                 counter: torch.Tensor) -> RowParams:
    """Per-request code-pass parameters (temperature [B, 4], the rest [B]) as RowParams over the
    B*4 rows, batch-major then codebook; the stream of row (b, k) is k."""
    b, nq = temperature.shape

    def rep(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.to(dtype).repeat_interleave(nq)

    return RowParams(
        temperature=temperature.to(torch.float32).reshape(-1),
        top_p=rep(top_p, torch.float32),
        top_k=rep(top_k, torch.int64),
        repetition_penalty=rep(penalty, torch.float32),
        mask_eos=rep(mask_eos, torch.bool),
        seed=rep(seed, torch.int64),
        counter=rep(counter, torch.int64),
        stream=torch.arange(nq, dtype=torch.int64, device=temperature.device).repeat(b),
    )


def sample_frames(logits: torch.Tensor, history: torch.Tensor, temperature: torch.Tensor,
                  top_p: torch.Tensor, top_k: torch.Tensor, penalty: torch.Tensor,
                  mask_eos: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor, eos_id: int,
                  processed: torch.Tensor | None = None) -> torch.Tensor:
    """`sample` on logits [B, 4, V] and history [B, 4, W]; codes [B, 4]. Fills `processed`
    [B, 4, V] with the processed logits if given."""
    b, nq, vocab = logits.shape
    p = frame_params(temperature, top_p, top_k, penalty, mask_eos, seed, counter)
    x = process_logits(logits.reshape(b * nq, vocab), history.reshape(b * nq, -1).long(), p, eos_id)
    if processed is not None:
        processed.copy_(x.view(b, nq, vocab))
    return draw(x, p).view(b, nq)


def codebook_windows(codes: torch.Tensor, slot: torch.Tensor, first_frame: torch.Tensor,
                     num_frames: torch.Tensor, window: int = REPETITION_WINDOW) -> torch.Tensor:
    """Penalty windows [B, 4, window] read from a per-slot code buffer `codes` [S, T, 4]: request b's
    generated frame i sits at codes[slot[b], first_frame[b] + i]; its window is the last
    min(num_frames[b], window) of them, -1 padded on the left."""
    i = torch.arange(window, device=codes.device)
    j = num_frames.to(torch.int64).unsqueeze(1)
    pos = first_frame.to(torch.int64).unsqueeze(1) + j - window + i          # [B, W]
    valid = i >= window - j.clamp(min=0, max=window)
    ids = codes[slot.to(torch.int64).unsqueeze(1), pos.clamp(0, codes.shape[1] - 1)]  # [B, W, 4]
    ids = torch.where(valid.unsqueeze(-1), ids.to(torch.int64), -1)
    return ids.transpose(1, 2)
