"""Autotune picks on disk (kernels/tune_cache.py) with fake tuners: on a GPU a new process restores
them instead of re-benchmarking ~90 s of Decoder/Vocos kernels. No CUDA here, so load is forced."""
from __future__ import annotations

import json
import logging

import pytest
import triton

from chattts_vllm.audio.convnext import triton_kernels

tc = triton_kernels("tune_cache")
triton_kernels("convnext")             # registers its tuners now, not inside a test's patched state


def _hook(nargs: dict) -> None:     # as the TMA configs: a pre_hook, which Triton's cache refuses
    pass


class FakeTuner:
    """What tune_cache touches of a triton Autotuner: configs, cache, keys."""

    def __init__(self, configs: list[triton.Config], keys=("N", "K")):
        self.configs, self.cache, self.keys = configs, {}, list(keys)


def _configs(n: int = 3) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": 64}, num_warps=w, num_stages=3, pre_hook=_hook)
            for bm, w in [(64, 4), (128, 8), (64, 8), (256, 8)][:n]]


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "autotune.json"
    monkeypatch.setenv(tc.ENV, str(path))
    monkeypatch.setattr(tc, "_TUNERS", {})                  # convnext's tuners stay out of it
    monkeypatch.setattr(tc, "_path", None)
    monkeypatch.setattr(tc, "_loaded", False)
    monkeypatch.setattr(tc, "_atexit_registered", True)     # no save() at pytest's exit
    monkeypatch.setattr(tc, "_warned", set())
    return path


def _fresh(**tuners: FakeTuner) -> None:
    """A new process: new tuner objects under the same names."""
    tc._TUNERS.clear()
    for name, t in tuners.items():
        tc.register(name, t)


def _process(**tuners: FakeTuner) -> int:
    """A new process with these tuners that loads the file: the number of picks restored."""
    _fresh(**tuners)
    return tc.load(force=True)


def test_round_trip_restores_the_same_config_objects(cache_file):
    a, b = FakeTuner(_configs()), FakeTuner(_configs(), keys=["C"])
    assert _process(a=a, b=b) == 0                          # no file yet
    a.cache[(512, 2048, True, "torch.bfloat16")] = a.configs[1]
    a.cache[(2048, 512, False, "torch.bfloat16")] = a.configs[2]
    b.cache[(768,)] = b.configs[0]
    assert tc.save() == 3
    assert cache_file.is_file() and not list(cache_file.parent.glob("*.tmp"))

    a2, b2 = FakeTuner(_configs()), FakeTuner(_configs(), keys=["C"])
    assert _process(a=a2, b=b2) == 3
    assert a2.cache == {(512, 2048, True, "torch.bfloat16"): a2.configs[1],
                        (2048, 512, False, "torch.bfloat16"): a2.configs[2]}
    assert b2.cache[(768,)] is b2.configs[0]                 # the live object: its pre_hook included
    assert all(type(k) is tuple for k in a2.cache)
    key = next(k for k in a2.cache if k[0] == 512)
    assert key[2] is True and isinstance(key[3], str)        # bools stay bools, strings strings


def test_save_merges_with_the_file(cache_file):
    a = FakeTuner(_configs())
    _process(a=a)
    a.cache[(1, 2)] = a.configs[0]
    tc.save()
    a2 = FakeTuner(_configs())
    _process(a=a2)
    a2.cache[(3, 4)] = a2.configs[2]                          # tuned in the second process
    assert tc.save() == 2
    a3 = FakeTuner(_configs())
    _process(a=a3)
    assert a3.cache == {(1, 2): a3.configs[0], (3, 4): a3.configs[2]}


def test_nested_and_float_keys_come_back_as_tuples(cache_file):
    a = FakeTuner(_configs())
    _process(a=a)
    a.cache[(7, (1, "x", False), 0.5, None)] = a.configs[1]
    tc.save()
    a2 = FakeTuner(_configs())
    _process(a=a2)
    assert a2.cache == {(7, (1, "x", False), 0.5, None): a2.configs[1]}


def test_changed_config_list_ignores_old_entries(cache_file):
    a = FakeTuner(_configs())
    _process(a=a)
    a.cache[(1, 2)] = a.configs[1]
    tc.save()
    for changed in (FakeTuner(_configs(4)), FakeTuner(_configs(), keys=["K", "N"])):
        assert _process(a=changed) == 0 and changed.cache == {}


def test_tuner_without_picks_keeps_its_file_entries(cache_file):
    """A process with other configs (CHATTTS_TRITON_AUTOTUNE=0) that tunes nothing drops nothing."""
    a = FakeTuner(_configs())
    _process(a=a)
    a.cache[(1, 2)] = a.configs[1]
    tc.save()
    _process(a=FakeTuner(_configs()[:1]))
    tc.save()
    a2 = FakeTuner(_configs())
    assert _process(a=a2) == 1


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"version": 1, "tuners": {"a": 5}}',
                                  '{"version": 1, "tuners": {"a": {"fingerprint": 1, "picks": 3}}}',
                                  ""])
def test_corrupt_file_is_ignored(cache_file, text, caplog):
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text(text)
    a = FakeTuner(_configs())
    _fresh(a=a)
    with caplog.at_level(logging.WARNING):
        assert tc.load(force=True) == 0
    assert a.cache == {}
    if text in ("{not json", "[1, 2]"):
        assert "autotune cache" in caplog.text
    a.cache[(1, 2)] = a.configs[0]
    assert tc.save() == 1                                    # and the next save repairs the file
    assert json.loads(cache_file.read_text())["version"] == tc.VERSION


def test_bad_entries_and_indices_are_skipped(cache_file):
    a = FakeTuner(_configs())
    fp = tc.fingerprint(a)
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text(json.dumps({"version": 1, "tuners": {"a": {"fingerprint": fp, "picks": [
        [[1, 2], 9], [[3], -1], [[4], "1"], ["x", 0], [[5, [6, [7]]], 2], [[8], 1]]}}}))
    assert _process(a=a) == 2
    assert a.cache == {(5, (6, (7,))): a.configs[2], (8,): a.configs[1]}


def test_off_and_without_cuda(cache_file, monkeypatch):
    a = FakeTuner(_configs())
    _fresh(a=a)
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text(json.dumps({"version": 1, "tuners": {"a": {
        "fingerprint": tc.fingerprint(a), "picks": [[[1], 0]]}}}))
    monkeypatch.setattr(tc, "_cuda_ok", lambda: False)       # as on this CPU machine
    tc.ensure_loaded()                     # nothing is read, and save has no file to write
    assert a.cache == {} and tc.save() == 0
    for off in ("0", "off"):
        monkeypatch.setenv(tc.ENV, off)
        assert tc.cache_path() is None and tc.load(force=True) == 0
    monkeypatch.setenv(tc.ENV, "")
    default = tc.cache_path()
    assert default.parent.name == "chattts_vllm" and f"triton{triton.__version__}" in default.name


def test_interpreter_is_never_cached(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not tc._cuda_ok()


def test_convnext_registers_its_tuners():
    k = triton_kernels("convnext")
    names = {n for n, t in tc._TUNERS.items() if n.startswith("convnext.")}
    assert names == {"convnext.dwconv_ln", "convnext.linear_tma", "convnext.conv_tma",
                     "convnext.conv_gemm", "convnext.mlp_tma", "convnext.mlp"}
    assert tc._TUNERS["convnext.linear_tma"] is k._linear_tma_tuned
    assert all(len(tc.fingerprint(t)) == 40 for n, t in tc._TUNERS.items() if n in names)
