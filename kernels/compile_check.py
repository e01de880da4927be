"""Compile the kernels for a CUDA target without a GPU, and read ptxas's register
and spill report: catches compile-only errors the interpreter accepts (tile sizes,
dtypes) and gives a first look at register pressure of a tile config.

    python -m kernels.compile_check [--arch 90] [--dtype bf16] [--config 128,128,64,8,3]
                                    [--kernels fwd,grad] [--json]

Run it without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.runtime import interpreting
from kernels.tile_configs import (
    SHARED_MEMORY,
    TABLE,
    TileConfig,
    fit_shared_memory,
    parse_config,
    table_arch,
)

_CONSTS = ("BM", "BN", "BD", "WITH_COLS", "UPCAST", "PRECISION")
KERNELS = ("fwd", "grad", "sig_fwd", "sig_grad")
_ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
_TABLE_KIND = {"fwd": "ce_fwd", "grad": "ce_grad", "sig_fwd": "sig_fwd", "sig_grad": "sig_grad"}
# Shared memory one block may use (the opt-in maximum, bytes) per NVIDIA compute capability (major * 10
# + minor), from the CUDA programming guide: what `shared_memory_per_block_optin` reads on such a card.
# Families differ: sm_86/89 (RTX 30xx/40xx) and sm_120/121 (RTX 50xx, GB10) have 99 KiB, not the
# 163/227 KiB of the A100/H100 whose table entries they take; a config fitted to those passed the check
# and failed on the card with OutOfResources.
ARCH_SHARED_MEMORY = {
    75: 64 * 1024,
    **dict.fromkeys((80, 87), 166_912),
    **dict.fromkeys((86, 89, 120, 121), 101_376),
    **dict.fromkeys((90, 100, 101, 103, 110), 232_448),
}
# Any other number reached LLVM as an unknown `sm_<arch>` and aborted it (`--arch 9` for Hopper:
# "LLVM ERROR: Cannot select", exit 134).
KNOWN_ARCHES = tuple(sorted(ARCH_SHARED_MEMORY))


def _kernel(kind: str):
    from kernels.grad_backward import _grad_chunk_kernel
    from kernels.lse_forward import _lse_fwd_kernel
    from kernels.sigmoid_tiles import _sigmoid_fwd_kernel, _sigmoid_grad_kernel

    return {
        "fwd": _lse_fwd_kernel,
        "grad": _grad_chunk_kernel,
        "sig_fwd": _sigmoid_fwd_kernel,
        "sig_grad": _sigmoid_grad_kernel,
    }[kind]


def _signature(fn, dtype: str) -> dict:
    """Argument types from the names: q/k in the input dtype, the gradient workspace
    ``out_ptr`` in the input dtype (fp32 for fp32), other pointers fp32, the rest i32."""
    sig = {}
    for name in fn.arg_names:
        if name in _CONSTS:
            sig[name] = "constexpr"
        elif name in ("q_ptr", "k_ptr", "out_ptr"):
            sig[name] = f"*{dtype}"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_kernel(
    kind: str, dtype: str, with_cols: bool, cfg: TileConfig, arch: int = 90, precision: str | None = None
):
    """Compile ``kind`` (one of KERNELS) for ``sm_<arch>``; with_cols: the symmetric variant;
    ``precision``: the ``tl.dot`` input precision of fp32 inputs (None: "ieee", what a launch runs
    under torch's default matmul precision; "tf32" under ``set_float32_matmul_precision("high")``)."""
    fn = _kernel(kind)
    consts = {
        "BM": cfg.BM,
        "BN": cfg.BN,
        "BD": cfg.BD,
        "UPCAST": False,
        "PRECISION": (precision or "ieee") if dtype == "fp32" else "tf32",
    }
    if "WITH_COLS" in fn.arg_names:
        consts["WITH_COLS"] = with_cols
    signature = _signature(fn, dtype)
    # As a real launch on aligned tensors at a shape like 32768 x 768 specialises them: every
    # pointer, size and stride divisible by 16. Without the hints Triton compiles the unvectorised,
    # unpipelined variant, whose shared memory and spills are not what the GPU runs.
    attrs = {
        (fn.arg_names.index(name),): [["tt.divisibility", 16]]
        for name, kind in signature.items()
        if kind != "constexpr"
    }
    src = ASTSource(fn, signature, consts, attrs)
    return triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )


