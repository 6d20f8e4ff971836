"""autotune.pick: the fastest config by timing, and the concurrent compile of the candidates before timing."""
import threading
import time

import pytest

from flashfx.codegen import autotune

CONFIGS = [{"XBLOCK": b} for b in (128, 256, 512, 1024)]


def test_without_tuning_the_first_config_is_used_and_nothing_compiles_ahead():
    compiled = []
    assert autotune.pick(CONFIGS, lambda c: None, tune=False, compile_one=compiled.append) == CONFIGS[0]
    assert compiled == []


def test_candidates_compile_concurrently_once_each(monkeypatch):
    monkeypatch.setenv("FLASHFX_COMPILE_THREADS", "4")
    inside, most, seen, lock = [0], [0], [], threading.Lock()

    def compile_one(c):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            seen.append(c["XBLOCK"])
        time.sleep(0.05)  # a compile: long enough for the others to start
        with lock:
            inside[0] -= 1
    autotune.precompile(CONFIGS, compile_one)
    assert sorted(seen) == [128, 256, 512, 1024] and most[0] > 1


def test_configs_that_differ_only_in_their_launch_compile_once(monkeypatch):
    monkeypatch.setenv("FLASHFX_COMPILE_THREADS", "4")
    configs = [dict(c, programs=p) for c in CONFIGS for p in (4, 8)]
    compiled, lock = [], threading.Lock()

    def compile_one(c):
        with lock:
            compiled.append(c["XBLOCK"])
    autotune.precompile(configs, compile_one, binary=lambda c: c["XBLOCK"])
    assert sorted(compiled) == [128, 256, 512, 1024]


def test_a_config_that_fails_to_compile_ahead_is_left_to_the_timing_loop(monkeypatch):
    monkeypatch.setenv("FLASHFX_COMPILE_THREADS", "2")

    def compile_one(c):
        if c["XBLOCK"] == 256:
            raise RuntimeError("out of resources: shared memory")
    autotune.precompile(CONFIGS, compile_one)  # no error: the serial compile reports what matters


def test_one_thread_means_no_compile_ahead(monkeypatch):
    monkeypatch.setenv("FLASHFX_COMPILE_THREADS", "1")
    compiled = []
    autotune.precompile(CONFIGS, compiled.append)
    assert compiled == []


@pytest.mark.parametrize("raw", ["0", "many", "-2"])
def test_a_bad_thread_count_is_named(monkeypatch, raw):
    monkeypatch.setenv("FLASHFX_COMPILE_THREADS", raw)
    with pytest.raises(ValueError, match="FLASHFX_COMPILE_THREADS"):
        autotune.compile_threads()
