"""Where the time of `xdna transcribe` goes: one decoder step split by ORT's profiler, and a whole transcription
split by wall-clock timers around each piece of the decode loop.

Part 1 (ORT profiling, `SessionOptions.enable_profiling`): the encoder on one 30 s window, and
decoder_with_past run alone at batch 1 (greedy) and batch 5 (beams; the cross-attention K/V at batch 1, as
`xdna transcribe` feeds them), self-attention cache of 40 tokens (--past). The decoder is the graph `xdna
transcribe` runs: the leaner copy of whisper/decoder_graph.py, unless XDNA_OPTIMISED_DECODERS=0; with
--compare-original optimum's graph runs in turns with it. Per run: the EP's fused nodes (its GEMMs), the other
nodes on the CPU EP by op type, and the rest of the run call (session overhead: binding inputs and outputs,
allocation, partition hand-offs, ORT's per-node cost).

Part 2 (timers): the 29 s clip of benchmarks/whisper.py transcribed with the defaults (beam 5) and greedy; time in
the encoder, the prompt, the decoder_with_past runs, the KV-cache reorder, fetching the logits, the logit rules
(suppression, timestamp rules; with the batched step also the step's one max + exp-sum pass, which the
log-probabilities reuse), log-probs + top-k and the rest of the Python loop. The loop's own pieces are
timed by wrapping them (no change to the package's code).

Without an NPU the XDNA EP computes on the CPU emulator of the NPU kernel contract: every figure is a CPU figure.

    python3 benchmarks/whisper_profile.py [--provider xdna|cpu] [--precision auto|bf16|int8|...] [--steps 30]
        [--runs 3] [--threads 0 1] [--past 40 200 440] [--clock wall|thread]
    XDNA_OPTIMISED_DECODERS=0 python3 benchmarks/whisper_profile.py ...   # optimum's decoder graphs as exported
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm import machine_line  # noqa: E402
from whisper import SR, build_clips  # noqa: E402

import onnxruntime_ep_xdna as xdna  # noqa: E402
from onnxruntime_ep_xdna._precision import DEFAULT as DEFAULT_PRECISION, describe  # noqa: E402
from onnxruntime_ep_xdna.whisper import ensure_model, load_model, transcribe_all  # noqa: E402
from onnxruntime_ep_xdna.whisper import onnx_model, rules, search  # noqa: E402
from onnxruntime_ep_xdna.whisper.evaluation import fetch_speech_samples  # noqa: E402
from onnxruntime_ep_xdna.whisper.features import N_FRAMES  # noqa: E402


def profiled_session(w, graph: str, threads: int = 0, original: bool = False):
    """A profiling session of the graph `w` runs: the optimised copy of a decoder when `w` uses one (uncompiled:
    compiling here would only add time), or with `original` optimum's file as exported."""
    so = xdna.session_options() if w.provider == xdna.EP_NAME else ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "profile")
    if threads:
        so.intra_op_num_threads = threads
    path = w.model_dir / graph if original else w.optimised_paths.get(graph, w.model_dir / graph)
    return ort.InferenceSession(str(path), sess_options=so, providers=w._providers)


def run_profile(sessions, outputs, feed, runs: int) -> list[tuple[dict, float]]:
    """ORT's per-node profile of `runs` runs of each session (after 2 warm-ups; the sessions take turns, so that
    background load hits all alike): per category (the EP's fused nodes, each CPU EP op type, session overhead =
    model_run minus the nodes) the median ms per run over the runs (a loaded machine preempts single nodes now and
    then; medians keep that out); and the median wall time of a run. One (medians, wall) per session."""
    for sess in sessions:
        for _ in range(2):
            sess.run_with_ort_values(outputs, feed)
    walls = [[] for _ in sessions]
    for _ in range(runs):
        for sess, wall in zip(sessions, walls):
            t = time.perf_counter()
            sess.run_with_ort_values(outputs, feed)
            wall.append(time.perf_counter() - t)
    out = []
    for sess, wall in zip(sessions, walls):
        events = json.loads(Path(sess.end_profiling()).read_text())
        nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        per_run = []
        for run in [e for e in events if e.get("name") == "model_run"][-runs:]:
            lo, hi = run["ts"], run["ts"] + run["dur"]
            by = defaultdict(float)
            for e in nodes:
                if lo <= e["ts"] <= hi:
                    provider = e["args"].get("provider", "?")
                    key = EP_KEY if provider == xdna.EP_NAME else f"CPU EP {e['args'].get('op_name', '?')}"
                    by[key] += e["dur"] / 1e3
                    by["nodes run"] += 1
            by["model_run"] = run["dur"] / 1e3
            by["cpu_nodes"] = sum(v for k, v in by.items() if k.startswith("CPU EP"))
            by["overhead"] = by["model_run"] - by["cpu_nodes"] - by.get(EP_KEY, 0.0)
            per_run.append(by)
        keys = {k for r in per_run for k in r}
        out.append(({k: statistics.median(r.get(k, 0.0) for r in per_run) for k in keys},
                    statistics.median(wall) * 1e3))
    return out


