"""The fixed cost of a small XDNA EP node call: one-node models of a decoder step's small products, end to end.

A decoder step of whisper-base runs ~30 EP nodes whose arithmetic is worth a few microseconds (512 x 512 GEMVs,
the self-attention's q.K^T and p.V against a 128-token cache): what they cost beyond that is per-call overhead
(ORT's, the EP's, the thread hand-off) or cache misses. Each case is a one-node ONNX model timed with
`run_with_iobinding` (inputs and outputs bound once as OrtValues), on the XDNA EP and, as the floor ORT itself
sets, on ORT's CPU EP; "ORT floor" is one Identity on the CPU EP (a session run with nothing to compute).
Everything runs on the CPU: the XDNA EP runs its emulator backend when there is no NPU, so no figure is an NPU
figure. Sessions take turns (round robin); each round times --calls calls as a block; the table prints the median
over rounds of the time per call.

Cases (B = batch rows, i.e. beams):
  gemv int8 / bf16 Bx512x512 +bias+res  out_proj with its residual Add (constant weight, epilogue)
  gemv int8 Bx512x512 +bias             cross-attention q_proj
  qk  B x H heads x 64 . K^T[64, T]     self-attention scores, K cache bf16 through Cast (decoder_graph pass 7)
  pv  B x H heads x p[1, T] . V[T, 64]  self-attention values, V cache bf16 through Cast

    python3 benchmarks/small_calls.py                 # batch 1 and 5, T = 128, 9 rounds
    python3 benchmarks/small_calls.py --batches 1 --rounds 15 --calls 400
    python3 benchmarks/small_calls.py --cold 4        # each call after a 4 MB read (as inside a decoder step)
    python3 benchmarks/small_calls.py --loop CASE --seconds 20   # one case in a loop (for perf record)
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm import machine_line  # noqa: E402

import onnxruntime_ep_xdna as xdna  # noqa: E402

IR_VERSION, OPSET = 10, 17
D_MODEL, HEADS, HEAD_DIM = 512, 8, 64


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "small", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                             ir_version=IR_VERSION).SerializeToString()


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def gemv_model(B, residual, rng):
    w = (rng.standard_normal((D_MODEL, D_MODEL)) / np.sqrt(D_MODEL)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(D_MODEL)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"], name="proj"),
             helper.make_node("Add", ["xw", "bias"], ["y" if not residual else "yb"], name="bias_add")]
    # A symbolic batch dim, as in the decoder: with static shapes ORT's MatMulAddFusion would turn MatMul + bias
    # into a Gemm between Reshapes before the EP sees them, and the residual Add would stay on the CPU EP.
    inputs = [_vi("x", ["batch", 1, D_MODEL])]
    feeds = {"x": rng.standard_normal((B, 1, D_MODEL)).astype(np.float32)}
    if residual:
        nodes.append(helper.make_node("Add", ["yb", "res"], ["y"], name="residual_add"))
        inputs.append(_vi("res", ["batch", 1, D_MODEL]))
        feeds["res"] = rng.standard_normal((B, 1, D_MODEL)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "bias")]
    return _model(nodes, inputs, [_vi("y", ["batch", 1, D_MODEL])], inits), feeds


def _bf16_bits(x):
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # truncation: any bf16 values do


def attention_model(B, T, which, rng):
    """qk: q [B, H, 1, 64] . Transpose(Cast(k16 [B, H, T, 64])); pv: p [B, H, 1, T] . Cast(v16 [B, H, T, 64])."""
    cache = _bf16_bits(rng.standard_normal((B, HEADS, T, HEAD_DIM)).astype(np.float32))
    cast = helper.make_node("Cast", ["c16"], ["c"], name="cast", to=TensorProto.FLOAT)
    if which == "qk":
        a = rng.standard_normal((B, HEADS, 1, HEAD_DIM)).astype(np.float32)
        nodes = [cast, helper.make_node("Transpose", ["c"], ["ct"], name="kt", perm=[0, 1, 3, 2]),
                 helper.make_node("MatMul", ["a", "ct"], ["y"], name="scores")]
        out = [B, HEADS, 1, T]
    else:
        a = rng.random((B, HEADS, 1, T)).astype(np.float32)
        a /= a.sum(-1, keepdims=True)
        nodes = [cast, helper.make_node("MatMul", ["a", "c"], ["y"], name="values")]
        out = [B, HEADS, 1, HEAD_DIM]
    inputs = [_vi("a", list(a.shape)), _vi("c16", list(cache.shape), TensorProto.BFLOAT16)]
    return _model(nodes, inputs, [_vi("y", out)]), {"a": a, "c16": cache}


def identity_model():
    return _model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", [1, 1, D_MODEL])],
                  [_vi("y", [1, 1, D_MODEL])]), {"x": np.zeros((1, 1, D_MODEL), np.float32)}


def cases(batches, T):
    rng = np.random.default_rng(0)
    out = []
    for B in batches:
        m, f = gemv_model(B, True, rng)
        out.append((f"gemv int8 {B}x512x512 +bias+res", m, f, "int8"))
        out.append((f"gemv bf16 {B}x512x512 +bias+res", m, f, "bf16"))
        m, f = gemv_model(B, False, rng)
        out.append((f"gemv int8 {B}x512x512 +bias", m, f, "int8"))
        for which in ("qk", "pv"):
            m, f = attention_model(B, T, which, rng)
            out.append((f"{which} {B}x{HEADS}h T={T} bf16 cache", m, f, "int8"))
    return out


def ort_values(feeds):
    values = {}
    for name, x in feeds.items():
        if x.dtype == np.uint16:  # bfloat16 bits
            values[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(x, TensorProto.BFLOAT16)
        else:
            values[name] = ort.OrtValue.ortvalue_from_numpy(x)
    return values


class Runner:
    def __init__(self, model, feeds, precision=None, threads=0):
        so = xdna.session_options()  # both EPs alike: ORT's intra-op spinning off, as the Whisper layer runs
        if precision is None:
            providers = ["CPUExecutionProvider"]
        else:
            options = {"precision": precision}
            if threads:
                options["threads"] = str(threads)
            providers = [(xdna.EP_NAME, options), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(model, so, providers=providers)
        if precision is not None:
            placed = xdna.placement(self.session).on(xdna.EP_NAME)
            if not placed:
                raise SystemExit("the XDNA EP claimed nothing of a benchmark model")
        self.names = [o.name for o in self.session.get_outputs()]
        self.values = ort_values(feeds)
        # Timed through an IOBinding bound once (inputs and preallocated outputs), without RunOptions: ORT's Python
        # side of run_with_ort_values (wrapping the results) and of a RunOptions (a config lookup) each throw and
        # unwind a C++ exception per run, tens of microseconds that are neither EP's.
        self.binding = self.session.io_binding()
        for name, v in self.values.items():
            self.binding.bind_ortvalue_input(name, v)
        for name, y in zip(self.names, self.call()):
            self.binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(np.empty_like(y.numpy())))

    def call(self):
        return self.session.run_with_ort_values(self.names, self.values)

    def cold(self, calls, flush):
        """Per-call times with `flush` (a buffer) read before each call, as the rest of a decoder step pushes a
        node's weight (and ORT's and the EP's own code and data) out of cache by its next call; the flush itself
        is not timed."""
        run, binding, walls, cpus = self.session.run_with_iobinding, self.binding, [], []
        for _ in range(calls):
            flush.sum()
            t0, c0 = time.perf_counter(), time.thread_time()
            run(binding)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.thread_time() - c0)
        return statistics.median(walls), statistics.median(cpus)

    def block(self, calls):
        run, binding = self.session.run_with_iobinding, self.binding
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            run(binding)
        return (time.perf_counter() - t0) / calls, (time.thread_time() - c0) / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,5")
    parser.add_argument("--past", type=int, default=128, help="self-attention cache length T")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=200, help="calls per timed block")
    parser.add_argument("--threads", type=int, default=0, help="the EP's threads option (0: its default)")
    parser.add_argument("--cold", type=float, default=0, metavar="MB",
                        help="read a buffer of MB megabytes before each call (a decoder step reads ~3.5 MB of other "
                             "weights per layer between two calls of a node) and time calls one by one")
    parser.add_argument("--loop", help="run only the case whose name starts with this, on the XDNA EP, in a loop")
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    xdna.register()
    all_cases = cases([int(b) for b in args.batches.split(",")], args.past)
    if args.loop:
        name, model, feeds, precision = next(c for c in all_cases if c[0].startswith(args.loop))
        r = Runner(model, feeds, precision, args.threads)
        r.block(50)
        end, n = time.perf_counter() + args.seconds, 0
        while time.perf_counter() < end:
            r.block(100)
            n += 100
        print(f"{name}: {n} calls")
        return
    print(machine_line(), f"; load average {os.getloadavg()[0]:.1f}")
    print(f"XDNA EP: {xdna.get_library_path()}; all figures CPU (emulator backend), no NPU; us per call, medians of "
          f"{args.rounds} rounds x {args.calls} calls")
    runners = [("ORT floor (Identity, CPU EP)", Runner(*identity_model()), None)]  # (name, XDNA EP, CPU EP)
    for name, model, feeds, precision in all_cases:
        runners.append((name, Runner(model, feeds, precision, args.threads), Runner(model, feeds)))
    for _, x, c in runners:  # warm-up; and the XDNA results against the CPU EP's (a wrong number is no speed)
        x.block(20)
        if c is not None:
            c.block(20)
            got, want = x.call()[0].numpy(), c.call()[0].numpy()
            assert got.shape == want.shape and np.all(np.isfinite(got))
    times = {name: ([], []) for name, _, _ in runners}  # (XDNA EP, CPU EP) blocks: (wall, calling thread's CPU)
    flush = np.ones(int(args.cold * (1 << 18)), np.float32) if args.cold else None
    for _ in range(args.rounds):
        for name, x, c in runners:
            for runner, into in ((x, times[name][0]), (c, times[name][1])):
                if runner is not None:
                    into.append(runner.cold(args.calls, flush) if args.cold else runner.block(args.calls))

    def med(blocks, i):
        return statistics.median(b[i] for b in blocks) * 1e6

    if args.cold:
        print(f"--cold: each call after a {args.cold:g} MB read (not timed); medians of per-call times")
    print("wall: us per call; cpu: the calling thread's CPU time per call (less sensitive to other jobs' load)")
    print(f"{'case':36s} {'XDNA wall':>9s} {'CPU wall':>9s} {'ratio':>6s} {'XDNA cpu':>9s} {'CPU cpu':>8s}")
    for name, (x, c) in times.items():
        if c:
            print(f"{name:36s} {med(x, 0):9.1f} {med(c, 0):9.1f} {med(x, 0) / med(c, 0):6.2f} {med(x, 1):9.1f} "
                  f"{med(c, 1):8.1f}")
        else:
            print(f"{name:36s} {med(x, 0):9.1f} {'':9s} {'':6s} {med(x, 1):9.1f}")


if __name__ == "__main__":
    main()
