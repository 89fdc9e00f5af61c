"""Multi-threaded stress run of the EP, for the sanitizer builds (tools/sanitize.sh): several threads run several
sessions at once (constant and run-time B, fused Transposes, Gemm, Conv, a fused chain, the emulator's pool and the
xrt backend over the fake NPU), sessions are created and dropped while others run, and every result is checked
against float64 numpy within the bf16 bound. Exits non-zero on any wrong result or error.

    python tools/stress_ep.py [--seconds 20] [--threads 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ep_helpers import bf16_bound, init, make_model, tensor, xdna_session  # noqa: E402
from numerics import assert_within  # noqa: E402


def bf16_ok(y, exact, bound):
    try:
        assert_within(y, exact, bound)
    except AssertionError:
        return False
    return True


def case_matmul(r):
    w = r.standard_normal((96, 130)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], [tensor("a", ["m", 96])],
                       [tensor("y", ["m", 130])], [init("w", w)])

    def feeds(r):
        a = r.standard_normal((int(r.integers(1, 300)), 96)).astype(np.float32)
        return {"a": a}, a.astype(np.float64) @ w, bf16_bound(a, w, 96)
    return model, feeds


def case_attention(r):
    # scores = Q . K^T with K^T from a Transpose read through, then a run-time-B product: both operands at run time
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="t"),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk"),
             helper.make_node("MatMul", ["s", "v"], ["y"], name="sv")]
    model = make_model(nodes, [tensor("q", [4, "m", 32]), tensor("k", [4, "n", 32]), tensor("v", [4, "n", 24])],
                       [tensor("y", [4, "m", 24])])

    def feeds(r):
        m, n = int(r.integers(1, 40)), int(r.integers(1, 40))
        q, k, v = (r.standard_normal(s).astype(np.float32) for s in ((4, m, 32), (4, n, 32), (4, n, 24)))
        kt = k.transpose(0, 2, 1).astype(np.float64)
        s = q.astype(np.float64) @ kt
        s_err = bf16_bound(q, kt, 32)
        bound = bf16_bound(s, v, n) + (s_err @ np.abs(v.astype(np.float64))) * (1 + 2.0**-6)
        return {"q": q, "k": k, "v": v}, s @ v, bound
    return model, feeds


def case_gemm_conv_chain(r):
    wg = r.standard_normal((40, 48)).astype(np.float32)  # Gemm transB: [N, K]
    c = r.standard_normal(40).astype(np.float32)
    wc = r.standard_normal((8, 5, 3)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["a", "wg", "c"], ["g"], transB=1, alpha=0.5, name="gemm"),
             helper.make_node("Reshape", ["g", "shape"], ["x"], name="reshape"),
             helper.make_node("Conv", ["x", "wc"], ["y"], pads=[1, 1], name="conv")]
    model = make_model(nodes, [tensor("a", ["m", 48])], [tensor("y", ["n", 8, 8])],
                       [init("wg", wg), init("c", c), init("wc", wc), init("shape", np.array([-1, 5, 8], np.int64))])

    def feeds(r):
        m = int(r.integers(1, 20))
        a = r.standard_normal((m, 48)).astype(np.float32)
        g = 0.5 * (a.astype(np.float64) @ wg.T.astype(np.float64)) + c
        g_err = 0.5 * bf16_bound(a, wg.T, 48)
        x, x_err = g.reshape(-1, 5, 8), g_err.reshape(-1, 5, 8)
        xp, ep = (np.pad(t, ((0, 0), (0, 0), (1, 1))) for t in (x, x_err))
        cols = np.stack([xp[:, :, i:i + 3] for i in range(8)], axis=1).reshape(-1, 8, 15)
        cols_err = np.stack([ep[:, :, i:i + 3] for i in range(8)], axis=1).reshape(-1, 8, 15)
        wt = wc.reshape(8, 15).T.astype(np.float64)
        exact = (cols @ wt).transpose(0, 2, 1)
        bound = (bf16_bound(cols, wt, 15) + cols_err @ np.abs(wt) * (1 + 2.0**-7)).transpose(0, 2, 1)
        return {"a": a}, exact, bound
    return model, feeds


def case_chain(r):
    ws = [np.linalg.qr(r.standard_normal((16, 16)))[0].astype(np.float32) for _ in range(20)]
    names = ["x"] + [f"h{i}" for i in range(19)] + ["y"]
    nodes = [helper.make_node("MatMul", [names[i], f"w{i}"], [names[i + 1]], name=f"mm{i}") for i in range(20)]
    model = make_model(nodes, [tensor("x", ["m", 16])], [tensor("y", ["m", 16])],
                       [init(f"w{i}", w) for i, w in enumerate(ws)])

    def feeds(r):
        x = r.standard_normal((int(r.integers(1, 50)), 16)).astype(np.float32)
        exact = x.astype(np.float64)
        for w in ws:
            exact = exact @ w
        # 20 orthogonal products, each adding at most 4 * 2^-7 of the row norm (Cauchy-Schwarz): loose but finite
        bound = 20 * 2.0**-4 * np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True) + 0 * exact
        return {"x": x}, exact, bound
    return model, feeds


CASES = [case_matmul, case_attention, case_gemm_conv_chain, case_chain]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    r = np.random.default_rng(0)
    built = [case(r) for case in CASES]
    fake_dir = tempfile.mkdtemp(prefix="xdna-stress-kernels-")
    from test_xrt_backend import write_kernel_dir  # the fake NPU's kernel directory

    write_kernel_dir(Path(fake_dir), [(128, 256, 256), (64, 256, 256)])  # the MatMul (K=96) and attention shapes
    os.environ["XDNA_XRT_SHIM"] = "fake"
    os.environ["XDNA_XRT_COST_MODEL"] = "0"
    configs = [{"threads": "2"}, {"threads": "1"}, {"backend": "xrt", "kernel_dir": fake_dir}]
    sessions = [[xdna_session(model, cfg) for cfg in configs] for model, _ in built]
    errors: list[str] = []
    counts = [0] * args.threads
    deadline = time.monotonic() + args.seconds

    def worker(t):
        rr = np.random.default_rng(100 + t)
        while time.monotonic() < deadline and not errors:
            i = int(rr.integers(len(built)))
            model, feeds = built[i]
            if rr.random() < 0.05:  # a fresh session while the others run
                sess = xdna_session(model, configs[int(rr.integers(len(configs)))])
            else:
                sess = sessions[i][int(rr.integers(len(configs)))]
            f, exact, bound = feeds(rr)
            try:
                y = sess.run(None, f)[0]
            except Exception as e:  # noqa: BLE001 - reported
                errors.append(f"{CASES[i].__name__}: {e}")
                return
            if not bf16_ok(y, exact, bound):
                errors.append(f"{CASES[i].__name__}: result outside the bf16 bound")
                return
            counts[t] += 1

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(args.threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    print(f"stress: {sum(counts)} runs on {args.threads} threads, {len(built)} models x {len(configs)} configs")
    if errors:
        print("FAILED:", *errors, sep="\n  ")
        sys.exit(1)


if __name__ == "__main__":
    main()
