"""Compile the kernels for a CUDA target without a GPU, and read ptxas's register
and spill report: catches compile-only errors the interpreter accepts (tile sizes,
dtypes) and gives a first look at register pressure of a tile config.

    python -m kernels.compile_check [--arch 90] [--dtype bf16] [--config 128,128,64,8,3] [--json]

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

from kernels.runtime import TileConfig

_INTS = ("N", "M", "D", "stride_q", "stride_k")
_CONSTS = ("BM", "BN", "BD", "WITH_COLS", "UPCAST", "PRECISION")


def _signature(kind: str, dtype: str) -> dict:
    if kind == "fwd":
        ptrs = ["row_m_ptr", "row_l_ptr", "pos_ptr", "col_m_ptr", "col_l_ptr"]
        ints = list(_INTS) + ["cols_per_split", "label_offset"]
        sig = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "scale_ptr": "*fp32"}
        sig.update({p: "*fp32" for p in ptrs})
    else:
        ptrs = ["row_m_ptr", "row_log2l_ptr", "g_row_ptr", "col_m_ptr", "col_log2l_ptr", "g_col_ptr"]
        ints = list(_INTS) + ["stride_out", "label_offset"]
        sig = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "scale_ptr": "*fp32"}
        sig.update({p: "*fp32" for p in ptrs})
        sig["out_ptr"] = "*bf16" if dtype == "bf16" else "*fp32"
        sig["dscale_ptr"] = "*fp32"
    sig.update({i: "i32" for i in ints})
    sig.update({c: "constexpr" for c in _CONSTS})
    return sig


def compile_kernel(kind: str, dtype: str, with_cols: bool, cfg: TileConfig, arch: int = 90):
    """Compile ``fwd`` (_lse_fwd_kernel) or ``grad`` (_grad_chunk_kernel) for ``sm_<arch>``."""
    from kernels.grad_backward import _grad_chunk_kernel
    from kernels.lse_forward import _lse_fwd_kernel

    fn = _lse_fwd_kernel if kind == "fwd" else _grad_chunk_kernel
    consts = {"BM": cfg.BM, "BN": cfg.BN, "BD": cfg.BD, "WITH_COLS": with_cols, "UPCAST": False,
              "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    src = ASTSource(fn, _signature(kind, dtype), consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


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
            r = subprocess.run([str(exe), f"-arch=sm_{arch}{suffix}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                               capture_output=True, text=True)
        if r.returncode != 0:
            continue
        regs = re.search(r"Used (\d+) registers", r.stderr)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
        return {"registers": int(regs.group(1)) if regs else None,
                "spill_store_bytes": int(spill.group(1)) if spill else 0,
                "spill_load_bytes": int(spill.group(2)) if spill else 0,
                "ptx_version": ".".join(version.groups()) if version else None}
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--config", action="append", default=None,
                    help="BM,BN,BD,num_warps,num_stages (repeatable); default: the GPU config")
    ap.add_argument("--json", action="store_true", help="print one JSON object per kernel")
    args = ap.parse_args(argv)
    from kernels.runtime import _GPU_CONFIG

    configs = [TileConfig(*map(int, c.split(","))) for c in args.config] if args.config else [_GPU_CONFIG]
    for cfg in configs:
        for kind in ("fwd", "grad"):
            for with_cols in (False, True):
                k = compile_kernel(kind, args.dtype, with_cols, cfg, args.arch)
                usage = ptxas_usage(k.asm["ptx"], args.arch)
                if args.json:
                    print(json.dumps({"kernel": kind, "with_cols": with_cols, "config": list(cfg.__dict__.values()),
                                      "arch": args.arch, "dtype": args.dtype, "shared_bytes": k.metadata.shared,
                                      "ptxas": usage}))
                else:
                    print(f"{kind:4} cols={int(with_cols)} {cfg} smem={k.metadata.shared} {usage}")


if __name__ == "__main__":
    main()
