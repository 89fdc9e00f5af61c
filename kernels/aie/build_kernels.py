"""Builds the NPU GEMM (and fused attention) kernels for a model and writes the manifest the xrt backend reads.

One kernel per distinct padded weight shape (K, N) and row height m_rows. Kernels whose programs differ only in
their runtime sequence (the height) share one xclbin and so one hardware context; each has its own instruction
stream. Needs mlir-aie (IRON, aiecc) + Peano (llvm-aie) + xclbinutil; not an NPU.

--dtype f32_f32 (default; issue 15's dataflow v2, gemm_design.iron_program_f32): fp32 A read in place and rounded
in the core, C written in place, exact heights >= 256: 256 (small calls, staged) plus every height the models'
GEMMs have once their symbolic sizes are given with --dim (model_shapes.gemm_work), e.g. 1500 and 3000 for a
Whisper encoder window; --m-rows adds heights. Programs depend on K, and on N where the A slab stays in the
memtile (its repeat count). --dtype bf16_f32: the v1 kernels (host-converted bf16 A, heights multiples of 256,
one xclbin per K). --dtype i8_f32 (issue 13, gemm_int8_design.py): the int8 A8W8 kernels, heights multiples of
256 as bf16_f32 (the host quantises A per row and stages it in the device layout), one xclbin per K, core kernels
from gemm_int8.cc. --dtype attn_f32 --attention TxH[:SCALE] (issue 15, attention_design.py): the fused attention
kernel for self-attention over T rows and H heads of 64 (scale default 1, as whisper-base's encoder has it; see
parse_attention), Q/K/V fp32 read in place
with row stride H*64, O written in place as [H, T, 64] (the EP's fused node output); core kernels from
attention_bf16.cc; one xclbin per (T, H, scale).

    python3 kernels/aie/build_kernels.py --model encoder_model.onnx --dim batch_size=1 \\
        --out ~/.cache/onnxruntime-ep-xdna/kernels
    python3 kernels/aie/build_kernels.py --shape 512x2048 --shape 2048x512 --m-rows 1500 --dry-run

Toolchain (wheels from GitHub releases, not on PyPI):
    pip install mlir_aie -f https://github.com/Xilinx/mlir-aie/releases/expanded_assets/latest-wheels-2
    pip install llvm-aie -f https://github.com/Xilinx/llvm-aie/releases/expanded_assets/nightly
    export PEANO_INSTALL_DIR=$(pip show llvm-aie | sed -n 's/^Location: //p')/llvm-aie
    xclbinutil: from XRT (Debian sid: libxrt-utils; AMD: /opt/xilinx/xrt/bin)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import attention_design as design_attn  # noqa: E402
import gemm_design as design  # noqa: E402
import gemm_int8_design as design_i8  # noqa: E402
import iron_layer  # noqa: E402
from model_shapes import gemm_work, padded, parse_dims, weight_shapes  # noqa: E402

CONTRACT_VERSION = 1  # kernels/xrt/manifest.h kContractVersion
FORMAT = "onnxruntime-ep-xdna-kernels"
DEFAULT_OUT = Path.home() / ".cache" / "onnxruntime-ep-xdna" / "kernels"


class ToolchainMissing(RuntimeError):
    pass


def find_toolchain() -> dict:
    """Locates aiecc, Peano's clang++, the AIE API headers and xclbinutil; raises ToolchainMissing naming each gap."""
    missing, found = [], {}
    try:
        import aie  # noqa: F401  (mlir-aie's Python package)
        import aie.iron  # noqa: F401

        found["mlir_aie_python"] = os.path.dirname(aie.__file__)
    except ImportError as e:
        missing.append(f"mlir-aie Python package ('import aie.iron' failed: {e})")
    aiecc = shutil.which("aiecc.py") or shutil.which("aiecc")
    if aiecc:
        found["aiecc"] = aiecc
    else:
        missing.append("aiecc.py (installed with the mlir_aie wheel)")

    include = None
    roots = [os.environ.get("MLIR_AIE_INSTALL_DIR", "")]
    if "mlir_aie_python" in found:
        p = Path(found["mlir_aie_python"])
        roots += [str(p.parents[i]) for i in range(min(4, len(p.parents)))]
    for r in filter(None, roots):
        if (Path(r) / "include" / "aie_api" / "aie.hpp").is_file():
            include = str(Path(r) / "include")
            break
    if include:
        found["aie_api_include"] = include
    else:
        missing.append("AIE API headers include/aie_api/aie.hpp (set MLIR_AIE_INSTALL_DIR)")

    peano = os.environ.get("PEANO_INSTALL_DIR", "")
    if peano and (Path(peano) / "bin" / "clang++").is_file():
        found["peano"] = peano
    else:
        missing.append("Peano (llvm-aie): set PEANO_INSTALL_DIR to the llvm-aie install dir (with bin/clang++)")

    xclbinutil = os.environ.get("AIE_XCLBINUTIL_PATH") or shutil.which("xclbinutil")
    if not xclbinutil and Path("/opt/xilinx/xrt/bin/xclbinutil").is_file():
        xclbinutil = "/opt/xilinx/xrt/bin/xclbinutil"
    if xclbinutil:
        found["xclbinutil"] = xclbinutil
    else:
        missing.append("xclbinutil (XRT tools: Debian sid libxrt-utils, or /opt/xilinx/xrt/bin)")
    if missing:
        raise ToolchainMissing("the AIE kernel toolchain is not installed; missing:\n  - " + "\n  - ".join(missing) +
                               "\nSee the header of kernels/aie/build_kernels.py and docs/npu.md (no NPU is needed "
                               "to build kernels).")
    return found


