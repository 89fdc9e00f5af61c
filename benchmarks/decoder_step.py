"""Whisper step times per precision policy: one encoder window and decoder_with_past steps (1 and 5 rows).

Issue 13's target "int8 decoder step <= 0.6x the bf16 step time" is about this number. Everything here runs on the
CPU: the XDNA EP runs its emulator backend when there is no NPU, so no figure is an NPU figure. Each policy loads
its own WhisperOnnx (compiled-model cache off, so every session plans from the ONNX files); the policies then
take turns (round robin) so background load hits all alike; medians are printed, with ratios against bf16 and
against the CPU EP (fp32).

    python3 benchmarks/decoder_step.py                 # whisper-base, 15 rounds
    python3 benchmarks/decoder_step.py --rounds 5
    python3 benchmarks/decoder_step.py --policies int8 --compare-original   # optimised decoder graphs vs optimum's
    python3 benchmarks/decoder_step.py --policies int8 --compare-fp32-kv    # cross-attention K/V in bf16 vs fp32
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("XDNA_COMPILED_MODELS", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm import machine_line  # noqa: E402

from onnxruntime_ep_xdna.whisper import features as F  # noqa: E402
from onnxruntime_ep_xdna.whisper.model import ensure_model  # noqa: E402
from onnxruntime_ep_xdna.whisper.onnx_model import WhisperOnnx  # noqa: E402

PAST_TOKENS = 32  # self-attention cache length of the timed steps (a window part-way through)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--policies", default="cpu,bf16,int8,mixed")
    parser.add_argument("--compare-original", action="store_true",
                        help="each policy also on optimum's decoder graphs as exported (rows '<policy> orig'); "
                             "the other rows run the Whisper layer's optimised copies (whisper/decoder_graph.py)")
    parser.add_argument("--compare-fp32-kv", action="store_true",
                        help="each XDNA policy also with the cross-attention K/V kept in fp32 (rows '<policy> fp32kv', "
                             "XDNA_BF16_CROSS_KV=0); the other rows keep them in bf16 (decoder_graph.py pass 3)")
    parser.add_argument("--steps-only", action="store_true", help="no encoder runs in the rounds (its column: 0)")
    args = parser.parse_args()
    model = ensure_model(args.model, log=lambda m: print(m, file=sys.stderr))
    print(machine_line(), f"; load average {os.getloadavg()[0]:.1f}")
    runners = {}
    for policy in args.policies.split(","):
        for original in (False, True) if args.compare_original else (False,):
            name = policy + (" orig" if original else "")
            optimised = False if original else None
            if policy == "cpu":
                runners[name] = WhisperOnnx(model, "CPUExecutionProvider", optimised=optimised)
                continue
            runners[name] = WhisperOnnx(model, precision=policy, optimised=optimised)
            if args.compare_fp32_kv and not original:
                os.environ["XDNA_BF16_CROSS_KV"] = "0"  # read when the sessions are made
                try:
                    runners[name + " fp32kv"] = WhisperOnnx(model, precision=policy)
                finally:
                    del os.environ["XDNA_BF16_CROSS_KV"]
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(F.SAMPLE_RATE * 30)).astype(np.float32)
    mel = F.log_mel_spectrogram(audio, 80)[None, :, :3000].astype(np.float32)
    times = {p: {"encoder": [], "step x1": [], "step x5": []} for p in runners}
    prompts = {}
    for p, w in runners.items():  # warm-up, and each runner's window + a 32-token cache to step from
        window = w.encode(mel)
        prompt = [w.tokens.sot] + [w.tokens.sot] * (PAST_TOKENS - 1)
        _, state = w.start(window, prompt)
        prompts[p] = (window, state)
        w.step(state, np.array([w.tokens.sot]), None)
    for _ in range(args.rounds):
        for p, w in runners.items():
            window, state = prompts[p]
            t0 = time.perf_counter()
            if not args.steps_only:
                w.encode(mel)
            times[p]["encoder"].append(time.perf_counter() - t0)
            token = np.array([w.tokens.sot])
            t0 = time.perf_counter()
            w.step(state, token, None)
            times[p]["step x1"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            w.step(state, np.repeat(token, 5), np.zeros(5, np.int64))
            times[p]["step x5"].append(time.perf_counter() - t0)
    cols = ["encoder", "step x1", "step x5"]
    print(f"\nwhisper {args.model}, medians of {args.rounds} rounds (ms); decoder steps with {PAST_TOKENS} cached tokens")
    print(f"{'policy':<12}" + "".join(f"{c:>12}" for c in cols) + "".join(f"{c + ' /bf16':>16}" for c in cols))
    med = {p: {c: statistics.median(v[c]) * 1e3 for c in cols} for p, v in times.items()}
    for p in runners:
        base = med.get("bf16")
        ratios = "".join(f"{med[p][c] / base[c]:>15.2f}x" if base else f"{'':>16}" for c in cols)
        print(f"{p:<12}" + "".join(f"{med[p][c]:>12.1f}" for c in cols) + ratios)


if __name__ == "__main__":
    main()
