"""The decoder's masked self-attention as one fused node (ops/attention.cc: mask Add and NaN rule) against the same
graph unfused, in turns in one process so that background load hits both alike (issues 7 and 13).

One decoder_with_past step of whisper-base (the optimised copy `xdna transcribe` runs, uncompiled) at each batch of
--batch with --past cached tokens: the copy as is, and the copy with each self-attention Softmax also a graph output
(a Softmax another node reads: the claim refuses the fusion, so the two MatMuls run as plain products and the Add,
Softmax, IsNaN and Where on the CPU EP: the previous plan). Per row count: median, 25th percentile and min of the
step's wall time, and the median of the per-pair differences (unfused minus fused, the runs in turns).

Without an NPU the XDNA EP computes on the CPU emulator of the NPU kernel contract: every figure is a CPU figure.

    python3 benchmarks/masked_attention_ab.py [--precision auto] [--steps 400] [--past 128] [--batch 1 5]
"""

import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_ab  # noqa: E402


def unfused_copy(path: Path, out_dir: Path) -> Path:
    """The graph with every self-attention Softmax also a graph output."""
    m = onnx.load(str(path))
    softmaxes = [n.output[0] for n in m.graph.node if n.op_type == "Softmax" and "self_attn" in n.name]
    return step_ab.with_graph_outputs(m, softmaxes, out_dir / "unfused.onnx", "self-attention Softmax outputs")


def main() -> None:
    step_ab.run(step_ab.parse_args(__doc__), unfused_copy, ("unfused", "fused"), ("Softmax",))

if __name__ == "__main__":
    main()
