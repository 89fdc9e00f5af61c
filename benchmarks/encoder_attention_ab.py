"""A/B of two builds on the encoder's attention: two resident worker processes (the baseline build, found through
--base, a PYTHONPATH directory holding its onnxruntime_ep_xdna package, e.g. a wheel of the old commit unpacked; and
the build this interpreter imports), one call each per turn, in alternating order. Prints medians and the median of
the per-turn ratios. CPU/emulator figures; on a shared machine note the load (uptime) with them.

  --what attention: _native.emulator_attention on whisper-base's encoder self-attention (8 heads x 1500 x 1500 x 64,
                    threads=2), the fused many-row path alone
  --what window:    one encoder window of xdna transcribe's whisper-base model (precision auto), the whole graph
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

ATTENTION = r'''
import sys, time, numpy as np
from onnxruntime_ep_xdna import _native
H, M, T, D = 8, 1500, 1500, 64
r = np.random.default_rng(0)
q, k, v = (r.standard_normal((H, n, D)).astype(np.float32) for n in (M, T, T))
run = lambda: _native.emulator_attention(q, k, v, 0.125, threads=2)
run()
'''
WINDOW = r'''
import sys, time, numpy as np
from onnxruntime_ep_xdna.whisper import ensure_model, load_model
m = load_model(ensure_model("base"), precision="auto")
wm = m.model if hasattr(m, "model") else m
mel = np.random.default_rng(0).standard_normal((1, 80, 3000)).astype(np.float32) * 0.3
run = lambda: wm.encode(mel)
run(); run()
'''
LOOP = r'''
print("ready", flush=True)
for line in sys.stdin:
    t = time.perf_counter(); run(); print(time.perf_counter() - t, flush=True)
'''


def start(script: str, pythonpath: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    p = subprocess.Popen([sys.executable, "-c", script + LOOP], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env=env, cwd="/")
    if p.stdout.readline().strip() != "ready":
        raise SystemExit("a worker failed to start")
    return p


def timed(p: subprocess.Popen) -> float:
    p.stdin.write("go\n")
    p.stdin.flush()
    return float(p.stdout.readline())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="PYTHONPATH directory of the baseline build's package")
    ap.add_argument("--what", choices=["attention", "window"], default="attention")
    ap.add_argument("--turns", type=int, default=21)
    a = ap.parse_args()
    script = ATTENTION if a.what == "attention" else WINDOW
    base, new = start(script, a.base), start(script, None)
    tb, tn = [], []
    for i in range(a.turns):
        if i % 2 == 0:
            tb.append(timed(base))
            tn.append(timed(new))
        else:
            tn.append(timed(new))
            tb.append(timed(base))
    for p in (base, new):
        p.stdin.close()
        p.wait()
    ratio = statistics.median(b / n for b, n in zip(tb, tn))
    print(f"{a.what}: before {statistics.median(tb) * 1e3:.1f} ms, after {statistics.median(tn) * 1e3:.1f} ms "
          f"(medians), median per-turn ratio {ratio:.2f}x over {a.turns} alternating turns; load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
