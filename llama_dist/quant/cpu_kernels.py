"""The C++ CPU block matmuls (cpu_kernels.cpp), built once per machine with torch's extension builder.

`available()` builds and loads them on first use (~20 s, cached under ~/.cache/torch_extensions);
without a compiler, or with LLAMA_DIST_CPU_KERNELS=0, it says why and the int4/int8 weights use
PyTorch's own packed kernels instead.
"""
from __future__ import annotations

import functools
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
BLOCK = 32  # weights per block, as GGUF's Q4_1 and Q8_0 store them


def _build_flags() -> tuple[str, list[str]]:
    """AVX2 code where the CPU has it (named apart, so a shared cache never hands it to an older CPU)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512") and os.environ.get("LLAMA_DIST_CPU_KERNELS") != "scalar":
        return "avx2", ["-mavx2", "-mfma", "-mf16c"]
    return "scalar", []


@functools.cache
def available() -> bool:
    if os.environ.get("LLAMA_DIST_CPU_KERNELS") == "0":
        return False
    from torch.utils import cpp_extension

    variant, flags = _build_flags()
    venv_bin = Path(sys.executable).parent  # pip's ninja, when this environment is used without activation
    if shutil.which("ninja") is None and (venv_bin / "ninja").exists():
        os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        cpp_extension.load(name=f"llama_dist_cpu_{variant}", sources=[str(SOURCE)], is_python_module=False,
                           extra_cflags=["-O3", "-fopenmp", *flags], extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler or ninja: the packed PyTorch kernels still work, only slower
        warnings.warn(f"llama-dist: the CPU block kernels could not be built ({e}); using PyTorch's int4/int8 "
                      "kernels instead (slower). Install a C++ compiler and `pip install ninja` to build them.")
        return False
    # output shapes, for torch.compile
    torch.library.register_fake("llama_dist::q8_0_matmul")(
        lambda x, blocks: x.new_empty((x.shape[0], blocks.shape[0]), dtype=torch.float32))
    torch.library.register_fake("llama_dist::q4_1_matmul")(
        lambda x, groups, n: x.new_empty((x.shape[0], n), dtype=torch.float32))
    return True