def plan(shapes: set[tuple[int, int]], m_rows: list[int], dtype: str = "bf16_f32",
         heights: dict | None = None, stream_a: bool = False) -> tuple[list[dict], list[str]]:
    """Kernel variants to build (sorted), and the shapes the design cannot take (they stay on the CPU). heights:
    (K, N) -> the exact heights a model needs for that shape (f32_f32 only), built besides m_rows."""
    out, skipped = [], []
    for m in m_rows:
        if dtype in ("bf16_f32", "i8_f32") and (m <= 0 or m % design.BLOCK_M):
            raise ValueError(f"--m-rows {m}: {dtype} heights must be positive multiples of {design.BLOCK_M}")
        if dtype == "f32_f32" and m < design.BLOCK_M:
            raise ValueError(f"--m-rows {m}: f32_f32 heights must be >= {design.BLOCK_M}")
    for k, n in sorted(shapes):
        rows = sorted(set(m_rows) | set((heights or {}).get((k, n), ())))
        try:
            for m in rows:
                if dtype == "f32_f32":
                    design.check_plan_f32(design.plan_f32(m, k, n, stream_a))
                elif dtype == "i8_f32":
                    design_i8.check_transfers(m, k, n)
                else:
                    design.check_shape(m, k, n)
        except ValueError as e:
            skipped.append(f"{k}x{n}: {e}")
            continue
        out.extend({"K": k, "N": n, "m_rows": m, "dtype": dtype} for m in rows)
    return out, skipped


def program_key(v: dict, stream_a: bool = False) -> tuple:
    """Variants of equal keys have the same program outside the runtime sequence (one xclbin)."""
    if v["dtype"] == "f32_f32":
        return design.plan_f32(v["m_rows"], v["K"], v["N"], stream_a).static_key
    return (v["dtype"], v["K"])  # bf16_f32 and i8_f32: the core program depends on K only


def describe(v: dict, stream_a: bool = False) -> str:
    """One dry-run line: the variant and, for f32_f32, its dataflow as recorded from the IRON program."""
    line = f"  K={v['K']:5} N={v['N']:5} m_rows={v['m_rows']:5} {v['dtype']}"
    if v["dtype"] != "f32_f32":
        return line
    p = design.plan_f32(v["m_rows"], v["K"], v["N"], stream_a)
    rec = iron_layer.Recorder()
    design.iron_program_f32(p, rec)  # records the program: the same calls a real build makes
    transfers = rec.runtimes[0].transfers
    overlap = len(p.blocks) * design.BLOCK_M - p.M
    a = (f"A slab resident ({p.a_l2_len * 4 // 1024} KiB x{p.a_depth}, sent {p.a_repeat}x)" if p.resident
         else f"A streamed ({v['N'] // design.BLOCK_N} pass(es))")
    return (line + f": {a}, {len(p.blocks)} block(s)" + (f" (last overlaps {overlap} rows)" if overlap else "") +
            f", {len(transfers)} shim transfers, memtile {p.memtile_bytes() // 1024} KiB, "
            f"L1 {p.l1_bytes() // 1024} KiB")


