"""Distinct GEMM weight shapes (K, N) of an ONNX model: the kernels build_kernels.py must build for it.

A MatMul whose second input is an initializer of rank 2 contributes (K, N) = its shape; a Gemm with a constant B
contributes (K, N) after transB; a 1-D Conv (group 1) with constant weights [Cout, Cin, k] contributes
(Cin * k, Cout), the GEMM the EP runs it as. Shapes are reported as the model has them and padded per the GEMM
contract.

With --dim NAME=SIZE for the model's symbolic sizes, it also lists the heights M (rows of A per call) of those
GEMMs, from ONNX shape inference: the exact heights the f32_f32 kernels are built for. Whisper's encoder with
--dim batch_size=1: 3000 (conv1, stride 1 over the 3000 mel frames) and 1500 (conv2 and every MatMul).

    python3 kernels/aie/model_shapes.py encoder_model.onnx [decoder_model.onnx ...] [--json]
    python3 kernels/aie/model_shapes.py encoder_model.onnx --dim batch_size=1 --heights
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

TILE_K, BLOCK_N = 64, 256  # kernels/gemm_contract.h: Kpad = round_up(K, kTileK), Npad = round_up(N, kBlockN)


def round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def padded(k: int, n: int) -> tuple[int, int]:
    return round_up(k, TILE_K), round_up(n, BLOCK_N)


def weight_shapes(model_path: str) -> Counter:
    """Counter of (K, N) -> number of nodes, for MatMul/Gemm/Conv nodes with constant weights (see above)."""
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    shapes: Counter = Counter()

    def visit(graph):
        inits = {t.name: list(t.dims) for t in graph.initializer}
        for node in graph.node:
            for attr in node.attribute:  # subgraphs (If/Loop/Scan)
                if attr.g is not None and attr.g.node:
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)
            if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
                continue
            dims = inits.get(node.input[1])
            if node.op_type == "Conv":
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                if dims is not None and len(dims) == 3 and group == 1:
                    shapes[(int(dims[1] * dims[2]), int(dims[0]))] += 1
                continue
            if dims is None or len(dims) != 2:
                continue
            k, n = dims
            if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
                k, n = n, k
            shapes[(int(k), int(n))] += 1

    visit(model.graph)
    return shapes


def _static_dims(model, dims: dict) -> None:
    """Replaces the symbolic sizes named in dims in the graph inputs, in place."""
    for vi in model.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in dims:
                d.dim_value = int(dims[d.dim_param])


def gemm_work(model_path: str, dims: dict | None = None) -> Counter:
    """Counter of (Kpad, Npad, M) -> nodes for the nodes weight_shapes counts (top-level graph), M being the rows of
    A of one GEMM call as the EP runs it: a MatMul folds A's leading dims into M, a Gemm takes A's rows (columns
    with transA), a 1-D Conv runs one GEMM of T_out rows per batch item (im2col). Nodes whose M is not a number
    after shape inference (a symbolic size not given in dims) are left out."""
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    _static_dims(model, dims or {})
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)  # through Shape -> Reshape chains
    g = inferred.graph
    shapes = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    inits = {t.name: list(t.dims) for t in g.initializer}
    work: Counter = Counter()
    for node in g.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        a = shapes.get(node.input[0])
        if node.op_type == "Conv":
            group = next((x.i for x in node.attribute if x.name == "group"), 1)
            y = shapes.get(node.output[0])
            if len(w) != 3 or group != 1 or not y or len(y) != 3 or y[2] is None:
                continue
            k, n, m = w[1] * w[2], w[0], y[2]
        else:
            if len(w) != 2 or not a or len(a) < 2 or any(v is None for v in a):
                continue
            k, n = w
            if node.op_type == "Gemm":
                attrs = {x.name: x.i for x in node.attribute}
                if attrs.get("transB"):
                    k, n = n, k
                m = a[1] if attrs.get("transA") else a[0]
            else:
                m = 1
                for v in a[:-1]:
                    m *= v
        work[(*padded(int(k), int(n)), int(m))] += 1
    return work


def parse_dims(items) -> dict:
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"--dim {item}: expected NAME=SIZE")
        out[name.strip()] = int(value)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--json", action="store_true", help="print [[K, N], ...] of padded shapes (for --shapes-json)")
    p.add_argument("--dim", action="append", default=[], help="symbolic size, NAME=SIZE (e.g. batch_size=1)")
    p.add_argument("--heights", action="store_true", help="list the GEMM heights M per padded shape (needs the "
                                                          "model's symbolic sizes as --dim)")
    args = p.parse_args(argv)
    if args.heights:
        work: Counter = Counter()
        for m in args.models:
            work.update(gemm_work(m, parse_dims(args.dim)))
        print(f"{'Kpad':>6} {'Npad':>6} {'M':>6} {'nodes':>5}")
        for (k, n, m), count in sorted(work.items()):
            print(f"{k:>6} {n:>6} {m:>6} {count:>5}")
        print(f"exact heights: {', '.join(map(str, sorted({m for _, _, m in work})))}", file=sys.stderr)
        return 0
    total: Counter = Counter()
    for m in args.models:
        total.update(weight_shapes(m))
    if args.json:
        print(json.dumps(sorted({padded(k, n) for k, n in total})))
        return 0
    print(f"{'K':>6} {'N':>6} {'Kpad':>6} {'Npad':>6} {'nodes':>5}")
    for (k, n), count in sorted(total.items()):
        kp, np_ = padded(k, n)
        print(f"{k:>6} {n:>6} {kp:>6} {np_:>6} {count:>5}")
    print(f"{len({padded(k, n) for k, n in total})} distinct padded shape(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