def step_feed(w, window, batch: int, past: int) -> dict:
    """One decoder_with_past step's inputs: `window`'s cross-attention K/V, a random self-attention cache of `past`
    tokens at `batch` rows (in the cache's type: the bits of bf16 (truncated) values under decoder_graph pass 7) and
    one token per row."""
    rng = np.random.default_rng(0)
    feed = dict(window.cross)
    for name in w._as_past.values():
        if ".decoder." in name:
            kv = rng.standard_normal((batch, w._kv_heads, past, w._kv_dim)).astype(np.float32)
            if w._self_kv_type == "tensor(bfloat16)":
                kv = (kv.view(np.uint32) >> 16).astype(np.uint16)
            feed[name] = onnx_model.ortvalue_like(kv, w._self_kv_type)
    feed["input_ids"] = ort.OrtValue.ortvalue_from_numpy(np.full((batch, 1), 440, np.int64))
    return feed


def step_profile(w, window, batch: int, past_len: int, steps: int, threads: int = 0,
                 compare_original: bool = False) -> list[dict]:
    """decoder_with_past at `batch` rows (the cross-attention K/V at batch 1, as `xdna transcribe` feeds them) with
    a self-attention cache of `past_len` tokens; with `compare_original` also optimum's graph, in turns."""
    # optimum's graph takes the cross-attention K/V in fp32: not comparable with a copy that keeps them in bf16
    graphs = [False] + ([True] if compare_original and w.optimised_paths and not w.bf16_cross_kv else [])
    if compare_original and w.bf16_cross_kv:
        print("(--compare-original skipped: the cross-attention K/V are bf16 here; XDNA_BF16_CROSS_KV=0 compares)")
    sessions = [profiled_session(w, onnx_model.FILES[2], threads, original) for original in graphs]
    results = run_profile(sessions, w._past_outputs, step_feed(w, window, batch, past_len), steps)
    which = ["optimum's graph" if original else ("optimised copy" if w.optimised_paths else "optimum's graph")
             for original in graphs]
    return [{"what": f"decoder_with_past ({name}), batch {batch}, past {past_len} tokens", "threads": threads,
             "wall_ms_median": wall, "median_ms": med} for name, (med, wall) in zip(which, results)]


def encoder_profile(w, mel_window, runs: int, threads: int = 0) -> dict:
    sess = profiled_session(w, onnx_model.FILES[0], threads)
    (med, wall), = run_profile([sess], None, {"input_features": ort.OrtValue.ortvalue_from_numpy(mel_window)}, runs)
    return {"what": "encoder, one 30 s window", "threads": threads, "wall_ms_median": wall, "median_ms": med}


EP_KEY = "EP (fused GEMM nodes)"
# The transcription breakdown's clock: wall time, or with --clock thread the CPU time of the decoding thread (what
# the Python costs, without the time other processes of a shared machine take from it; ORT's runs then count only
# the part of their work done on that thread; "features + mel" stays the package's own wall-time figure, and the
# loop's rest is the searches' own: decode_window minus the timed pieces inside it).
CLOCK = time.perf_counter


def print_step_profile(p: dict) -> None:
    m = p["median_ms"]
    print(f"\n{p['what']}, intra-op threads "
          f"{p['threads'] or 'default'}: wall {p['wall_ms_median']:.2f} ms/run, ORT model_run {m['model_run']:.2f} "
          f"ms/run, {m.get('nodes run', 0):.0f} nodes run (medians; categories are medians each and need not add up "
          "exactly)")
    print(f"  {EP_KEY:34} {m.get(EP_KEY, 0):7.2f} ms  {m.get(EP_KEY, 0) / m['model_run'] * 100:5.1f}%")
    print(f"  {'CPU EP nodes (all)':34} {m['cpu_nodes']:7.2f} ms  {m['cpu_nodes'] / m['model_run'] * 100:5.1f}%")
    for k, v in sorted(m.items(), key=lambda kv: -kv[1]):
        if k.startswith("CPU EP ") and v >= 0.05:
            print(f"    {k[7:]:32} {v:7.2f} ms")
    print(f"  {'session overhead (run - nodes)':34} {m['overhead']:7.2f} ms  {m['overhead'] / m['model_run'] * 100:5.1f}%")


