"""The search loop alone: the decoder's real logits recorded once, then the search replayed on them, so the
Python of the decode loop (logit rules, log-probabilities, top-k, candidate ranking) is timed without the
decoder runs and their noise. search.py's batched step against the plain row-by-row loop it replaced
(tests/search_reference.py: the loop as of 23f4291), taking turns; both must return the same tokens and
sum log-probabilities, bit for bit.

The logits are whisper-base's on the XDNA EP (no NPU here: the CPU emulator of the NPU kernel contract) for the
29 s clip of benchmarks/whisper.py (and with --long the 81 s one), beam 5 and greedy. Every figure is a CPU
figure: process CPU time (less sensitive to other processes on a shared machine than wall time), medians.

    python3 benchmarks/search_replay.py [--runs 7] [--long] [--provider xdna|cpu]
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import search_reference  # noqa: E402
from gemm import machine_line  # noqa: E402
from whisper import build_clips  # noqa: E402

from onnxruntime_ep_xdna.whisper import ensure_model, load_model, search, transcribe_all  # noqa: E402
from onnxruntime_ep_xdna.whisper.evaluation import fetch_speech_samples  # noqa: E402


class Replay:
    """The DecoderModel interface over one decode's recorded outputs: start and step return them in order and
    check that the search feeds the recorded tokens (the replayed search follows the recorded path)."""

    def __init__(self, model, start_out, steps):
        self.tokens, self.text = model.tokens, model.text
        self.start_out, self.steps = start_out, steps

    def start(self, window, prompt, rows=None):
        self.i = 0
        return self.start_out, None

    def step(self, state, tokens, order):
        fed, logits = self.steps[self.i]
        assert np.array_equal(fed, tokens), "the replayed search left the recorded path"
        self.i += 1
        return logits, None


def record(w, audio, **options):
    """Every decode_window call of one transcription: (its arguments, rng state, prompt logits, (tokens fed,
    logits) per step)."""
    decodes = []
    inner, start, step = search.decode_window, w.start, w.step

    def decode_window(model, window, prompt, sample_begin, rules, opt, temperature, rng, language_ids=(), timings=None):
        entry = {"args": (prompt, sample_begin, rules, opt, temperature, copy.deepcopy(rng), language_ids),
                 "steps": []}
        decodes.append(entry)
        r = inner(model, window, prompt, sample_begin, rules, opt, temperature, rng, language_ids, timings)
        entry["result"] = (r.tokens, r.sum_logprob)
        return r

    def start_(window, prompt, rows=None):
        logits, state = start(window, prompt, rows)
        decodes[-1]["start"] = logits.copy()
        return logits, state

    def step_(state, tokens, order):
        logits, state = step(state, tokens, order)
        decodes[-1]["steps"].append((np.array(tokens), np.array(logits)))
        return logits, state

    search.decode_window, w.start, w.step = decode_window, start_, step_
    try:
        result = transcribe_all(audio, w, language="en", **options)
    finally:
        search.decode_window = inner
        del w.start, w.step
    return decodes, result


def replay(w, decodes, plain: bool):
    """Process CPU seconds of the searches of one transcription replayed, and their results."""
    saved = search._sampling, search._beam_search
    if plain:
        search._sampling, search._beam_search = search_reference.sampling, search_reference.beam_search
    try:
        results, cpu = [], 0.0
        for d in decodes:
            prompt, sample_begin, rules, opt, temperature, rng, language_ids = d["args"]
            # fresh copies, outside the timer: the search filters the logits it is given in place
            model = Replay(w, d["start"].copy(), [(fed, logits.copy()) for fed, logits in d["steps"]])
            t = time.process_time()
            r = search.decode_window(model, None, prompt, sample_begin, rules, opt, temperature, copy.deepcopy(rng),
                                     language_ids)
            cpu += time.process_time() - t
            results.append((r.tokens, r.sum_logprob))
    finally:
        search._sampling, search._beam_search = saved
    return cpu, results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="replays of each loop (median)")
    parser.add_argument("--long", action="store_true", help="also the ~81 s clip")
    parser.add_argument("--provider", default="xdna")
    args = parser.parse_args()
    w = load_model(ensure_model("base"), provider=args.provider)
    print("machine:", machine_line())
    clips, _ = build_clips(fetch_speech_samples(), include_long=args.long)
    print(f"\nsearch python per transcription (process CPU time, median of {args.runs} replays each, taking turns):")
    print(f"{'clip':8} {'decoding':8} {'steps':>5} {'plain loop':>11} {'batched':>9} {'ratio':>6} "
          f"{'plain/step':>11} {'batched/step':>13}")
    for name, (audio, _, _) in clips.items():
        for beams, label in ((5, "beam 5"), (1, "greedy")):
            decodes, _ = record(w, audio, beam_size=beams)
            recorded = [d["result"] for d in decodes]
            steps = sum(len(d["steps"]) + 1 for d in decodes)
            times = {False: [], True: []}
            for run in range(args.runs):
                for plain in ((False, True) if run % 2 else (True, False)):
                    cpu, results = replay(w, decodes, plain)
                    times[plain].append(cpu)
                    assert results == recorded, f"the {'plain' if plain else 'batched'} search gave other results"
            old, new = statistics.median(times[True]), statistics.median(times[False])
            print(f"{name:8} {label:8} {steps:5d} {old:9.3f} s {new:7.3f} s {new / old:6.2f} "
                  f"{old / steps * 1e3:8.3f} ms {new / steps * 1e3:10.3f} ms")


if __name__ == "__main__":
    main()
