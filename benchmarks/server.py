"""`xdna serve` benchmark: requests/min and p50/p95 latency for the bundled sample (7.1 s of speech) at 1, 2 and 4
concurrent clients, and the server's overhead against calling transcribe() directly, in one run.

The server is `xdna serve` started as a process on 127.0.0.1 (uvicorn, the defaults: one worker, beam 5);
clients are the official `openai` client, one thread each, each request a full upload + transcription. The direct
runs call `WhisperModel.transcribe` on the same file in this process, taking turns with single-client server
requests (so background load hits both alike). Without an NPU the XDNA EP runs its GEMMs on the CPU emulator:
every figure is a CPU figure.

    python3 benchmarks/server.py                   # whisper-base, 8 requests per level
    python3 benchmarks/server.py --requests 4 --levels 1,2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm import machine_line  # noqa: E402


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def start_server(model, provider, extra):
    proc = subprocess.Popen([sys.executable, "-m", "onnxruntime_ep_xdna.cli", "serve", "--model", str(model),
                             "--provider", provider, "--port", "0", "--max-queue", "16", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, log = None, []
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        log.append(line)
        m = re.search(r"listening on (http://\S+?)\s", line)
        if m:
            url = m.group(1)
            break
        if time.monotonic() > deadline:
            break
    if url is None:
        proc.kill()
        raise SystemExit("xdna serve did not start:\n" + "".join(log))
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, url


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="base")
    ap.add_argument("--provider", default="xdna", choices=("xdna", "cpu"))
    ap.add_argument("--requests", type=int, default=8, help="requests per concurrency level (default 8)")
    ap.add_argument("--levels", default="1,2,4")
    ap.add_argument("--json")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    import httpx
    import openai

    from onnxruntime_ep_xdna.whisper import WhisperModel, ensure_model
    from onnxruntime_ep_xdna.whisper.cli import sample_path

    model_dir = ensure_model(args.model) if not Path(args.model).is_dir() else Path(args.model)
    sample = sample_path()
    print("machine:", machine_line())
    proc, url = start_server(model_dir, args.provider, [])
    try:
        health = httpx.get(url + "/health", timeout=60).json()
        print(f"server: {url} model {health['model']} provider {health['provider']} backend {health['backend']}"
              f" ({health['backend_reason']})")
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)

        inside: list[tuple[float, float]] = []  # (latency, the server's own transcription time) per request

        def request():
            t = time.perf_counter()
            with open(sample, "rb") as f:
                raw = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=f)
            dt = time.perf_counter() - t
            inside.append((dt, float(raw.headers["x-processing-seconds"])))
            return dt, raw.parse().text

        direct_model = WhisperModel(model_dir, provider=args.provider)

        def direct():
            t = time.perf_counter()
            segments, _ = direct_model.transcribe(str(sample))
            text = "".join(s.text for s in segments).strip()
            return time.perf_counter() - t, text

        request(), direct()  # warm-up both
        # 1 client, taking turns with direct calls
        d_times, s_times = [], []
        for i in range(args.requests):
            order = (direct, request) if i % 2 == 0 else (request, direct)
            for fn in order:
                dt, text = fn()
                (d_times if fn is direct else s_times).append(dt)
        rows = []
        results = {"machine": machine_line(), "model": health["model"], "provider": health["provider"],
                   "backend": health["backend"], "audio_s": 7.1, "direct": {
                       "p50_s": statistics.median(d_times), "p95_s": pct(d_times, 0.95), "runs": d_times}}
        for c in levels:
            if c == 1:
                lat, wall = s_times, sum(s_times)
            else:
                lat, lock = [], threading.Lock()
                per = [args.requests // c + (1 if i < args.requests % c else 0) for i in range(c)]

                def worker(n):
                    for _ in range(n):
                        dt, _ = request()
                        with lock:
                            lat.append(dt)

                t0 = time.perf_counter()
                threads = [threading.Thread(target=worker, args=(n,)) for n in per]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
            row = {"clients": c, "requests": len(lat), "req_per_min": 60 * len(lat) / wall,
                   "p50_s": statistics.median(lat), "p95_s": pct(lat, 0.95)}
            rows.append(row)
        results["levels"] = rows
        overhead = statistics.median(s_times) / statistics.median(d_times) - 1
        results["overhead_1_client"] = overhead
        # The same overhead measured inside each single-client request: latency minus the server's own transcription
        # time (X-Processing-Seconds), so the machine's noise on the transcription itself cancels out.
        one = inside[1:1 + args.requests]
        results["overhead_in_request"] = statistics.median((lat - proc) / proc for lat, proc in one)
        results["overhead_in_request_s"] = statistics.median(lat - proc for lat, proc in one)
    finally:
        proc.terminate()
        proc.wait(60)
    print(f"\ndirect transcribe(): p50 {results['direct']['p50_s']:.3f} s, p95 {results['direct']['p95_s']:.3f} s "
          f"({len(d_times)} runs, 7.1 s sample)")
    print("| clients | requests | requests/min | p50 latency | p95 latency |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['req_per_min']:.1f} | {r['p50_s']:.3f} s | {r['p95_s']:.3f} s |")
    print(f"server overhead at 1 client (median latency vs direct): {overhead * 100:+.1f}%")
    print(f"server overhead inside a request (latency - the server's transcription time): "
          f"{results['overhead_in_request'] * 100:+.2f}% ({results['overhead_in_request_s'] * 1000:.0f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
