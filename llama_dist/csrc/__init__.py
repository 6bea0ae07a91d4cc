"""Our C++ CPU kernels, one extension built once per machine with torch's extension builder:
block_matmul.cpp (Q4_0, Q4_1 and Q8_0 weights times 8-bit activations, with a block's RMSNorm, SwiGLU and
residual folded in), decode_attention.cpp (a decoded token's rotary embedding, cache write and attention) and
decode_step.cpp (a decode step's blocks in one call).

`available()` builds and loads them on first use (tens of seconds, then cached under
~/.cache/torch_extensions/llama_dist; `make install` builds them ahead); without a compiler, or with
LLAMA_DIST_CPU_KERNELS=0, it says why and the int4/int8 weights use PyTorch's own packed kernels instead.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from ..distributed.settings import read_settings

SOURCES = sorted(Path(__file__).parent.glob("*.cpp"))
HEADERS = sorted(Path(__file__).parent.glob("*.h"))
BLOCK = 32  # weights per block, as GGUF's Q4_0, Q4_1 and Q8_0 store them


def _build_flags() -> tuple[str, list[str]]:
    """AVX-512 VNNI or AVX2 code where the CPU has it (each variant named apart, so a shared cache never hands
    it to an older CPU)."""
    capability, setting = torch.backends.cpu.get_cpu_capability(), read_settings().cpu_kernels
    avx2 = ["-mavx2", "-mfma", "-mf16c"]
    if capability == "AVX512" and getattr(torch.cpu, "_is_vnni_supported", lambda: False)() and setting == "auto":
        return "avx512vnni", [*avx2, "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512vnni"]
    if capability in ("AVX2", "AVX512") and setting in ("auto", "avx2"):
        return "avx2", avx2
    return "scalar", []


def _build_name(variant: str, flags: list[str]) -> str:
    """The extension's name: its variant and a digest of what it is built from, so a cached build of
    other source, flags or torch is never loaded."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + " ".join(flags).encode()
                            + torch.__version__.encode())
    return f"llama_dist_cpu_{variant}_{digest.hexdigest()[:12]}"


@functools.cache
def available() -> bool:
    if read_settings().cpu_kernels == "off":
        return False
    variant, flags = _build_flags()
    name = _build_name(variant, flags)
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    built = cache / "llama_dist" / name / f"{name}.so"
    # built before (and no build of it under way, which holds the lock): load it without torch's extension
    # builder, whose import alone is slow
    if built.exists() and not (built.parent / "lock").exists():
        torch.ops.load_library(str(built))
    elif not _build(name, flags, built.parent):
        return False
    # output shapes, for torch.compile
    for op in ("q4_1_matmul", "q4_0_matmul", "q8_0_matmul"):
        torch.library.register_fake(f"llama_dist::{op}")(lambda x, groups, n, *folds: x.new_empty((*x.shape[:-1], n)))
    torch.library.register_fake("llama_dist::decode_blocks")(lambda x, *args: torch.empty_like(x))
    torch.library.register_fake("llama_dist::cpu_decode_attention")(
        lambda qkv, rope, cache_k, cache_v, block_table, slots, pos, n_rep: qkv.new_empty(
            (qkv.shape[0], cache_k.shape[1] * n_rep * cache_k.shape[3])))
    return True


def _build(name: str, flags: list[str], directory: Path) -> bool:
    from torch.utils import cpp_extension

    venv_bin = Path(sys.executable).parent  # pip's ninja, when this environment is used without activation
    if shutil.which("ninja") is None and (venv_bin / "ninja").exists():
        os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    directory.mkdir(parents=True, exist_ok=True)
    # torch's builder takes a lock file that a killed build leaves behind, and every later build then waits on it
    # forever; builds of this directory take turns on an OS lock instead (released when its holder dies), and its
    # holder clears torch's file: any left there is a dead build's
    with open(directory / "build.lock", "w") as turn:
        fcntl.flock(turn, fcntl.LOCK_EX)
        (directory / "lock").unlink(missing_ok=True)
        try:
            cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], is_python_module=False,
                               build_directory=str(directory), extra_cflags=["-O3", "-fopenmp", *flags],
                               extra_ldflags=["-fopenmp"])
        except Exception as e:  # no compiler or ninja: the packed PyTorch kernels still work, only slower
            warnings.warn(f"llama-dist: the C++ CPU kernels could not be built ({e}); using PyTorch's int4/int8 "
                          "kernels instead (slower). Install a C++ compiler and `pip install ninja` to build them.")
            return False
    return True