def table_configs(
    arch: int, element_size: int = 2, shared_memory: int | None = None
) -> list[tuple[str, TileConfig]]:
    """The distinct (kernel, config) pairs a launch on ``sm_<arch>`` with ``element_size``-byte
    inputs takes from the built-in table: the table's arch by the launches' rule (sm_86/sm_89 use
    the sm_80 entries, sm_100/sm_120 the sm_90 ones) and each config fitted to ``shared_memory``
    bytes per block (fp32 inputs run narrower slabs than the table's). None: the table family's
    figure (``SHARED_MEMORY``); a launch fits the card's own, ``ARCH_SHARED_MEMORY[arch]``."""
    name = table_arch(arch // 10)
    limit = shared_memory or SHARED_MEMORY[name]
    pairs = {
        (k, fit_shared_memory(e.config, element_size, limit, kind=tk))
        for (a, tk, _), e in TABLE.items()
        if a == name
        for k in KERNELS
        if _TABLE_KIND[k] == tk
    }
    return sorted(pairs, key=lambda p: (KERNELS.index(p[0]), p[1].as_list()))


def ptxas_usage(ptx: str, arch: int = 90) -> dict | None:
    """Registers and spill bytes from ``ptxas -v`` (Triton's bundled ptxas), or None."""
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    version = re.search(r"\.version (\d+)\.(\d+)", ptx)
    # The bundled ptxas may be older than the PTX Triton emits; the Blackwell one is newer.
    for name in ("ptxas-blackwell", "ptxas"):
        exe = bindir / name
        if not exe.exists():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            Path(src).write_text(ptx)
            suffix = "a" if arch >= 90 else ""
            r = subprocess.run(
                [str(exe), f"-arch=sm_{arch}{suffix}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                capture_output=True,
                text=True,
            )
        if r.returncode != 0:
            continue
        regs = re.search(r"Used (\d+) registers", r.stderr)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
        return {
            "registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else 0,
            "spill_load_bytes": int(spill.group(2)) if spill else 0,
            "ptx_version": ".".join(version.groups()) if version else None,
        }
    return None


def _parse_config(ap: argparse.ArgumentParser, text: str) -> TileConfig:
    """``BM,BN,BD,num_warps,num_stages`` as a config compiled Triton can build, else a usage error."""
    try:
        return parse_config(text)
    except ValueError as e:
        ap.error(f"--config {e}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m kernels.compile_check``: compile and print the register report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, major * 10 + minor (90: H100)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument(
        "--config",
        action="append",
        default=None,
        help="BM,BN,BD,num_warps,num_stages (repeatable); default: the arch's table entries",
    )
    ap.add_argument(
        "--precision",
        default="ieee",
        choices=["ieee", "tf32"],
        help="tl.dot precision of fp32 inputs: ieee (torch's default) or tf32 (matmul precision 'high')",
    )
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"subset of {','.join(KERNELS)}")
    ap.add_argument("--json", action="store_true", help="print one JSON object per kernel")
    args = ap.parse_args(argv)
    if args.arch not in KNOWN_ARCHES:
        ap.error(
            f"--arch {args.arch}: give the compute capability as major * 10 + minor (90 for H100, 80 for "
            f"A100); one of {', '.join(map(str, KNOWN_ARCHES))}"
        )
    wanted = [k for k in args.kernels.split(",") if k]
    unknown = sorted(set(wanted) - set(KERNELS))
    if unknown:
        ap.error(f"--kernels: unknown {','.join(unknown)}; choose from {','.join(KERNELS)}")
    if args.config:
        pairs = [(k, _parse_config(ap, c)) for c in args.config for k in wanted]
    else:
        launched = table_configs(args.arch, _ELEMENT_SIZE[args.dtype], ARCH_SHARED_MEMORY[args.arch])
        pairs = [(k, c) for k, c in launched if k in wanted]
    if interpreting():
        # Interpreted kernels have no compiled form: Triton failed with an AttributeError.
        ap.error("TRITON_INTERPRET is on; run it without (e.g. `env -u TRITON_INTERPRET python -m ...`)")
    for kind, cfg in pairs:
        for with_cols in (False, True) if kind in ("fwd", "grad") else (False,):
            k = compile_kernel(kind, args.dtype, with_cols, cfg, args.arch, args.precision)
            usage = ptxas_usage(k.asm["ptx"], args.arch)
            limit = ARCH_SHARED_MEMORY[args.arch]
            # Compiling does not check shared memory; the launch does, on the card (OutOfResources).
            fits = k.metadata.shared <= limit
            if args.json:
                print(
                    json.dumps(
                        {
                            "kernel": kind,
                            "with_cols": with_cols,
                            "config": cfg.as_list(),
                            "arch": args.arch,
                            "dtype": args.dtype,
                            "precision": args.precision if args.dtype == "fp32" else None,
                            "shared_bytes": k.metadata.shared,
                            "shared_limit": limit,
                            "fits_shared_memory": fits,
                            "ptxas": usage,
                        }
                    )
                )
            else:
                over = "" if fits else f" OVER sm_{args.arch}'s {limit} B per block: fails at launch"
                print(f"{kind:8} cols={int(with_cols)} {cfg} smem={k.metadata.shared}{over} {usage}")


if __name__ == "__main__":
    main()