def _static_part(mlir: str) -> str:
    """The design without its runtime sequence: what goes into the xclbin."""
    start = mlir.find("aiex.runtime_sequence")
    if start < 0:
        return mlir
    depth, i = 0, mlir.index("{", start)
    while i < len(mlir):
        depth += {"{": 1, "}": -1}.get(mlir[i], 0)
        if depth == 0:
            break
        i += 1
    return mlir[:start] + mlir[i + 1:]


def run(cmd: list[str], cwd: Path, log: Path) -> None:
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} ... failed (exit {r.returncode}); see {log}")


def parse_attention(s: str) -> dict:
    """TxH[:SCALE] -> an attn_f32 variant (checked against the design)."""
    m = re.fullmatch(r"(\d+)[xX](\d+)(?::([0-9.eE+-]+))?", s.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"attention '{s}': expected TxH[:SCALE], e.g. 1500x8")
    T, H = int(m.group(1)), int(m.group(2))
    # The backend runs a kernel only for the node's exact fp32 scale: the product of the constant scales the EP reads
    # through. Default 1: whisper-base as optimum exports it folds 1/8 into q_proj. A declined node's log line names
    # the scale it needs (torch's SDPA export with sqrt(1/8) on Q and on K^T multiplies back to 0.12499999).
    scale = float(np.float32(float(m.group(3)))) if m.group(3) else 1.0
    try:
        pl = design_attn.plan(T, H)  # Q, K, V [T, H*64]; O [H, T, 64], as the EP's fused attention node has them
        design_attn.check_plan(pl)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"attention '{s}': {e}") from e
    return {"dtype": "attn_f32", "T": T, "H": H, "ld": pl.ld, "ldo": pl.ldo, "o_head": pl.o_head, "scale": scale}


def describe_attention(v: dict) -> str:
    rec = iron_layer.Recorder()
    design_attn.iron_program(v["T"], v["H"], v["scale"], rec, v["ld"], v["ldo"], v["o_head"])
    return (f"  T={v['T']:5} H={v['H']:3} scale={v['scale']:g} attn_f32: {design_attn.passes(v['T'])} pass(es) per "
            f"head, {len(design_attn.key_tiles(v['T']))} key tiles, {len(rec.runtimes[0].transfers)} shim "
            f"transfers, L1 {sum(design_attn.l1_bytes().values()) // 1024} KiB")


def build_attention(variants: list[dict], out: Path, tools: dict, work: Path) -> dict:
    """attn_f32 kernels: attention_bf16.o and one xclbin per (T, H, scale) (all of them are constants of the
    program)."""
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    obj = work / design_attn.KERNEL_OBJECT
    run([str(Path(tools["peano"]) / "bin" / "clang++"), "--target=aie2-none-unknown-elf", "-O2", "-std=c++20",
         "-DNDEBUG", "-Wno-parentheses", "-Wno-attributes", "-Wno-macro-redefined", f"-I{tools['aie_api_include']}",
         "-c", str(HERE / "attention_bf16.cc"), "-o", str(obj)], work, work / "peano.log")
    entries = []
    for v in variants:
        name = f"attn_t{v['T']}_h{v['H']}_s{hashlib.sha256(repr(v['scale']).encode()).hexdigest()[:8]}"
        d = work / name
        d.mkdir(exist_ok=True)
        shutil.copy2(obj, d / obj.name)
        (d / "design.mlir").write_text(str(design_attn.iron_module(v["T"], v["H"], v["scale"], v["ld"], v["ldo"],
                                                                   v["o_head"])))
        os.environ.setdefault("AIE_XCLBINUTIL_PATH", tools["xclbinutil"])
        run([tools["aiecc"], "--no-aiesim", "--no-xchesscc", "--no-xbridge", "--no-compile-host",
             f"--peano={tools['peano']}", "--aie-generate-npu-insts", "--npu-insts-name=insts.bin",
             "--aie-generate-xclbin", "--xclbin-name=final.xclbin", "design.mlir"], d, d / "aiecc.log")
        shutil.copy2(d / "insts.bin", out / f"{name}.insts.bin")
        shutil.copy2(d / "final.xclbin", out / f"{name}.xclbin")
        entries.append({**v, "xclbin": f"{name}.xclbin", "insts": f"{name}.insts.bin", "kernel": "MLIR_AIE"})
        print(f"built {name}")
    return manifest(entries)


