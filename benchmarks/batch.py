"""`xdna batch` benchmark: throughput of --engine local (one process; 2 worker processes) and --engine ray (2 actors,
a Ray instance started on this machine) on the same files, and the per-file scheduling overhead of each engine.

Without an NPU (the usual case here) the XDNA EP runs its GEMMs on the CPU emulator: every figure is a CPU figure.

  * throughput: whisper-base on the XDNA EP, real speech: --files long-form files (the 11 pocketsphinx utterances
    twice, ~81 s, order rotated per file) and the 11 utterances as separate short files; decoding defaults of
    `xdna transcribe` (beam 5) unless --beam-size; audio hours per wall hour for the whole command (Ray start-up
    and model loads included) and after the first worker was ready;
  * scheduling overhead per file: a tiny random-weight Whisper on --short-files files of 0.5 s, so the
    transcription is short and what the engine adds shows: (wall after the first worker was ready x workers
    - seconds the workers spent in transcription) / files;
  * resume: a second run over the finished output directory (every input skipped): seconds per input checked.

    python3 benchmarks/batch.py                  # ~10 min on 2 busy cores
    python3 benchmarks/batch.py --files 2 --short-files 30 --json batch.json
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm import machine_line  # noqa: E402

from onnxruntime_ep_xdna.batch import run_batch  # noqa: E402
from onnxruntime_ep_xdna.whisper import TranscriptionOptions, ensure_model, make_tiny_random_whisper  # noqa: E402
from onnxruntime_ep_xdna.whisper.evaluation import fetch_speech_samples, load_wav_16k  # noqa: E402

ENGINES = [("local, 1 process", dict(engine="local", workers=1)),
           ("local, 2 processes", dict(engine="local", workers=2)),
           ("ray, 2 actors", dict(engine="ray", workers=2))]


def quiet(_msg: str) -> None:
    pass


def one(label, inputs, out, model, options, kw) -> dict:
    t = time.perf_counter()
    s = run_batch(inputs, out, model=str(model), provider="xdna", options=options, formats=("txt",), log=quiet,
                  start_timeout=600, **kw)
    wall = time.perf_counter() - t
    assert s.exit_code == 0 and s.failed == 0, (label, s)
    workers = kw.get("workers") or 1
    after_ready = wall - (s.ready_s or 0.0)
    return {"engine": label, "files": s.done, "audio_s": round(s.audio_s, 2), "wall_s": round(wall, 2),
            "ready_s": round(s.ready_s or 0.0, 2), "busy_s": round(s.busy_s, 2),
            "throughput": round(s.audio_s / wall, 2), "throughput_after_ready": round(s.audio_s / after_ready, 2),
            "overhead_ms_per_file": round(1000 * max(0.0, after_ready * workers - s.busy_s) / max(1, s.done), 1)}


def write_wav(path: Path, seconds: float, freq: float) -> None:
    t = np.arange(int(16000 * seconds)) / 16000
    x = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(x.tobytes())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=4, help="long-form files of ~81 s real speech (default 4)")
    ap.add_argument("--beam-size", type=int, default=5)
    ap.add_argument("--short-files", type=int, default=60)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    print(machine_line())
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (a shared machine inflates "
          "every time below; compare within the run)")
    results = {"machine": machine_line(), "loadavg_start": os.getloadavg()[0], "real": [], "overhead": [],
               "resume": None}
    with tempfile.TemporaryDirectory(prefix="xdna-batch-bench-") as tmp:
        tmp = Path(tmp)
        corpus, clips = tmp / "speech", tmp / "clips"
        samples = [load_wav_16k(p) for p, _ in fetch_speech_samples()]
        gap = np.zeros(16000 * 3 // 10, np.float32)
        corpus.mkdir()
        for f in range(args.files):  # long-form files: every utterance twice, in a different order per file
            order = [samples[(f + k) % len(samples)] for k in range(len(samples))] * 2
            sf.write(str(corpus / f"talk{f:02d}.wav"), np.concatenate([x for a in order for x in (a, gap)]), 16000)
        clips.mkdir()
        for p, _ in fetch_speech_samples():
            shutil.copy(p, clips / p.name)
        base = ensure_model("base", log=quiet)
        options = TranscriptionOptions(beam_size=args.beam_size, language="en")
        for name, inputs, key in ((f"{args.files} long-form files (~81 s each)", corpus, "real"),
                                  ("11 single utterances (2-9 s: one mostly padded 30 s window each)", clips, "clips")):
            print(f"\nwhisper-base, XDNA EP (emulator), beam {args.beam_size}, {name}")
            print("| engine | files | audio s | wall s | first worker ready s | throughput (audio h / wall h) | "
                  "after ready | overhead ms/file |")
            print("|---|---|---|---|---|---|---|---|")
            results.setdefault(key, [])
            for i, (label, kw) in enumerate(ENGINES):
                r = one(label, [str(inputs)], tmp / f"out-{key}-{i}", base, options, kw)
                results[key].append(r)
                print(f"| {label} | {r['files']} | {r['audio_s']} | {r['wall_s']} | {r['ready_s']} | "
                      f"{r['throughput']} | {r['throughput_after_ready']} | {r['overhead_ms_per_file']} |", flush=True)
        t = time.perf_counter()
        s = run_batch([str(clips)], tmp / "out-clips-0", model=str(base), provider="xdna", options=options, log=quiet)
        resume = time.perf_counter() - t
        results["resume"] = {"files": s.skipped, "wall_s": round(resume, 3),
                             "ms_per_file": round(1000 * resume / max(1, s.skipped), 2)}
        print(f"\nresume over the finished run: {s.skipped} inputs skipped in {resume:.2f} s "
              f"({results['resume']['ms_per_file']} ms per input, no model loaded)")

        tiny = make_tiny_random_whisper(tmp / "tiny", seed=1, multilingual=False)
        short = tmp / "short"
        short.mkdir()
        for i in range(args.short_files):
            write_wav(short / f"s{i:03d}.wav", 0.5, 200 + 10 * i)
        fast = TranscriptionOptions(beam_size=1, temperature=(0.0,), sample_len=4, language="en")
        print(f"\nscheduling overhead: tiny random Whisper, {args.short_files} files of 0.5 s, greedy, 4 tokens")
        print("| engine | files | wall s | first worker ready s | worker busy s | overhead ms/file |")
        print("|---|---|---|---|---|---|")
        for i, (label, kw) in enumerate(ENGINES):
            r = one(label, [str(short)], tmp / f"out-short-{i}", tiny, fast, kw)
            results["overhead"].append(r)
            print(f"| {label} | {r['files']} | {r['wall_s']} | {r['ready_s']} | {r['busy_s']} | "
                  f"{r['overhead_ms_per_file']} |", flush=True)
    results["loadavg_end"] = os.getloadavg()[0]
    print(f"\nload average at the end: {results['loadavg_end']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