class Timers:
    """Wall-clock timers wrapped around the decode loop's pieces (monkeypatched; the code itself is unchanged)."""

    def __init__(self):
        self.t = defaultdict(float)
        self.n = defaultdict(int)
        self._undo = []

    def wrap(self, owner, name, key):
        fn = getattr(owner, name)

        def timed(*a, **k):
            t0 = CLOCK()
            try:
                return fn(*a, **k)
            finally:
                self.t[key] += CLOCK() - t0
                self.n[key] += 1

        setattr(owner, name, timed)
        self._undo.append((owner, name, fn))

    def undo(self):
        for owner, name, fn in reversed(self._undo):
            setattr(owner, name, fn)
        self._undo.clear()


def loop_breakdown(w, audio, beams: int, runs: int) -> dict:
    """Median over `runs` of each timer for one transcription (seconds)."""
    run_ort_values = onnx_model.run_ort_values

    def session_timers(timers):
        # the sessions' own run calls (onnx_model.run_ort_values), separated from the Python around them in
        # WhisperOnnx.step/start
        keys = {id(w.encoder): "encoder run", id(w.decoder): "prompt run (decoder)",
                id(w.decoder_with_past): "decoder_with_past run"}

        def timed(session, *a, **k):
            t0 = CLOCK()
            try:
                return run_ort_values(session, *a, **k)
            finally:
                if (key := keys.get(id(session))) is not None:
                    timers.t[key] += CLOCK() - t0
                    timers.n[key] += 1

        onnx_model.run_ort_values = timed

    samples = defaultdict(list)
    transcribe_all(audio, w, language="en", beam_size=beams)  # warm-up
    for _ in range(runs):
        timers = Timers()
        session_timers(timers)
        timers.wrap(onnx_model.WhisperOnnx, "step", "WhisperOnnx.step (all)")
        timers.wrap(onnx_model.WhisperOnnx, "start", "WhisperOnnx.start (all)")
        # the batched step (apply_rows: the rules and the step's one exp pass), or before it one row at a time
        batched = hasattr(rules.LogitRules, "apply_rows")
        timers.wrap(rules.LogitRules, "apply_rows" if batched else "apply", "logit rules (+ the step's exp pass)")
        timers.wrap(search, "log_softmax", "log-probs + top-k")
        timers.wrap(search, "top_logprobs", "log-probs + top-k")
        timers.wrap(onnx_model, "reorder_rows", "KV reorder (beams)")
        timers.wrap(search, "decode_window", "decode_window (all)")
        t0 = CLOCK()
        r = transcribe_all(audio, w, language="en", beam_size=beams)
        total = CLOCK() - t0
        timers.undo()
        onnx_model.run_ort_values = run_ort_values
        tm = dict(timers.t)
        tm["total"] = total
        tm["features + mel"] = r.timings.get("features_s", 0.0) + r.timings.get("mel_s", 0.0)
        tm["steps"] = timers.n["decoder_with_past run"]
        # (a second prompt on a window, after a fallback, runs decoder_with_past: counted with the steps' runs)
        tm["start python around the runs"] = tm["WhisperOnnx.start (all)"] - tm.get("prompt run (decoder)", 0.0)
        tm["step python around the run"] = (tm["WhisperOnnx.step (all)"] - tm.get("decoder_with_past run", 0.0)
                                            - tm.get("KV reorder (beams)", 0.0))
        rules_s, top_k_s = tm["logit rules (+ the step's exp pass)"], tm["log-probs + top-k"]
        if CLOCK is time.perf_counter:
            tm["search loop python (rest)"] = (total - tm.get("encoder run", 0) - tm["WhisperOnnx.start (all)"]
                                               - tm["WhisperOnnx.step (all)"] - rules_s - top_k_s
                                               - tm["features + mel"])
        else:  # (the features may be computed on another thread: only the search's own loop here)
            tm["search loop python (rest)"] = (tm["decode_window (all)"] - tm["WhisperOnnx.start (all)"]
                                               - tm["WhisperOnnx.step (all)"] - rules_s - top_k_s)
        tm["search python (the three above)"] = rules_s + top_k_s + tm["search loop python (rest)"]
        for k, v in tm.items():
            samples[k].append(v)
    return {k: statistics.median(v) for k, v in samples.items()} | {"text": r.text}


