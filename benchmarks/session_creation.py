"""Session creation time against the number of claimed nodes: chains of MatMuls, XDNA EP vs the CPU EP alone.

Everything here runs on the CPU (no NPU; the XDNA EP's backend is the emulator, which does not matter here: only
InferenceSession() is timed, i.e. ORT's graph work, the EP's GetCapability/Compile and weight packing).
Model: x[1, D] -> MatMul(W_1) -> ... -> MatMul(W_n) -> y, each W_i a distinct constant [D, D].
The two runners take turns for every repetition (same run, same load); medians are printed.

    python3 benchmarks/session_creation.py                      # 100, 1000, 3000, 10000 nodes
    python3 benchmarks/session_creation.py --sizes 100 1000 --repeat 5
"""

import argparse
import datetime
import os
import platform
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxruntime_ep_xdna as xdna

D = 16


def machine_line():
    model = platform.processor() or "unknown CPU"
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = ", ".join(n for n in ("avx512_bf16", "avx512f", "avx2", "amx_bf16") if f" {n}" in text)
    except OSError:
        pass
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"{model}, {os.cpu_count()} logical cores ({flags}); onnxruntime {ort.__version__}; "
            f"numpy {np.__version__}; python {platform.python_version()}; {date}")


def chain_model(n: int) -> bytes:
    rng = np.random.default_rng(n)
    nodes, inits = [], []
    prev = "x"
    for i in range(n):
        w = f"w{i}"
        out = "y" if i == n - 1 else f"h{i}"
        q, _ = np.linalg.qr(rng.standard_normal((D, D)))  # orthogonal: the chain neither explodes nor vanishes
        inits.append(numpy_helper.from_array(q.astype(np.float32), w))
        nodes.append(helper.make_node("MatMul", [prev, w], [out], name=f"mm{i}"))
        prev = out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return model.SerializeToString()


def create(model: bytes, xdna_ep: bool) -> tuple[float, ort.InferenceSession]:
    if xdna_ep:
        so = xdna.session_options(record_placement=False)
        providers = [xdna.EP_NAME, "CPUExecutionProvider"]
    else:
        so = ort.SessionOptions()
        providers = ["CPUExecutionProvider"]
    t0 = time.perf_counter()
    sess = ort.InferenceSession(model, so, providers=providers)
    return time.perf_counter() - t0, sess


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 3000, 10000])
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per size and runner (median reported)")
    args = ap.parse_args()
    xdna.register()
    print(f"machine: {machine_line()}")
    print("no NPU: the XDNA EP's backend is the CPU emulator; only session creation is timed")
    print(f"model: chain of n MatMuls x[1,{D}] . W_i[{D},{D}] (distinct constant weights); "
          f"median of {args.repeat} creations per runner, runners alternating\n")
    print(f"{'MatMul nodes':>12} {'XDNA EP s':>10} {'CPU EP s':>9} {'ratio':>7}  check (first repetition)")
    x = np.random.default_rng(0).standard_normal((1, D)).astype(np.float32)
    for n in args.sizes:
        model = chain_model(n)
        t_x, t_c = [], []
        check = ""
        for _ in range(args.repeat):
            t, sess = create(model, True)
            t_x.append(t)
            if not check:  # once: the EP really holds the nodes, and the chain's result matches the CPU EP's
                on_ep = ",".join(sorted({p for p in sess.get_providers()}))
                y = sess.run(None, {"x": x})[0]
            del sess
            t, sess = create(model, False)
            t_c.append(t)
            if not check:
                ref = sess.run(None, {"x": x})[0]
                check = f"providers {on_ep}; |y| {float(np.linalg.norm(y)):.3f} vs CPU EP {float(np.linalg.norm(ref)):.3f}"
            del sess
        mx, mc = statistics.median(t_x), statistics.median(t_c)
        print(f"{n:>12} {mx:>10.3f} {mc:>9.3f} {mx / mc:>6.2f}x  {check}", flush=True)
    print("\nratio = XDNA EP session creation time / CPU EP alone (same run).")


if __name__ == "__main__":
    main()
