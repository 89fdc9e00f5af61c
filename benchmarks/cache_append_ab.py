"""The decoder step's self-attention cache append (head split, Cast to bf16, Concat after the past) written by the
projection's EP node (ops/matmul.cc claim_cache_append) against the same graph with those nodes on the CPU EP, in
turns in one process so that background load hits both alike (issues 7 and 13).

One decoder_with_past step of whisper-base (the optimised copy `xdna transcribe` runs, uncompiled) at each batch of
--batch with --past cached tokens: the copy as is, and the copy where each self-attention K/V projection's output
(the value the chain starts from) is also a graph output (a value another reader takes: the claim leaves the chain
to the CPU EP, the previous plan). Per row count: median, 25th percentile and min of the step's wall time, and the
median of the per-pair differences (chain on the CPU EP minus in the projection's node, the runs in turns). Both
plans give the same outputs, bit for bit (checked, the bf16 caches included).

Without an NPU the XDNA EP computes on the CPU emulator of the NPU kernel contract: every figure is a CPU figure.

    python3 benchmarks/cache_append_ab.py [--precision auto] [--steps 400] [--past 128] [--batch 1 5]
"""

import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_ab  # noqa: E402

CHAIN_OPS = {"Reshape", "Transpose", "Cast", "Mul"}


def unfused(path: Path, out_dir: Path) -> Path:
    """The graph with the start of each present.N.decoder.* chain (the Reshape's input) also a graph output."""
    m = onnx.load(str(path))
    producers = {o: n for n in m.graph.node for o in n.output}
    extra = []
    for out in m.graph.output:
        concat = producers.get(out.name)
        if not (out.name.startswith("present.") and ".decoder." in out.name) or concat is None or \
                concat.op_type != "Concat":
            continue
        node = producers.get(concat.input[-1])
        while node is not None and node.op_type in CHAIN_OPS and node.op_type != "Reshape":
            node = producers.get(node.input[0])
        if node is not None and node.op_type == "Reshape":
            extra.append(node.input[0])
    return step_ab.with_graph_outputs(m, extra, out_dir / "unfused.onnx", "K/V projection outputs")


def main() -> None:
    step_ab.run(step_ab.parse_args(__doc__), unfused, ("cache append on CPU", "in the projection"),
                ("Concat", "Cast"), same_outputs=True)


if __name__ == "__main__":
    main()
