"""The attention's head split and merge (Reshape + Transpose before Q, Transpose + Reshape before out_proj) run inside
the fused attention node (ops/transpose_fusion.cc read_through_head_split, ops/attention.cc read_out_head_merge)
against the same graph with them on the CPU EP, in turns in one process so that background load hits both alike
(issues 7 and 13).

One decoder_with_past step of whisper-base (the optimised copy `xdna transcribe` runs, uncompiled) at each batch of
--batch with --past cached tokens: the copy as is, and the copy where each such Reshape (split) and Transpose
(merge) output is also a graph output (a value another reader takes: the claim leaves it, its scale Mul and its
partner to the CPU EP, the previous plan). Per row count: median, 25th percentile and min of the step's wall time,
and the median of the per-pair differences (split on the CPU EP minus read through, the runs in turns).

Without an NPU the XDNA EP computes on the CPU emulator of the NPU kernel contract: every figure is a CPU figure.

    python3 benchmarks/head_split_ab.py [--precision auto] [--steps 400] [--past 128] [--batch 1 5]
"""

import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_ab  # noqa: E402


def unsplit(path: Path, out_dir: Path) -> Path:
    """The graph with each Reshape -> Transpose -> MatMul (head split) Reshape output and each Transpose -> Reshape
    -> MatMul (head merge) Transpose output also a graph output."""
    m = onnx.load(str(path))
    readers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def only_reader(value, op_type):
        r = readers.get(value, [])
        return r[0] if len(r) == 1 and r[0].op_type == op_type else None

    def reaches_matmul(value):  # directly or through a scale Mul (the decoder's Q)
        mul = only_reader(value, "Mul")
        return only_reader(value, "MatMul") is not None or (mul is not None and reaches_matmul(mul.output[0]))

    extra = []
    for n in m.graph.node:
        pair = {"Reshape": "Transpose", "Transpose": "Reshape"}.get(n.op_type)
        nxt = only_reader(n.output[0], pair) if pair else None
        if nxt is not None and reaches_matmul(nxt.output[0]):
            extra.append(n.output[0])
    return step_ab.with_graph_outputs(m, extra, out_dir / "unsplit.onnx", "head split/merge values")


def main() -> None:
    # only addressing changes: both plans give the same float outputs
    step_ab.run(step_ab.parse_args(__doc__), unsplit, ("unsplit", "read through"), ("Reshape", "Transpose"),
                same_outputs=True)


if __name__ == "__main__":
    main()
