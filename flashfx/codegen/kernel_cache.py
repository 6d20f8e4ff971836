"""The on-disk kernel cache: generated modules and autotune choices under `config.cache_dir`, keyed by the source
hash, the device and the versions, so that a second process imports the same module, finds Triton's compiled
binary (Triton's own cache is pointed under the same directory) and skips autotuning."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import sys
import tempfile
from types import ModuleType
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

from flashfx import _compat

_MODULES: Dict[str, ModuleType] = {}  # in-process: cache key -> imported module


@functools.lru_cache(maxsize=None)
def device_tag() -> str:
    """What a compiled kernel depends on besides its source: GPU, torch and Triton versions."""
    if torch.cuda.is_available() and not _compat.triton_interpreting():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = f"{props.name}-sm{props.major}{props.minor}"
    else:
        gpu = "cpu-interpreter"
    return f"{gpu}|torch-{torch.__version__}|triton-{_compat.triton_version()}"


def code_only(source: str) -> str:
    """Generated source without its comments (they name the graph's nodes, which differ from layer to layer)."""
    lines = (re.sub(r"\s*#.*$", "", line) for line in source.splitlines())
    return "\n".join(line for line in lines if line.strip()) + "\n"


def cache_key(source: str) -> str:
    return hashlib.sha256(f"{device_tag()}\n{code_only(source)}".encode()).hexdigest()[:24]


def shared_name(name: str, source: str) -> Tuple[str, str]:
    """(name, source) with the group's per-graph index replaced by a hash of the body: the same group in every
    layer of a model becomes one source, so it is written, compiled and autotuned once, not once per layer."""
    base = re.sub(r"_\d+$", "", name)
    own_name = re.compile(rf"\b{re.escape(name)}\b")
    shared = f"{base}_{hashlib.sha256(own_name.sub(base, code_only(source)).encode()).hexdigest()[:10]}"
    return shared, own_name.sub(shared, source)


def _write_atomic(path: str, text: str) -> None:
    """Write via a temporary file and rename, so a concurrent reader never sees half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_module(name: str, source: str, cache_dir: str) -> Tuple[ModuleType, bool]:
    """Import the generated module for `source`, writing it under `cache_dir` first if needed.

    Returns (module, hit) where hit says the file was already on disk (written by this or an earlier process).
    """
    key = cache_key(source)
    if key in _MODULES:
        return _MODULES[key], True
    path = os.path.join(cache_dir, "kernels", f"{name}_{key}.py")
    hit = os.path.exists(path)
    if hit:  # the same code (another layer's copy, whose comments differ) is a hit: Triton's cache stays valid
        with open(path) as f:
            hit = code_only(f.read()) == code_only(source)
    if not hit:
        _write_atomic(path, source)
    mod_name = f"flashfx_kernels.{name}_{key}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # Triton's JIT reads the source back through inspect
    spec.loader.exec_module(module)
    _MODULES[key] = module
    return module, hit


def load_choices(cache_dir: str, key: str) -> Dict[str, Any]:
    path = os.path.join(cache_dir, "autotune", f"{key}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def save_choice(cache_dir: str, key: str, bucket: str, choice: Dict[str, Any]) -> None:
    choices = load_choices(cache_dir, key)
    choices[bucket] = choice
    _write_atomic(os.path.join(cache_dir, "autotune", f"{key}.json"), json.dumps(choices, indent=1, sort_keys=True))


@contextlib.contextmanager
def triton_binaries_under(cache_dir: str) -> Iterator[None]:
    """Point Triton's compiled-binary cache under `cache_dir` while a kernel compiles (Triton >= 3.4 has knobs)."""
    knobs = getattr(__import__("triton"), "knobs", None)
    cache = getattr(knobs, "cache", None)
    if cache is None or _compat.triton_interpreting():
        yield
        return
    old: Optional[str] = cache.dir
    cache.dir = os.path.join(cache_dir, "triton")
    try:
        yield
    finally:
        cache.dir = old