def print_breakdown(name, b):
    total = b["total"]
    steps = b["steps"]
    print(f"\n{name}: {total:.3f} s total, {steps:.0f} decoder_with_past runs "
          f"({b.get('decoder_with_past run', 0) / max(steps, 1) * 1e3:.2f} ms per run)")
    keys = ["features + mel", "encoder run", "WhisperOnnx.start (all)", "prompt run (decoder)",
            "start python around the runs", "decoder_with_past run",
            "KV reorder (beams)", "step python around the run", "logit rules (+ the step's exp pass)",
            "log-probs + top-k", "search loop python (rest)", "search python (the three above)"]
    for k in keys:
        v = b.get(k, 0.0)
        print(f"  {k:40} {v:7.3f} s  {v / total * 100:5.1f}%")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--provider", default="xdna", help="xdna or cpu (default xdna)")
    parser.add_argument("--steps", type=int, default=30, help="decoder steps profiled per batch size")
    parser.add_argument("--runs", type=int, default=3, help="transcriptions per decoding mode (median)")
    parser.add_argument("--model", default="base")
    parser.add_argument("--precision", default=DEFAULT_PRECISION,
                        help="the XDNA EP's precision policy (default: xdna transcribe's, auto = int8 on the emulator)")
    parser.add_argument("--past", type=int, nargs="+", default=[40],
                        help="self-attention cache lengths (tokens) to profile the step at (Whisper: up to 448)")
    parser.add_argument("--threads", type=int, nargs="+", default=[0],
                        help="ORT intra-op thread counts to profile the step with (0 = ORT's default)")
    parser.add_argument("--skip-steps", action="store_true", help="only the transcription breakdown")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="the transcription breakdown's clock: wall time, or the decoding thread's CPU time")
    parser.add_argument("--skip-transcription", action="store_true", help="only the ORT profiles")
    parser.add_argument("--compare-original", action="store_true",
                        help="profile each step on optimum's decoder graph too, in turns with the optimised copy")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.thread_time if args.clock == "thread" else time.perf_counter
    ort.set_default_logger_severity(3)
    model_dir = ensure_model(args.model)
    on_ep = args.provider.lower() in ("xdna", xdna.EP_NAME.lower())
    w = load_model(model_dir, provider=args.provider, precision=args.precision if on_ep else None)
    print("machine:", machine_line())
    print(f"provider: {w.provider}" + (f", precision {describe(args.precision)} (no NPU here: the CPU emulator of "
                                       "the NPU kernel contract)" if on_ep else ""))
    print("decoders: " + ("optimised copies (whisper/decoder_graph.py)" if w.optimised_paths else
                          "optimum's export as is (XDNA_OPTIMISED_DECODERS=0)"))
    clips, _ = build_clips(fetch_speech_samples(), include_long=False)
    (clip_name, (audio, _, _)), = clips.items()
    if not args.skip_steps:
        from onnxruntime_ep_xdna.whisper import features

        mel = features.from_array(audio, w.n_mels, w.mel_filters)
        mel_window = mel.window(0, min(N_FRAMES, mel.content_frames))
        for threads in args.threads:
            print_step_profile(encoder_profile(w, mel_window, max(3, args.steps // 6), threads))
        window = w.encode(mel_window)
        w.start(window, [w.tokens.sot])  # computes the window's cross-attention K/V
        for past in args.past:
            for batch in (1, 5):
                for threads in args.threads:
                    for p in step_profile(w, window, batch, past, args.steps, threads, args.compare_original):
                        print_step_profile(p)
    if args.skip_transcription:
        return
    print(f"\ntranscription of the {clip_name} clip, medians of {args.runs} runs "
          f"({'wall time' if args.clock == 'wall' else 'CPU time of the decoding thread'}):")
    for beams, name in ((5, "beam 5 (defaults)"), (1, "greedy")):
        print_breakdown(name, loop_breakdown(w, audio, beams, args.runs))


if __name__ == "__main__":
    main()
