"""Our one-row decode kernel (llama_dist/kernels/gemv_triton.py), or with --rows the quantized tensor-core kernel
(quant_matmul_triton.py), compiled for a GPU on any machine, GPU or not, and what its main loop costs per weight:
instructions and the widths of its global loads.

    python benchmarks/kernel_ptx.py --format int4 --block_n 64 --block_k 256 --split_k 8 --warps 8 [--norm]
    python benchmarks/kernel_ptx.py --format int4 --rows 32 --block_n 128 --block_k 128 --warps 4 [--swap]

Prints one JSON line: instructions per iteration and per weight, the registers a thread, programs an SM holds
at once and bytes spilled (ptxas's report; `--max_registers` caps the registers as a config's maxnreg does), the
global loads by width, every instruction's count (commonest first); then the same loop in the machine code ptxas
made of it (SASS, read by the nvdisasm in Triton's wheel), which is what the GPU issues.

Triton compiles for a named target without a device (its wheel carries ptxas), so a tile's code can be read where
no GPU is lent: a load that is 8 bytes wide where 16 would do, or a layout that sends every group's sum through
shuffles, shows here before a device call measures it. Counts are of PTX (before ptxas's own optimisation), per
thread, for the loop that streams the weights; the argument attributes are those Triton's launcher gives
16-byte-aligned tensors and dimensions that are multiples of 16.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_dist.kernels import gemv_triton, quant_matmul_triton  # noqa: E402

WEIGHT = {"bf16": "*bf16", "int8": "*i8", "int4": "*i32"}
POINTERS = {"x_ptr": "*bf16", "s_ptr": "*bf16", "g_ptr": "*bf16", "r_ptr": "*bf16", "y_ptr": "*bf16",
            "sums_ptr": "*fp32", "tickets_ptr": "*i32", "slots_ptr": "*bf16", "counters_ptr": "*i32",
            "arrivals_ptr": "*i32", "peers_ptr": "*i64", "epoch_ptr": "*i32"}


def one_row_constants(**chosen) -> dict:
    """The one-row kernel's constexprs: every flag off (one process, no peer slots, whole inputs a program), the
    weights' eviction policy and split-K's fixed-point sums as the model launches them, then `chosen` (format flags,
    folded work, the tile)."""
    return {"SCALED": False, "INT4": False, "DP4A": False, "NORM": False, "GATED": False, "RESIDUAL": False,
            "WORLD": 1, "X_SLOTS": False, "R_SLOTS": False, "Y_SLOTS": False, "SPLIT_K": 1,
            "EVICTION": gemv_triton._weights_eviction(), "FIXED_POINT": gemv_triton.SPLIT_FIXED_POINT, **chosen}


def compile_for(fn, constants: dict, types: dict, arch: int = 90, aligned: tuple[str, ...] = (), **options):
    """Triton kernel fn compiled for sm_{arch} on this machine, no GPU needed (Triton's wheel carries ptxas):
    constants are its constexprs, types the other arguments' Triton types (i32 where not named), `aligned` the
    arguments known to be multiples of 16."""
    signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in aligned}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def longest_loop(lines: list[str], label: str, branch: str) -> list[str]:
    """The longest run of lines from a label to a branch back to it (the weights' loop), branch included, labels
    left out; `label` and `branch` are patterns whose first group is the label's name."""
    starts: dict[str, int] = {}
    body: list[str] = []
    best: list[str] = []
    for line in lines:
        named = re.match(label, line)
        if named:
            starts[named.group(1)] = len(body)
            continue
        body.append(line)
        back = re.search(branch, line)
        if back and back.group(1) in starts and len(body) - starts[back.group(1)] > len(best):
            best = body[starts[back.group(1)]:]
    return best


def loop_body(ptx: str) -> list[str]:
    """The weights' loop in PTX, its instructions alone (no branch back, comments, braces, debug labels or line
    records)."""
    lines = [line.strip() for line in ptx.splitlines()]
    lines = [line for line in lines if line and (line.startswith("$L__BB") or not line.startswith(
        ("$", "//", "{", "}", ".loc")))]
    return longest_loop(lines, r"^(\$L__BB\d+_\d+):", r"^(?:@%p\d+\s+)?bra(?:\.uni)?\s+(\$L__BB\d+_\d+);")[:-1]


def sass_loop(cubin: bytes) -> list[str] | None:
    """The weights' loop in the machine code (branch back included), or None without nvdisasm."""
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    if not nvdisasm.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout
    lines = [m.group(1) or m.group(2) for m in (re.match(r"^\s*(?:(\.L_x_\d+:)|/\*[0-9a-f]+\*/\s+(.*?)\s*;)", line)
                                              for line in text.splitlines()) if m]
    return longest_loop(lines, r"^(\.L_x_\d+):$", r"BRA\s+(?:`\()?(\.L_x_\d+)")


SHARED_KB = {80: 164, 86: 100, 89: 100, 90: 228}  # shared memory an SM, by compute capability


def residency(ptx: str, arch: int, warps: int, shared: int) -> tuple[int | None, int | None, int | None]:
    """(registers a thread, as ptxas allocates them; programs an SM can hold at once: 65,536 registers in units
    of 256 a warp, 64 warps, 32 programs, the SM's shared memory; bytes a thread spills to local memory), or
    (None, None, None) without ptxas. The ptxas is the one Triton compiled with (its wheel carries one per PTX
    version)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except (ImportError, AttributeError, RuntimeError):
        return None, None, None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        report = subprocess.run([ptxas, f"-arch=sm_{arch}{'a' if arch >= 90 else ''}", "-v", f.name, "-o",
                                 "/dev/null"], capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    per_warp = -(-registers // 8) * 8 * 32
    programs = min(65536 // (per_warp * warps), 64 // warps, 32,
                   SHARED_KB.get(arch, 100) * 1024 // shared if shared else 32)
    spilled = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return registers, programs, spilled


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--format", choices=sorted(WEIGHT), default="int4")
    p.add_argument("--block_n", type=int, default=64)
    p.add_argument("--block_k", type=int, default=256)
    p.add_argument("--split_k", type=int, default=1)
    p.add_argument("--warps", type=int, default=8)
    p.add_argument("--norm", action="store_true", help="the RMSNorm folded in (the fused q/k/v and w1/w3 products)")
    p.add_argument("--rows", type=int, default=0, help="the tensor-core kernel's tile rows (int8, int4); 0: one row")
    p.add_argument("--swap", action="store_true", help="the tensor-core tile as (W x^T)^T")
    p.add_argument("--stages", type=int, default=3, help="the tensor-core kernel's pipeline stages")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100/H200")
    p.add_argument("--max_registers", type=int, default=0, help="a thread's registers capped (maxnreg); 0: not")
    a = p.parse_args()
    if a.rows:
        if a.format == "bf16":
            p.error("--rows takes int8 or int4 weights")
        fn = quant_matmul_triton._quant_matmul_kernel
        constants = {"INT4": a.format == "int4", "BLOCK_M": a.rows, "BLOCK_N": a.block_n, "BLOCK_K": a.block_k,
                     "SPLIT_K": a.split_k, "SWAP": a.swap}
    else:
        fn = gemv_triton._gemv_kernel
        constants = one_row_constants(SCALED=a.format == "int8", INT4=a.format == "int4", DP4A=a.format == "int8",
                                      NORM=a.norm, BLOCK_N=a.block_n, BLOCK_K=a.block_k, SPLIT_K=a.split_k)
    pointers = {**POINTERS, "w_ptr": WEIGHT[a.format]}
    options = {"num_warps": a.warps, **({"num_stages": a.stages} if a.rows else {}),
               **({"maxnreg": a.max_registers} if a.max_registers else {})}
    kernel = compile_for(fn, constants, {**pointers, "eps": "fp32"}, a.arch, aligned=(*pointers, "N", "K"),
                         **options)
    body = loop_body(kernel.asm["ptx"])
    ops = collections.Counter(line.split()[1] if line.startswith("@") else line.split()[0] for line in body)
    weights = a.block_n * a.block_k / (32 * a.warps)  # per thread per iteration
    sass = sass_loop(kernel.asm["cubin"])
    registers, programs, spilled = residency(kernel.asm["ptx"], a.arch, a.warps, kernel.metadata.shared)
    sass_ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", i).split()[0].split(".")[0] for i in sass or [])
    print(json.dumps({"format": a.format, "tile": [a.block_n, a.block_k], "split_k": a.split_k, "warps": a.warps,
                      "rows": a.rows, "swap": a.swap,
                      "norm": a.norm, "arch": a.arch, "instructions": sum(ops.values()), "weights": weights,
                      "per_weight": round(sum(ops.values()) / weights, 2),
                      "registers": registers, "programs_per_sm": programs, "spill_bytes": spilled,
                      "global_loads": {op: n for op, n in ops.items() if op.startswith("ld.global")},
                      "counts": dict(ops.most_common()),
                      "sass_per_weight": round(len(sass) / weights, 2) if sass is not None else None,
                      "sass_counts": dict(sass_ops.most_common())}))


if __name__ == "__main__":
    main()
