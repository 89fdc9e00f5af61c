"""A/B of two builds on the encoder's attention: two resident worker processes (the baseline build, found through
--base, a PYTHONPATH directory holding its onnxruntime_ep_xdna package, e.g. a wheel of the old commit unpacked; and
the build this interpreter imports), one call each per turn, in alternating order. Prints medians and the median of
the per-turn ratios. CPU/emulator figures; on a shared machine note the load (uptime) with them.

  --what attention: _native.emulator_attention on whisper-base's encoder self-attention (8 heads x 1500 x 1500 x 64,
                    threads=2), the fused many-row path alone
  --what window:    one encoder window of xdna transcribe's whisper-base model (precision auto), the whole graph
  --what prompt:    one prompt run of that model, start(window, [50258, 50259, 50359]) (the 12 cross K/V projections
                    and the decoder on 3 tokens, with its 3-row cross-attention)
  --what step:      20 greedy decoder steps of that model (one token, batch 1) from the same prompt state; the time
                    printed is per step
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
PROMPT = WINDOW + r'''
w = wm.encode(mel)
def prompt():
    w.cross = None  # the window's cross K/V computed again (start() keeps them for its later prompts)
    wm.start(w, [50258, 50259, 50359])
run = prompt
run(); run()
'''
STEP = PROMPT + r'''
w.cross = None
_, s0 = wm.start(w, [50258, 50259, 50359])
tok = np.array([[440]], dtype=np.int64)
def steps():
    s = s0
    for _ in range(20):
        _, s = wm.step(s, tok, None)
run = steps
run()
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
    ap.add_argument("--what", choices=["attention", "window", "prompt", "step"], default="attention")
    ap.add_argument("--turns", type=int, default=21)
    a = ap.parse_args()
    script = {"attention": ATTENTION, "window": WINDOW, "prompt": PROMPT, "step": STEP}[a.what]
    per = 20 if a.what == "step" else 1
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
    ratios = sorted(b / n for b, n in zip(tb, tn))
    q = len(ratios) // 4
    print(f"{a.what}: before {statistics.median(tb) / per * 1e3:.2f} ms, after {statistics.median(tn) / per * 1e3:.2f} ms "
          f"(medians{', per step' if per > 1 else ''}), median per-turn ratio {statistics.median(ratios):.3f}x "
          f"(quartiles {ratios[q]:.3f}-{ratios[-1 - q]:.3f}) over {a.turns} alternating turns; "
          f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
