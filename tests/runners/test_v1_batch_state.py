"""V1BatchState mirrors vLLM's persistent batch; a request's frame history must survive every way
it can leave the batch and come back (issue 2, preemption)."""
from __future__ import annotations

import numpy as np
import pytest
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from chattts_vllm.params import EngineRequest
from chattts_vllm.runners.outputs import new_key
from chattts_vllm.runners.v1 import V1BatchState


def _params(seed: int) -> SamplingParams:
    req = EngineRequest(mode="code", seed=seed, temperature=[0.3] * 4, top_p=0.7, top_k=20,
                        repetition_penalty=1.05, min_new_token=0, text_len=5, sink=new_key())
    return SamplingParams(temperature=0.0, max_tokens=50, stop_token_ids=[625],
                          extra_args=req.to_extra_args())


def _grow(state, row: int, outputs: list[int], n: int, rng) -> None:
    """n sampled frames for the request at `row` (what _sample_code and vLLM do per step)."""
    s = state.rows[row]
    for _ in range(n):
        frame = rng.integers(0, 625, 4)
        s.frames[s.num_generated] = frame
        outputs.append(int(frame[0]))


def _update(state, removed=(), added=(), moved=(), size=0):
    state.update(BatchUpdate(batch_size=size, removed=list(removed), added=list(added),
                             moved=list(moved)))


def test_history_survives_a_slot_vacated_by_a_move():
    """vLLM's condense fills an emptied row by a one-way move and drops that row from `removed`."""
    rng = np.random.default_rng(0)
    st = V1BatchState(check_rows=True)
    pa, pb, pc = _params(1), _params(2), _params(3)
    oa, ob, oc = [], [], []
    _update(st, added=[(0, pa, [1] * 5, oa), (1, pb, [1] * 5, ob), (2, pc, [1] * 5, oc)], size=3)
    for row, out in ((0, oa), (1, ob), (2, oc)):
        _grow(st, row, out, 7, rng)
    history = st.rows[1].frames[:7].copy()
    # Request b (row 1) is unscheduled; condense moves row 2 into row 1 and reports only the move.
    _update(st, moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)], size=2)
    assert st.retired_by_move == 1
    assert st.rows[1].req.seed == 3 and 2 not in st.rows
    # b comes back later (vLLM hands over the same live output list) at another row.
    _update(st, added=[(2, pb, [1] * 5, ob)], size=3)
    np.testing.assert_array_equal(st.rows[2].frames[:7], history)
    st.check_histories()


def test_history_survives_removal_swap_and_slot_reuse():
    rng = np.random.default_rng(1)
    st = V1BatchState(check_rows=True)
    ps = [_params(i) for i in range(4)]
    outs = [[] for _ in range(4)]
    _update(st, added=[(i, ps[i], [1] * 5, outs[i]) for i in range(3)], size=3)
    for i in range(3):
        _grow(st, i, outs[i], 4 + i, rng)
    want = {i: st.rows[i].frames[: 4 + i].copy() for i in range(3)}
    _update(st, moved=[(0, 2, MoveDirectionality.SWAP)], size=3)          # reorder
    assert st.rows[0].req.seed == 2 and st.rows[2].req.seed == 0
    _update(st, added=[(2, ps[3], [1] * 5, outs[3])], size=3)             # row 2 reused: 0 leaves
    _update(st, removed=[1], size=2)                                      # 1 leaves
    _update(st, added=[(1, ps[0], [1] * 5, outs[0]), (3, ps[1], [1] * 5, outs[1])], size=4)
    np.testing.assert_array_equal(st.rows[1].frames[:4], want[0])
    np.testing.assert_array_equal(st.rows[3].frames[:5], want[1])
    st.check_histories()


def test_history_check_catches_a_lost_history():
    st = V1BatchState(check_rows=True)
    out = [5, 6, 7]
    _update(st, added=[(0, _params(9), [1] * 5, out)], size=1)   # re-entry with no parked history
    with pytest.raises(AssertionError, match="frame history disagrees"):
        st.check_histories()
