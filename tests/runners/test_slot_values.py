"""StagedSlotValues: arrivals staged on the host reach the slot tensors only at `apply`, in one
scatter per field, and equal what per-slot scalar writes (the old MRv2 add_request) would give."""
from __future__ import annotations

import numpy as np
import torch

from chattts_vllm.runners.slot_values import StagedSlotValues

FIELDS = {"is_code": ((), torch.bool, 0), "prompt_len": ((), torch.int64, 0),
          "spk_pos": ((), torch.int64, -1), "spk_vec": ((6,), torch.float32, 0.0),
          "temperature": ((4,), torch.float32, 1.0), "top_k": ((), torch.int64, 20),
          "seed": ((), torch.int64, 0)}


def _direct(num_slots: int, writes: list[tuple[int, dict]]) -> dict[str, torch.Tensor]:
    """The reference: each value written into its own tensor, one slot at a time."""
    out = {k: torch.full((num_slots, *shape), fill, dtype=dt) for k, (shape, dt, fill) in FIELDS.items()}
    for slot, values in writes:
        for k, v in values.items():
            out[k][slot] = torch.as_tensor(np.asarray(v)).to(out[k].dtype)
    return out


def test_initial_values_are_the_fills():
    sv = StagedSlotValues(FIELDS, 5, "cpu")
    assert (sv.gpu["spk_pos"] == -1).all() and (sv.gpu["top_k"] == 20).all()
    assert (sv.gpu["temperature"] == 1).all() and sv.gpu["temperature"].shape == (5, 4)
    assert sv.gpu["is_code"].dtype == torch.bool and not sv.gpu["is_code"].any()


def test_staged_values_land_at_apply_and_match_direct_writes():
    rng = np.random.default_rng(0)
    sv = StagedSlotValues(FIELDS, 8, "cpu")
    writes = []
    for slot in (3, 0, 7, 3):            # slot 3 twice in one step: the last values win
        values = dict(is_code=bool(rng.integers(2)), prompt_len=int(rng.integers(1, 900)),
                      spk_pos=int(rng.integers(-1, 50)), spk_vec=rng.standard_normal(6),
                      temperature=rng.random(4) + 0.1, top_k=int(rng.integers(1, 30)),
                      seed=int(rng.integers(0, 2**62)))
        sv.stage(slot, **values)
        writes.append((slot, values))
    before = {k: t.clone() for k, t in sv.gpu.items()}
    assert sv.pending == 3
    for k in FIELDS:                     # nothing reaches the tensors before apply
        assert torch.equal(sv.gpu[k], before[k])
    sv.apply()
    assert sv.pending == 0
    ref = _direct(8, writes)
    for k in FIELDS:
        assert torch.equal(sv.gpu[k], ref[k]), k
    assert sv.gpu["seed"][writes[1][0]] == writes[1][1]["seed"]     # int64 seeds stay exact


def test_partial_stage_keeps_other_fields_and_untouched_slots():
    sv = StagedSlotValues(FIELDS, 4, "cpu")
    sv.stage(1, temperature=[0.5] * 4, top_k=7, is_code=True)
    sv.apply()
    sv.stage(1, is_code=False)           # e.g. a plain-text request takes the slot
    sv.stage(2, seed=5)
    sv.apply()
    assert sv.gpu["top_k"].tolist() == [20, 7, 20, 20]
    assert sv.gpu["temperature"][1].tolist() == [0.5] * 4
    assert sv.gpu["is_code"].tolist() == [False, False, False, False]
    assert sv.gpu["seed"].tolist() == [0, 0, 5, 0]
    sv.apply()                           # nothing staged: a no-op
    assert sv.gpu["seed"].tolist() == [0, 0, 5, 0]