def build(variants: list[dict], out: Path, tools: dict, work: Path, stream_a: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    int8 = {v["dtype"] for v in variants} == {"i8_f32"}
    if int8 != any(v["dtype"] == "i8_f32" for v in variants):
        raise ValueError("one build per dtype family: i8_f32 kernels link gemm_int8.o, the others gemm_bf16.o")
    obj_name, source = (design_i8.KERNEL_OBJECT, "gemm_int8.cc") if int8 else (design.KERNEL_OBJECT, "gemm_bf16.cc")
    obj = work / obj_name
    run([str(Path(tools["peano"]) / "bin" / "clang++"), "--target=aie2-none-unknown-elf", "-O2", "-std=c++20",
         "-DNDEBUG", "-Wno-parentheses", "-Wno-attributes", "-Wno-macro-redefined", f"-I{tools['aie_api_include']}",
         "-c", str(HERE / source), "-o", str(obj)], work, work / "peano.log")

    xclbins: dict[str, str] = {}  # static MLIR hash -> xclbin file name
    shape_xclbin: dict[tuple, str] = {}  # (dtype, K, N) -> xclbin: the backend runs a shape's heights on one context
    entries = []
    for v in variants:
        name = f"gemm_{v['dtype']}_k{v['K']}_n{v['N']}_m{v['m_rows']}"
        d = work / name
        d.mkdir(exist_ok=True)
        shutil.copy2(obj, d / obj_name)
        if v["dtype"] == "f32_f32":
            mlir = str(design.iron_module_f32(v["m_rows"], v["K"], v["N"], stream_a))
        elif v["dtype"] == "i8_f32":
            mlir = str(design_i8.iron_module(v["m_rows"], v["K"], v["N"]))
        else:
            mlir = str(design.iron_module(v["m_rows"], v["K"], v["N"]))
        (d / "design.mlir").write_text(mlir)
        static = hashlib.sha256(_static_part(mlir).encode()).hexdigest()
        share = static in xclbins
        cmd = [tools["aiecc"], "--no-aiesim", "--no-xchesscc", "--no-xbridge", "--no-compile-host",
               f"--peano={tools['peano']}", "--aie-generate-npu-insts", "--npu-insts-name=insts.bin"]
        if not share:
            cmd += ["--aie-generate-xclbin", "--xclbin-name=final.xclbin"]
        os.environ.setdefault("AIE_XCLBINUTIL_PATH", tools["xclbinutil"])
        run(cmd + ["design.mlir"], d, d / "aiecc.log")
        insts = f"{name}.insts.bin"
        shutil.copy2(d / "insts.bin", out / insts)
        if not share:
            xclbins[static] = f"gemm_{v['dtype']}_k{v['K']}_{static[:8]}.xclbin"
            shutil.copy2(d / "final.xclbin", out / xclbins[static])
        xclbin = xclbins[static]
        first = shape_xclbin.setdefault((v["dtype"], v["K"], v["N"]), xclbin)
        if first != xclbin:
            raise RuntimeError(f"{name}: its program differs from the other heights of {v['K']}x{v['N']} outside the "
                               "runtime sequence (a design bug: the backend needs one xclbin per shape)")
        entries.append({**v, "xclbin": xclbin, "insts": insts, "kernel": "MLIR_AIE"})
        print(f"built {name} -> {xclbin}{' (shared)' if share else ''}, {insts}")
    return manifest(entries)


def manifest(entries: list[dict]) -> dict:
    return {"format": FORMAT, "contract_version": CONTRACT_VERSION,
            "tile": {"m": design.TILE_M, "k": design.TILE_K, "n": design.TILE_N},
            "array": {"rows": design.ROWS, "cols": design.COLS}, "device": "npu1", "kernels": entries}


def parse_shape(s: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)[xX,](\d+)", s.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"shape '{s}': expected KxN, e.g. 512x2048")
    return int(m.group(1)), int(m.group(2))


def dry_run_or_build(args, descriptions: list[str], build_with) -> int:
    """--dry-run: print what would be built (no toolchain needed). Else build_with(tools, work directory) with the
    toolchain found here, and write its manifest into --out. Returns the exit code (3: no toolchain)."""
    if args.dry_run:
        for line in descriptions:
            print(line)
        return 0
    try:
        tools = find_toolchain()
    except ToolchainMissing as e:
        print(f"build_kernels: {e}", file=sys.stderr)
        return 3
    result = build_with(tools, args.work or args.out / "build")
    (args.out / "manifest.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'manifest.json'}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", action="append", default=[], help="ONNX model whose MatMul/Gemm weights need kernels")
    p.add_argument("--shape", action="append", type=parse_shape, default=[], help="extra weight shape KxN")
    p.add_argument("--dtype", choices=["f32_f32", "bf16_f32", "i8_f32", "attn_f32"], default="f32_f32",
                   help="f32_f32: fp32 A in place, rounded in the core, exact heights (default); bf16_f32: v1; "
                        "i8_f32: int8 A8W8 (issue 13); attn_f32: fused attention (give --attention)")
    p.add_argument("--attention", action="append", type=parse_attention, default=[],
                   help="attn_f32: self-attention over T rows and H heads of 64, TxH[:SCALE] (e.g. 1500x8 for "
                        "whisper-base's encoder, scale 1)")
    p.add_argument("--m-rows",
                   help="comma-separated rows of A per run; f32_f32: any height >= 256, besides 256 and the models' "
                        "heights (default: those; 256,1500 when no model height is known); bf16_f32: multiples of "
                        "256 (default 256,1536; i8_f32 likewise)")
    p.add_argument("--dim", action="append", default=[],
                   help="a model's symbolic size NAME=SIZE, to find its GEMM heights (e.g. batch_size=1)")
    p.add_argument("--stream-a", action="store_true",
                   help="f32_f32: stream A from DDR per column block instead of keeping its slab in the memtile")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("XDNA_KERNEL_DIR", DEFAULT_OUT)))
    p.add_argument("--work", type=Path, help="build directory (default: <out>/build)")
    p.add_argument("--dry-run", action="store_true", help="print the kernels that would be built; needs no toolchain")
    args = p.parse_args(argv)

    if args.dtype == "attn_f32" or args.attention:
        if args.dtype != "attn_f32" or not args.attention:
            p.error("--attention goes with --dtype attn_f32 (one build per dtype family)")
        print(f"{len(args.attention)} fused attention kernel(s), one xclbin / hardware context each")
        return dry_run_or_build(args, [describe_attention(v) for v in args.attention],
                                lambda tools, work: build_attention(args.attention, args.out, tools, work))

    shapes = {padded(k, n) for k, n in args.shape}
    heights: dict = {}
    try:
        dims = parse_dims(args.dim)
        for m in args.model:
            shapes |= {padded(k, n) for k, n in weight_shapes(m)}
            if args.dtype == "f32_f32":
                for (k, n, rows), _ in gemm_work(m, dims).items():
                    if rows >= design.BLOCK_M:  # smaller calls run the 256-row kernel, staged
                        heights.setdefault((k, n), set()).add(rows)
        if not shapes:
            p.error("no shapes: give --model and/or --shape")
        if args.m_rows:
            m_rows = [int(x) for x in args.m_rows.split(",") if x.strip()]
            if args.dtype == "f32_f32":
                m_rows = sorted(set(m_rows) | {design.BLOCK_M})  # small calls: a 256-row kernel, staged
        elif args.dtype in ("bf16_f32", "i8_f32"):
            m_rows = [256, 1536]
        else:
            m_rows = [256] if heights else [256, 1500]
            if not heights:
                print("build_kernels: no GEMM height from a model (give its symbolic sizes with --dim); building "
                      "heights 256,1500", file=sys.stderr)
        variants, skipped = plan(shapes, m_rows, args.dtype, heights, args.stream_a)
    except ValueError as e:
        print(f"build_kernels: {e}", file=sys.stderr)
        return 2
    for s in skipped:
        print(f"skipping {s} (those GEMMs stay on the CPU)", file=sys.stderr)
    if not variants:
        print("build_kernels: nothing to build", file=sys.stderr)
        return 2
    programs = sorted({program_key(v, args.stream_a) for v in variants}, key=str)
    if args.dtype in ("bf16_f32", "i8_f32"):
        which = f"one per K: {', '.join(str(k[1]) for k in programs)}"
    else:
        which = "one per K" + (", and per N where the A slab stays in the memtile" if any(k[2] for k in programs)
                               else "")
    print(f"{len(variants)} kernel(s) for {len(shapes)} shape(s); {len(programs)} xclbin(s) / "
          f"hardware context(s) ({which})")
    if len(programs) > 6:
        print("warning: more than 6 xclbins: Phoenix has 6 hardware contexts per device; the backend will run "
              "the shapes of the first ones it loads and leave the rest on the CPU", file=sys.stderr)
    return dry_run_or_build(args, [describe(v, args.stream_a) for v in variants],
                            lambda tools, work: build(variants, args.out, tools, work, args.stream_a))


if __name__ == "__main__":
    sys.exit(main())
