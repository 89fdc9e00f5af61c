"""The decoder's self-attention cache in fp32 (XDNA_BF16_SELF_KV=0) against bf16 (decoder_graph pass 7), in turns in
one process so that background load hits both alike (issues 7 and 13).

Part 1: ORT's profile of one decoder_with_past step (whisper-base) at 1 and 5 rows and 128 / 256 cached tokens:
wall (median), the EP's fused nodes, the CPU EP's nodes and its Concats (means per run), CPU nodes run per step.
Part 2: whole transcriptions of the 29 s clip (beam 5, greedy) and the 80.6 s clip (beam 5) of benchmarks/whisper.py:
medians of wall, process CPU time and decoder_with_past time per run.

Without an NPU the XDNA EP computes on the CPU emulator of the NPU kernel contract: every figure is a CPU figure.

    python3 benchmarks/self_kv_ab.py [--precision int8] [--steps 60] [--runs 6] [--long-runs 4] [--skip-steps]
"""

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm import machine_line  # noqa: E402
from whisper import build_clips  # noqa: E402
from whisper_profile import profiled_session, step_feed  # noqa: E402

from onnxruntime_ep_xdna.whisper import ensure_model, features, onnx_model, transcribe_all  # noqa: E402
from onnxruntime_ep_xdna.whisper.evaluation import fetch_speech_samples  # noqa: E402
from onnxruntime_ep_xdna.whisper.features import N_FRAMES  # noqa: E402
from onnxruntime_ep_xdna.whisper.onnx_model import WhisperOnnx  # noqa: E402

CACHES = {"0": "fp32", "1": "bf16"}


def models(precision: str) -> dict:
    out = {}
    for flag in CACHES:
        os.environ["XDNA_BF16_SELF_KV"] = flag  # read when the sessions are made
        out[flag] = WhisperOnnx(ensure_model("base"), "xdna", precision=precision, compiled=False)
    del os.environ["XDNA_BF16_SELF_KV"]
    assert out["1"]._self_kv_type == "tensor(bfloat16)" and out["0"]._self_kv_type == "tensor(float)"
    return out


def step_profiles(ws: dict, mel, steps: int) -> None:
    warm = 5
    print(f"\nPart 1: one decoder_with_past step, {steps} runs each in turns after {warm} warm-ups "
          "(categories: means per run; wall: median)")
    print("| rows, cached tokens | wall ms | EP nodes ms | CPU EP nodes ms | Concat ms | CPU nodes run |")
    print("|---|---|---|---|---|---|")
    windows = {}
    for flag, w in ws.items():
        windows[flag] = w.encode(mel)
        w.start(windows[flag], [w.tokens.sot])
    for batch in (1, 5):
        for past in (128, 256):
            sessions = {f: profiled_session(w, onnx_model.FILES[2]) for f, w in ws.items()}
            feeds = {f: step_feed(w, windows[f], batch, past) for f, w in ws.items()}
            walls = defaultdict(list)
            for i in range(steps + warm):
                for f in (("0", "1") if i % 2 == 0 else ("1", "0")):
                    t = time.perf_counter()
                    sessions[f].run_with_ort_values(ws[f]._past_outputs, feeds[f])
                    if i >= warm:
                        walls[f].append(time.perf_counter() - t)
            cells = defaultdict(list)
            for f, sess in sessions.items():
                by = defaultdict(float)
                count = 0
                for e in json.loads(Path(sess.end_profiling()).read_text()):
                    if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
                        continue
                    if e["args"].get("provider") == "XDNAExecutionProvider":
                        by["ep"] += e["dur"]
                    else:
                        by["cpu"] += e["dur"]
                        count += 1
                        if e["args"].get("op_name") == "Concat":
                            by["concat"] += e["dur"]
                runs = steps + warm
                cells["wall"].append(f"{statistics.median(walls[f]) * 1e3:.2f}")
                for k in ("ep", "cpu", "concat"):
                    cells[k].append(f"{by[k] / runs / 1e3:.2f}")
                cells["nodes"].append(f"{count / runs:.0f}")
            print(f"| {batch}, {past} | " + " | ".join(" -> ".join(cells[k]) for k in ("wall", "ep", "cpu", "concat",
                                                                                    "nodes")) + " |")


def transcriptions(ws: dict, clip: str, audio, beams: int, runs: int) -> None:
    wall, cpu, step = (defaultdict(list) for _ in range(3))
    for i in range(runs + 1):  # the first round warms up
        for f in (("0", "1") if i % 2 == 0 else ("1", "0")):
            t, c = time.perf_counter(), time.process_time()
            r = transcribe_all(audio, ws[f], language="en", beam_size=beams)
            if i:
                wall[f].append(time.perf_counter() - t)
                cpu[f].append(time.process_time() - c)
                step[f].append(r.timings["decoder_steps_s"] / r.timings["decoder_steps"] * 1e3)
    med = lambda d: " -> ".join(f"{statistics.median(d[f]):.2f}" for f in CACHES)  # noqa: E731
    print(f"| {clip}, {'greedy' if beams == 1 else f'beam {beams}'} | {runs} | {med(wall)} | {med(cpu)} | {med(step)} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--steps", type=int, default=60, help="profiled decoder steps per case and cache type")
    parser.add_argument("--runs", type=int, default=6, help="transcriptions of the 29 s clip per mode and cache type")
    parser.add_argument("--long-runs", type=int, default=4, help="transcriptions of the long clip (0: skip)")
    parser.add_argument("--skip-steps", action="store_true")
    args = parser.parse_args()
    print(machine_line())
    print(f"provider: XDNAExecutionProvider, precision {args.precision} (no NPU here: the CPU emulator of the NPU "
          f"kernel contract); self-attention cache fp32 -> bf16, in turns; load average {os.getloadavg()[0]:.1f}")
    ort.set_default_logger_severity(3)
    ws = models(args.precision)
    clips, _ = build_clips(fetch_speech_samples(), include_long=args.long_runs > 0)
    (short, (audio, _, _)), *rest = clips.items()
    if not args.skip_steps:
        w = ws["0"]
        mel = features.from_array(audio, w.n_mels, w.mel_filters)
        step_profiles(ws, mel.window(0, min(N_FRAMES, mel.content_frames)), args.steps)
    print("\nPart 2: transcriptions, in turns (medians; the first round of each is a warm-up)")
    print("| clip, decoding | runs each | wall s | process CPU s | decoder_with_past ms/run |")
    print("|---|---|---|---|---|")
    transcriptions(ws, short, audio, 5, args.runs)
    transcriptions(ws, short, audio, 1, args.runs)
    for name, (long_audio, _, _) in rest:
        transcriptions(ws, name, long_audio, 5, args.long_runs)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
