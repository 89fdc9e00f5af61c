"""One attention node on the XDNA EP against ORT's CPU EP, in the same process: a decoder step's cross-attention
and the encoder's self-attention.

The pattern the EP fuses (ops/attention.cc): Transpose(K) -> MatMul(Q, K^T) -> Softmax -> MatMul(., V), whisper-base
shaped (8 heads of 64, T = 1500 keys, K and V fp32 per batch row), with M query rows per batch row (decoder: 1 per
beam per token; "enc": the encoder's self-attention, M = T = 1500, run --encoder-reps times per round). A shape
ending in "c" is the decoder's cross-attention as the Whisper copies run it: K and V one batch row in bfloat16 (graph
inputs, each through a Cast to float that the EP fuses), broadcast over the B beams (the EP groups them into one
head of B rows). The EP runs it
on the emulator (kernels/emulator/emulator_attention.cc); everything runs on the CPU, no figure is an NPU figure. The
two sessions take turns for --rounds rounds so background load hits both alike; the table prints the median over
rounds of each round's median.

    python3 benchmarks/attention_step.py                      # B x M = 1x1, 1x5, 5x1, 1x1c, 5x1c and enc
    python3 benchmarks/attention_step.py --shapes 1x1c,5x1c --rounds 9
    python3 benchmarks/attention_step.py --shapes 5x1 --threads 1
    python3 benchmarks/attention_step.py --shapes enc --rounds 7
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

import onnxruntime_ep_xdna as xdna

H, T, D = 8, 1500, 64


def attention_model(B, M, cross=False):
    """cross: K and V [1, H, T, D] bfloat16 inputs cast to float, broadcast over the B batch rows."""
    kv_type, kv_batch = (TensorProto.BFLOAT16, 1) if cross else (TensorProto.FLOAT, B)
    nodes = [helper.make_node("Cast", ["k16"], ["k"], name="ck", to=TensorProto.FLOAT),
             helper.make_node("Cast", ["v16"], ["v"], name="cv", to=TensorProto.FLOAT)] if cross else []
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], name="t", perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk"),
              helper.make_node("Softmax", ["s"], ["p"], name="sm", axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["o"], name="pv")]
    info = helper.make_tensor_value_info
    k_name, v_name = ("k16", "v16") if cross else ("k", "v")
    graph = helper.make_graph(nodes, "cross_attention",
                              [info("q", TensorProto.FLOAT, [B, H, M, D]), info(k_name, kv_type, [kv_batch, H, T, D]),
                               info(v_name, kv_type, [kv_batch, H, T, D])], [info("o", TensorProto.FLOAT, [B, H, M, D])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def as_bf16(x):
    """x rounded to bfloat16 as an OrtValue (numpy has no bfloat16): made by ORT's Cast on the CPU EP."""
    cast = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BFLOAT16)], "to_bf16",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                             [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, list(x.shape))])
    model = helper.make_model(cast, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run_with_ort_values(["y"], {"x": ort.OrtValue.ortvalue_from_numpy(x)})[0]


def median_ms(session, feeds, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        session.run_with_ort_values(["o"], feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="1x1,1x5,5x1,1x1c,5x1c,enc",
                        help="BxM,... (batch rows x query rows; a trailing c: the decoder's cross-attention layout, "
                             "bf16 K/V of one batch row broadcast); enc = the encoder's self-attention (1x1500)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=100, help="runs per round")
    parser.add_argument("--encoder-reps", type=int, default=5, help="runs per round of the enc shape")
    parser.add_argument("--threads", type=int, default=0, help="both EPs' threads (0 = their defaults)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gemm import machine_line

    xdna.register()
    rows = []
    for shape in args.shapes.split(","):
        cross = shape.endswith("c")
        B, M = (1, T) if shape == "enc" else map(int, shape.rstrip("c").split("x"))
        reps = args.encoder_reps if shape == "enc" else args.reps
        model = attention_model(B, M, cross)
        r = np.random.default_rng(0)
        kv_batch = 1 if cross else B
        arrays = {name: r.standard_normal(dims).astype(np.float32)
                  for name, dims in (("q", (B, H, M, D)), ("k", (kv_batch, H, T, D)), ("v", (kv_batch, H, T, D)))}
        feeds = {"q": ort.OrtValue.ortvalue_from_numpy(arrays["q"])}
        for name in ("k", "v"):
            feeds[name + "16" if cross else name] = (as_bf16(arrays[name]) if cross
                                                     else ort.OrtValue.ortvalue_from_numpy(arrays[name]))
        so = xdna.session_options()
        if args.threads:
            so.intra_op_num_threads = args.threads
        options = {"threads": str(args.threads)} if args.threads else {}
        ep = ort.InferenceSession(model, so, providers=[("XDNAExecutionProvider", options), "CPUExecutionProvider"])
        placed = xdna.placement(ep).summary()
        cpu = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        for s in (ep, cpu):
            for _ in range(min(10, reps)):
                s.run_with_ort_values(["o"], feeds)
        medians = {"ep": [], "cpu": []}
        for _ in range(args.rounds):
            medians["ep"].append(median_ms(ep, feeds, reps))
            medians["cpu"].append(median_ms(cpu, feeds, reps))
        ep_ms, cpu_ms = statistics.median(medians["ep"]), statistics.median(medians["cpu"])
        rows.append((shape, ep_ms, cpu_ms, reps, placed))

    print("attention node, whisper-base shaped (H=8, T=1500, D=64); CPU figures (emulator), no NPU")
    print("machine:", machine_line())
    print(f"threads: {args.threads or 'defaults'}; ms = median over {args.rounds} rounds of per-round medians;"
          " EPs take turns")
    print(f"{'shape':>16} {'runs':>5} | {'XDNA EP ms':>10} {'CPU EP ms':>10} {'EP/CPU':>7}")
    for shape, ep_ms, cpu_ms, reps, _ in rows:
        label = "enc 1x1500" if shape == "enc" else shape.replace("c", " bf16 x-attn") if shape.endswith("c") else shape
        print(f"{label:>16} {reps:>5} | {ep_ms:>10.3f} {cpu_ms:>10.3f} {ep_ms / cpu_ms:>7.2f}")
    print("placement (first shape):", rows[0][4])
    cross_rows = [row for row in rows if row[0].endswith("c")]
    if cross_rows:  # the Casts fused with the attention on the EP
        print("placement (first bf16 x-attn shape):", cross_rows[0][4])


if __name__ == "__main__":
    main()
