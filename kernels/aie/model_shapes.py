"""Distinct GEMM weight shapes (K, N) of an ONNX model: the kernels build_kernels.py must build for it.

A MatMul whose second input is an initializer of rank 2 contributes (K, N) = its shape; a Gemm with a constant B
contributes (K, N) after transB; a 1-D Conv (group 1) with constant weights [Cout, Cin, k] contributes
(Cin * k, Cout), the GEMM the EP runs it as. Shapes are reported as the model has them and padded per the GEMM
contract.

    python3 kernels/aie/model_shapes.py encoder_model.onnx [decoder_model.onnx ...] [--json]
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--json", action="store_true", help="print [[K, N], ...] of padded shapes (for --shapes-json)")
    args = p.parse_args(argv)
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
