"""Per-slot request values on the GPU, staged on the host at arrival and sent up once per step.

Model runner V2 keeps each request's values (temperature, top-p, seed, prompt length, speaker, ...)
in slot-indexed GPU tensors. Writing them one scalar at a time when a request arrives costs a dozen
tiny host-to-device writes per request (about 1 ms each request on the H100 host profile): a burst
of 64 arrivals held one engine step for tens of milliseconds, and at batch 512 it was ~8% of the
GPT time. Here `stage` only fills host rows; `apply` (the runner's `apply_staged_writes`, once per
step with arrivals) sends the rows of every staged slot in one pinned, non-blocking copy per dtype
and scatters them into each field with one `index_copy_`.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

# A field: its per-slot shape (() for a scalar), its GPU dtype and its initial value.
FieldSpec = tuple[tuple[int, ...], torch.dtype, float]


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host rows to the device without a stream sync (a pageable copy would wait for the stream,
    stalling async scheduling); torch's caching host allocator keeps the pinned copy alive."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class StagedSlotValues:
    """`gpu[name]`: (num_slots, *shape) tensors the kernels read; `stage(slot, **values)` then
    `apply()` updates them. Float fields travel as float32, integer and bool fields as int64."""

    def __init__(self, fields: Mapping[str, FieldSpec], num_slots: int, device: torch.device | str):
        self.device = torch.device(device)
        self.gpu: dict[str, torch.Tensor] = {}
        self._layout: dict[str, tuple[bool, int, int]] = {}      # name -> (is float, first col, width)
        cols = {True: 0, False: 0}
        for name, (shape, dtype, fill) in fields.items():
            self.gpu[name] = torch.full((num_slots, *shape), fill, dtype=dtype, device=self.device)
            is_float = dtype.is_floating_point
            width = int(np.prod(shape)) if shape else 1
            self._layout[name] = (is_float, cols[is_float], width)
            cols[is_float] += width
        # Host mirrors: every field's row side by side, so one slot's values are one row per dtype.
        self._host = {True: np.zeros((num_slots, cols[True]), np.float32),
                      False: np.zeros((num_slots, cols[False]), np.int64)}
        for name, (_shape, _dtype, fill) in fields.items():
            is_float, c, w = self._layout[name]
            self._host[is_float][:, c:c + w] = fill
        self._staged: dict[int, None] = {}                       # insertion-ordered set of slots

    def stage(self, slot: int, **values) -> None:
        """Set fields of `slot` (scalars, sequences or arrays of the field's size) on the host; the
        GPU sees them after the next `apply`. Fields not named keep their last value."""
        for name, value in values.items():
            is_float, c, w = self._layout[name]
            self._host[is_float][slot, c:c + w] = np.asarray(value).reshape(-1)
        self._staged[slot] = None

    def apply(self) -> None:
        """Send every staged slot's rows: one copy per dtype, one scatter per field."""
        if not self._staged:
            return
        slots = np.fromiter(self._staged, dtype=np.int64, count=len(self._staged))
        self._staged.clear()
        # The slot index travels as the last integer column: one upload for it and the int fields.
        ints = np.concatenate([self._host[False][slots], slots[:, None]], axis=1)
        up_i = upload(torch.from_numpy(ints), self.device)
        up_f = upload(torch.from_numpy(self._host[True][slots]), self.device)
        index = up_i[:, -1].contiguous()
        for name, (is_float, c, w) in self._layout.items():
            dst = self.gpu[name]
            src = (up_f if is_float else up_i)[:, c:c + w].reshape(len(slots), *dst.shape[1:])
            dst.index_copy_(0, index, src.to(dst.dtype))

    @property
    def pending(self) -> int:
        return len(self._staged)
