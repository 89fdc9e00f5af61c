"""Whisper benchmark: greedy and 5-beam decoding side by side for the stock optimum pipeline, the package's own
`xdna transcribe` (CPU EP and XDNA EP) and faster-whisper (int8 and fp32), on the same real speech in one run.

Without an NPU (the usual case here) the XDNA EP runs its GEMMs on the CPU emulator of the NPU kernel contract
(bf16 operands, fp32 accumulation): every figure is then a CPU figure. Runners, each "greedy" and "beam 5":
  * optimum + CPU EP:  ORTModelForSpeechSeq2Seq + transformers' "automatic-speech-recognition" pipeline
    (beam 5 = the pipeline's own defaults, greedy = num_beams=1; chunk_length_s=30 on clips over 30 s);
  * xdna transcribe, CPU EP / XDNA EP:  onnxruntime_ep_xdna.whisper.transcribe_all with its defaults (beam 5,
    temperature fallback, timestamps, condition_on_previous_text), greedy = beam_size=1; on the XDNA EP with
    `xdna transcribe`'s default precision (auto: int8 on the emulator, bf16 on an NPU), and "XDNA EP bf16" rows
    in bf16 (--no-bf16 drops them);
  * faster-whisper int8 / fp32:  CTranslate2 on the same whisper-base weights, WhisperModel.transcribe defaults
    (beam 5), greedy = beam_size=1 (needs `pip install 'onnxruntime-ep-xdna[bench]'`).
All are told the language (en). Clips are real utterances (pocketsphinx test data) joined with 0.3 s of silence:
~29 s (one window) and ~81 s (long form, every utterance twice); WER also on the 11 single utterances.
Each runner transcribes each clip once as warm-up, then N times; runners take turns (rotating who goes first) so
background load hits all alike. Times are medians of the transcription call alone; model load is reported apart.

    python3 benchmarks/whisper.py                    # full run (~15 min on 2 cores)
    python3 benchmarks/whisper.py --quick            # 1 timed run, no long-form clip
    python3 benchmarks/whisper.py --section decoding --runners "XDNA EP" "int8, beam 5"   # issue 7's target rows
    python3 benchmarks/whisper.py --json out.json --chart rtf.png
    python3 benchmarks/whisper.py --section vad-words  # only VAD and word timestamps (issue 8), ~5 min
    python3 benchmarks/whisper.py --section precision  # precision policies of the XDNA EP vs fp32 (issue 13)

Section precision: `xdna transcribe` on the XDNA EP under each precision policy (bf16, int8, the mixed ones,
bf16x3) against the CPU EP (fp32), one policy loaded at a time: WER (transcribe defaults, beam 5) on the 11
utterances, the 29 s clip and the long clip, and greedy on the 29 s clip: wall time and process CPU time (medians;
CPU time is less sensitive to other processes on a shared machine), the encoder's time per window and the time
per decoder step, from the transcription's own timings.

Section vad-words: (1) a ~2 min clip of the real utterances separated by long digital silences and stretches of
synthesised noise (white noise, a hum + harmonics, babble-like filtered noise), transcribed by `xdna transcribe`
(XDNA EP, defaults) with and without vad_filter: words whose timing falls inside a silence/noise stretch
("invented"), WER, time; (2) word timestamps against known boundaries: words synthesised one by one by espeak-ng
and joined with known silences (0.15-0.45 s, and 0.05-0.15 s), |error| of word starts and ends on the XDNA EP
and the CPU EP.
"""

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm import machine_line  # noqa: E402  (same machine description as the GEMM benchmark)

import onnxruntime_ep_xdna as xdna  # noqa: E402
from onnxruntime_ep_xdna._precision import DEFAULT as DEFAULT_PRECISION, describe  # noqa: E402
from onnxruntime_ep_xdna.whisper import ensure_ct2_model, ensure_model, load_model, transcribe_all  # noqa: E402
from onnxruntime_ep_xdna.whisper.evaluation import (  # noqa: E402
    corpus_wer, fetch_speech_samples, load_wav_16k, normalize_text)

SR = 16_000
GAP = np.zeros(int(0.3 * SR), dtype=np.float32)
BASELINE = "optimum + CPU EP, greedy"
# Clips by utterance file stem (see fetch_speech_samples); "*" = all 11 in order. The 29 s clip stays under 30 s
# so it is one Whisper window for every runner.
CLIPS = {
    "30s": [f"sense_and_sensibility_01_austen_64kb-{n}" for n in ("0870", "0880", "0890", "0920", "0930")]
           + ["goforward"],
    "long": ["*", "*"],
}


def build_clips(samples, include_long=True):
    """{"<duration> s": (audio, reference text, CLIPS key)} joined in numpy, plus the single utterances for WER."""
    utts = {p.stem: (load_wav_16k(p), text) for p, text in samples}
    clips = {}
    for name, stems in CLIPS.items():
        if name == "long" and not include_long:
            continue
        stems = [s for group in stems for s in (list(utts) if group == "*" else [group])]
        pieces = [x for s in stems for x in (utts[s][0], GAP)][:-1]
        audio = np.concatenate(pieces)
        clips[f"{audio.size / SR:.1f} s"] = (audio, " ".join(utts[s][1] for s in stems), name)
    return clips, list(utts.values())


# ----------------------------------------------------------------------------------------------------------------
# Runners: name -> (load seconds, fn(audio) -> text)

def optimum_runner(model_dir, provider, beams):
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq
    from transformers import WhisperProcessor, pipeline

    kwargs = {}
    if provider == xdna.EP_NAME:
        xdna.register()
        kwargs["session_options"] = xdna.session_options()  # spinning off: ORT's spinners starve the emulator
    t = time.perf_counter()
    model = ORTModelForSpeechSeq2Seq.from_pretrained(str(model_dir), provider=provider, **kwargs)
    processor = WhisperProcessor.from_pretrained(str(model_dir))
    pipe = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                    feature_extractor=processor.feature_extractor)
    load_s = time.perf_counter() - t
    # beam 5 = the pipeline's defaults as shipped (transformers' ASR pipeline decodes Whisper with 5 beams);
    # greedy = num_beams=1. Stock behaviour otherwise: the pipeline hands generate() an attention_mask, with which
    # transformers cuts the mel at the speech's end and zero-pads it.
    gen = {"language": "en", "task": "transcribe"}
    if beams == 1:
        gen["num_beams"] = 1

    def run(audio):
        extra = {"chunk_length_s": 30} if audio.size > 30 * SR else {}
        out = pipe(audio.copy(), generate_kwargs=dict(gen), **extra)
        return out["text"].strip()

    return load_s, run


def xdna_transcribe_runner(model_dir, provider, beams, precision=None):
    """`precision`: the XDNA EP's policy; the runners of the table pass xdna transcribe's default (auto)."""
    t = time.perf_counter()
    w = load_model(model_dir, provider=provider, precision=precision)
    load_s = time.perf_counter() - t
    # the defaults (beam 5, best_of 5, fallback, timestamps, condition_on_previous_text); greedy = beam_size=1
    return load_s, lambda audio: transcribe_all(audio, w, language="en", beam_size=beams).text


def faster_whisper_runner(compute_type, beams):
    from faster_whisper import WhisperModel

    ct2_dir = ensure_ct2_model("base")
    t = time.perf_counter()
    model = WhisperModel(str(ct2_dir), device="cpu", compute_type=compute_type, cpu_threads=os.cpu_count())
    load_s = time.perf_counter() - t

    def run(audio):
        # WhisperModel.transcribe defaults (beam 5, temperature fallback, condition_on_previous_text, timestamps)
        segments, _ = model.transcribe(audio, language="en", task="transcribe", beam_size=beams)
        return "".join(s.text for s in segments).strip()  # segments is lazy: decoding happens here

    return load_s, run


# ----------------------------------------------------------------------------------------------------------------

def timed(fn, audio):
    t = time.perf_counter()
    text = fn(audio)
    return time.perf_counter() - t, text


def total_wer(pairs, norm=None):
    return corpus_wer(pairs) if norm is None else corpus_wer(pairs, norm)


def cell(r, clip):
    c = r["clips"].get(clip)
    return "-" if c is None else f"{c['median_s']:.2f} s, RTF {c['rtf']:.3f}, {c['vs_baseline']:.2f}x"


def print_report(results, clips, runs):
    names = list(results)
    clip_names = list(clips)
    print(f"\nTimes: median of {runs} run(s) of the transcription call, after one warm-up run. "
          f"RTF = processing time / audio duration (lower is faster). "
          f"Nx = '{BASELINE}' time / runner time (>1: faster than the stock optimum pipeline on the CPU EP).\n")
    print("| runner | load s | " + " | ".join(f"{c} clip" for c in clip_names) + " | WER (11 utts) |")
    print("|---" * (len(clip_names) + 3) + "|")
    for n in names:
        r = results[n]
        print(f"| {n} | {r['load_s']:.1f} | " + " | ".join(cell(r, c) for c in clip_names)
              + f" | {r['wer'] * 100:.1f}% |")
    print("\nWER: lower-case, no punctuation, number words = digits (normalize_text + digits); 'raw' keeps "
          "'10' != 'ten'. Per clip against the joined references; the 11 utterances are transcribed one by one "
          "(one pass, its summed time shown).\n")
    print("| runner | " + " | ".join(f"{c} clip" for c in clip_names) + " | 11 utts | 11 utts, raw | 11 utts, time |")
    print("|---" * (len(clip_names) + 4) + "|")
    for n in names:
        r = results[n]
        print(f"| {n} | " + " | ".join(f"{r['clips'][c]['wer'] * 100:.1f}%" for c in clip_names)
              + f" | {r['wer'] * 100:.1f}% | {r['wer_raw'] * 100:.1f}% | {r['wer_set_s']:.2f} s |")

    print_targets(results, clip_names)
    base = results[BASELINE]["clips"]
    for c in clip_names:
        differ = [n for n in names if normalize_text(results[n]["clips"][c]["text"]) != normalize_text(base[c]["text"])]
        print(f"\n{c} clip: transcripts " + (f"differ from '{BASELINE}' for: {', '.join(differ)}" if differ
                                             else "identical across runners after normalization"))
        if differ or clips[c][2] == "30s":  # the one-window clip is always shown
            for n in names:
                print(f"  {n:36} {results[n]['clips'][c]['text']!r}")


def print_targets(results, clip_names):
    """Issue 7's targets, same run: time ratios (<= 0.5x) and WER against the best reference runner."""
    def ratio(a, b, c):
        if a not in results or b not in results:
            return None
        return results[a]["clips"][c]["median_s"] / results[b]["clips"][c]["median_s"]

    print("\nTargets (same run; time ratio = runner time / reference time, target <= 0.50x):\n")
    print("| comparison | " + " | ".join(f"{c} clip" for c in clip_names) + " |")
    print("|---" * (len(clip_names) + 1) + "|")
    pairs = [("xdna transcribe, XDNA EP, beam 5", "faster-whisper int8, beam 5"),
             ("xdna transcribe, CPU EP, beam 5", "faster-whisper int8, beam 5"),
             ("xdna transcribe, XDNA EP, greedy", "optimum + CPU EP, greedy"),
             ("xdna transcribe, CPU EP, greedy", "optimum + CPU EP, greedy")]
    for a, b in pairs:
        cells = [ratio(a, b, c) for c in clip_names]
        if all(x is None for x in cells):
            continue
        print(f"| {a} / {b} | " + " | ".join("-" if x is None else f"{x:.2f}x" + (" ok" if x <= 0.5 else " MISSED")
                                            for x in cells) + " |")
    refs = [n for n in results if n.startswith(("optimum", "faster-whisper"))]
    ours = "xdna transcribe, XDNA EP, beam 5"
    if ours in results and refs:
        print(f"\nWER of '{ours}' vs the best reference runner ({', '.join(refs)}):")
        for c in clip_names + ["11 utts"]:
            get = (lambda n: results[n]["wer"]) if c == "11 utts" else (lambda n: results[n]["clips"][c]["wer"])
            best = min(refs, key=get)
            verdict = "ok" if get(ours) <= get(best) + 1e-9 else "MISSED"
            print(f"  {c}: {get(ours) * 100:.1f}% vs {get(best) * 100:.1f}% ({best}) {verdict}")


def draw_chart(path, results, clips, header):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\n--chart skipped: matplotlib is not installed (pip install matplotlib, or "
              f"pip install 'onnxruntime-ep-xdna[bench]')")
        return
    names, clip_names = list(results), list(clips)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(10, 5))
    for i, n in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(clip_names))]
        rtf = [results[n]["clips"][c]["rtf"] for c in clip_names]
        bars = ax.bar(xs, rtf, width, label=n)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(clip_names)), [f"{c} clip" for c in clip_names])
    ax.set_ylabel("RTF = processing time / audio duration (lower is better)")
    ax.set_title("whisper-base, English; median transcription time / audio duration\n" + header, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nchart: {path}")


def noise_stretches(seconds: float, rng) -> list[np.ndarray]:
    """Synthesised non-speech: white noise, a 50 Hz hum with harmonics, and low-passed noise bursts."""
    n = int(seconds * SR)
    t = np.arange(n) / SR
    white = 0.05 * rng.standard_normal(n)
    hum = sum(0.08 / k * np.sin(2 * np.pi * 50 * k * t) for k in range(1, 8))
    bursts = np.convolve(rng.standard_normal(n), np.ones(40) / 40, mode="same") * (
        0.5 + 0.5 * np.sign(np.sin(2 * np.pi * 1.5 * t))) * 0.6
    return [x.astype(np.float32) for x in (white, hum, bursts)]


def pauses_clip(samples):
    """Real utterances separated by 6-10 s of silence or noise; (audio, reference, [(start, end) non-speech])."""
    rng = np.random.default_rng(8)
    utts = [(load_wav_16k(p), text) for p, text in samples]
    noises = noise_stretches(6.0, rng)
    parts, quiet, refs, t = [], [], [], 0.0
    for i, (audio, text) in enumerate(utts):
        filler = np.zeros(int((6 + 2 * (i % 3)) * SR), np.float32) if i % 2 == 0 else noises[(i // 2) % 3]
        quiet.append((t, t + filler.size / SR))
        parts += [filler, audio]
        refs.append(text)
        t += (filler.size + audio.size) / SR
    tail = np.zeros(5 * SR, np.float32)
    quiet.append((t, t + tail.size / SR))
    parts.append(tail)
    return np.concatenate(parts), " ".join(refs), quiet


def vad_words_section(model_dir, samples, results):
    from onnxruntime_ep_xdna.whisper.evaluation import espeak_word_clip, word_timing_errors

    audio, ref, quiet = pauses_clip(samples)
    dur = audio.size / SR
    print(f"VAD: {dur:.1f} s clip, {len(quiet)} silence/noise stretches "
          f"({sum(b - a for a, b in quiet):.1f} s), {len(ref.split())} reference words", flush=True)
    vad = results.setdefault("vad", {})
    for provider in ("xdna",):
        w = load_model(model_dir, provider)
        for use_vad in (False, True):
            transcribe_all(audio[: 5 * SR], w, language="en")  # warm-up
            t0 = time.perf_counter()
            timed_result = transcribe_all(audio, w, language="en", vad_filter=use_vad)
            elapsed = time.perf_counter() - t0
            r = transcribe_all(audio, w, language="en", vad_filter=use_vad, word_timestamps=True)
            words = [x for s in r.segments for x in (s.words or [])]
            invented = [x.word for x in words if any(a + 0.3 < (x.start + x.end) / 2 < b - 0.3 for a, b in quiet)]
            key = f"{provider}, vad {'on' if use_vad else 'off'}"
            vad[key] = {"time_s": elapsed, "rtf": elapsed / dur, "wer": total_wer([(ref, timed_result.text)]),
                        "wer_with_words": total_wer([(ref, r.text)]), "invented_words": len(invented),
                        "invented": invented, "windows": timed_result.timings.get("windows"),
                        "vad_s": timed_result.timings.get("vad_s"), "text": timed_result.text}
            print(f"  {key:20} {elapsed:6.1f} s  RTF {elapsed / dur:.3f}  WER {vad[key]['wer']:.3f}  "
                  f"windows {vad[key]['windows']}  words inside silence/noise: {len(invented)} {invented[:8]}",
                  flush=True)

    words = "please call stella and ask her to bring these things with her from the store".split()
    timing = results.setdefault("word_timing", {})
    clips = {"gaps 0.15-0.45 s": espeak_word_clip(words),
             "gaps 0.05-0.15 s": espeak_word_clip(words, [0.05 + 0.1 * ((i * 3) % 4) / 3 for i in range(len(words))])}
    print("word timestamps vs known boundaries (espeak-ng words joined with known silences):", flush=True)
    for clip_name, (clip, reference) in clips.items():
        for provider in ("xdna", "cpu"):
            w = load_model(model_dir, provider)
            r = transcribe_all(clip, w, language="en", word_timestamps=True)
            hyp = [x for s in r.segments for x in s.words]
            errors, matched = word_timing_errors(reference, hyp)
            starts, ends = errors[0::2], errors[1::2]
            key = f"{clip_name}, {provider}"
            timing[key] = {"median_abs_error_s": float(np.median(errors)), "mean_abs_error_s": float(np.mean(errors)),
                           "median_start_error_s": float(np.median(starts)),
                           "median_end_error_s": float(np.median(ends)), "max_abs_error_s": float(np.max(errors)),
                           "matched": matched, "words": len(reference), "text": r.text}
            c = timing[key]
            print(f"  {key:26} median |err| {c['median_abs_error_s']:.3f} s (starts {c['median_start_error_s']:.3f}, "
                  f"ends {c['median_end_error_s']:.3f}), mean {c['mean_abs_error_s']:.3f}, max "
                  f"{c['max_abs_error_s']:.3f}; {matched}/{len(reference)} words matched", flush=True)


PRECISION_POLICIES = ["fp32 (CPU EP)", "bf16", "int8", "mixed", "mixed-conv", "bf16x3"]


def precision_section(model_dir, samples, runs, policies, include_long):
    """{policy: {...}} (see the module doc), printed as one table and returned for --json."""
    import gc

    clips, utterances = build_clips(samples, include_long=include_long)
    clip30 = next(c for c, (_, _, key) in clips.items() if key == "30s")
    results = {}
    for policy in policies:
        cpu = policy.startswith("fp32")
        print(f"precision {policy}: loading ...", flush=True)
        t = time.perf_counter()
        w = load_model(model_dir, provider="cpu" if cpu else "xdna", precision=None if cpu else policy)
        r = {"rules": "" if cpu else describe(policy), "load_s": time.perf_counter() - t, "clips": {}}
        # WER with the transcribe defaults (beam 5): the 11 utterances one by one, then the clips
        t = time.perf_counter()
        texts = [transcribe_all(a, w, language="en").text for a, _ in utterances]
        r["utts_s"] = time.perf_counter() - t
        r["utts_texts"] = texts
        r["wer_utts"] = total_wer([(ref, h) for (_, ref), h in zip(utterances, texts)])
        for clip, (audio, ref, _) in clips.items():
            text = transcribe_all(audio, w, language="en").text
            r["clips"][clip] = {"text": text, "wer": total_wer([(ref, text)])}
        # greedy on the 29 s clip: warm-up, then `runs` timed runs
        audio = clips[clip30][0]
        transcribe_all(audio, w, language="en", beam_size=1)
        walls, cpus, enc, step = [], [], [], []
        for _ in range(runs):
            time.sleep(0.2)
            c0, t0 = time.process_time(), time.perf_counter()
            res = transcribe_all(audio, w, language="en", beam_size=1)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            enc.append(res.timings.get("encoder_s", 0.0))
            n = res.timings.get("decoder_steps", 0)
            step.append(res.timings.get("decoder_steps_s", 0.0) / n if n else float("nan"))
        r.update(greedy_wall_s=statistics.median(walls), greedy_cpu_s=statistics.median(cpus),
                 encoder_s=statistics.median(enc), step_ms=1e3 * statistics.median(step),
                 greedy_wer=total_wer([(clips[clip30][1], res.text)]))
        results[policy] = r
        print(f"  {policy}: WER 11 utts {100 * r['wer_utts']:.1f}%, greedy {r['greedy_wall_s']:.2f} s wall, "
              f"{r['greedy_cpu_s']:.2f} s CPU, step {r['step_ms']:.1f} ms", flush=True)
        del w
        from onnxruntime_ep_xdna.whisper import onnx_model

        onnx_model._MODEL_CACHE.clear()  # one policy's sessions in memory at a time
        gc.collect()
    base = results.get(policies[0])
    print()
    print(f"Precision policies, greedy timings on the {clip30} clip: median of {runs} run(s) after a warm-up; "
          "WER with the transcribe defaults (beam 5); 'vs fp32' = WER points above the first row.")
    clip_names = list(clips)
    print("| policy | greedy wall s | greedy CPU s | encoder s/window | decoder step ms | "
          + " | ".join(f"WER {c}" for c in clip_names) + " | WER 11 utts | vs fp32 (11 utts) |")
    print("|---" * (7 + len(clip_names)) + "|")
    for policy, r in results.items():
        delta = "" if base is None else f"{100 * (r['wer_utts'] - base['wer_utts']):+.1f}"
        print(f"| {policy} | {r['greedy_wall_s']:.2f} | {r['greedy_cpu_s']:.2f} | {r['encoder_s']:.2f} | "
              f"{r['step_ms']:.1f} | " + " | ".join(f"{100 * r['clips'][c]['wer']:.1f}%" for c in clip_names)
              + f" | {100 * r['wer_utts']:.1f}% | {delta} |")
    for policy, r in results.items():
        if r["rules"] and r["rules"] != policy:
            print(f"  {policy}: {r['rules']}")
    if base is not None:
        for policy, r in results.items():
            diff = [i for i, (a, b) in enumerate(zip(r["utts_texts"], base["utts_texts"]))
                    if normalize_text(a) != normalize_text(b)]
            if diff and policy != policies[0]:
                print(f"  {policy}: utterances transcribed differently from {policies[0]}: "
                      + "; ".join(f"#{i}: {r['utts_texts'][i]!r}" for i in diff))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 timed run, no long-form clip")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per clip and runner (default 3)")
    parser.add_argument("--no-long", action="store_true", help="without the long-form clip")
    parser.add_argument("--model", default="base", help="model name or directory for ensure_model (default base)")
    parser.add_argument("--no-faster-whisper", action="store_true", help="skip the faster-whisper runner")
    parser.add_argument("--no-bf16", action="store_true",
                        help="without the 'XDNA EP bf16' rows (the XDNA EP rows run xdna transcribe's default "
                             "precision, auto; these run the EP's bf16)")
    parser.add_argument("--runners", nargs="+", metavar="TEXT",
                        help="only the runners whose name contains one of these (the baseline always runs), "
                             "e.g. --runners 'XDNA EP' 'int8, beam 5'")
    parser.add_argument("--json", metavar="PATH", help="write all results (times, transcripts, WER) here")
    parser.add_argument("--chart", metavar="PATH.png", help="bar chart of RTF per clip and runner (matplotlib)")
    parser.add_argument("--policies", default=",".join(PRECISION_POLICIES),
                        help="--section precision: comma-separated policies (the first is the WER reference)")
    parser.add_argument("--section", choices=("all", "decoding", "vad-words", "precision"), default="all",
                        help="decoding = the runners' comparison; vad-words = VAD and word timestamps (issue 8)")
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs

    warnings.filterwarnings("ignore")  # transformers' deprecation chatter on every pipeline call
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    ort.set_default_logger_severity(3)  # "some nodes not assigned to the preferred EP" is expected (shape ops)

    model_dir = ensure_model(args.model)
    if args.section == "precision":
        xdna.register()
        meta = next((dict(d.ep_metadata) for d in ort.get_ep_devices() if d.ep_name == xdna.EP_NAME), {})
        print("Whisper precision policies (issue 13)")
        print("machine:", machine_line())
        print(f"XDNA EP backend: {meta.get('backend', '?')} ({meta.get('backend_device', '')})")
        if meta.get("backend") != "xrt":
            print("  -> no NPU: the XDNA EP ran every GEMM on the CPU emulator of the NPU kernel contract, in each "
                  "policy's precision; all figures are CPU figures.")
        print(f"model: {model_dir}; language en; load average at start {os.getloadavg()[0]:.1f}")
        extra = {"machine": machine_line(), "xdna_backend": meta,
                 "precision": precision_section(model_dir, fetch_speech_samples(), runs,
                                                args.policies.split(","), include_long=not args.quick)}
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
        if args.json:
            Path(args.json).write_text(json.dumps(extra, indent=1) + "\n")
            print(f"json: {args.json}")
        return
    if args.section == "vad-words":
        xdna.register()
        meta = next((dict(d.ep_metadata) for d in ort.get_ep_devices() if d.ep_name == xdna.EP_NAME), {})
        print("machine:", machine_line())
        if meta.get("backend") != "xrt":
            print("  -> no NPU: the XDNA EP ran every GEMM on the CPU emulator of the NPU kernel contract; "
                  "all figures are CPU figures.")
        extra = {"machine": machine_line(), "xdna_backend": meta}
        vad_words_section(model_dir, fetch_speech_samples(), extra)
        if args.json:
            Path(args.json).write_text(json.dumps(extra, indent=1) + "\n")
            print(f"json: {args.json}")
        return
    clips, utterances = build_clips(fetch_speech_samples(), include_long=not (args.quick or args.no_long))
    xdna.register()
    meta = next((dict(d.ep_metadata) for d in ort.get_ep_devices() if d.ep_name == xdna.EP_NAME), {})
    backend = f"{meta.get('backend', '?')} ({meta.get('backend_device', '')})"
    versions = {"onnxruntime": ort.__version__}
    for mod in ("optimum", "transformers", "faster_whisper", "ctranslate2"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            pass

    print("Whisper benchmark: greedy and beam 5; optimum pipeline vs xdna transcribe vs faster-whisper int8/fp32")
    machine = machine_line()
    print("machine:", machine)
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"XDNA EP backend: {backend}; 'XDNA EP' rows: precision {describe(DEFAULT_PRECISION)} (xdna "
          "transcribe's default), 'XDNA EP bf16' rows: bf16")
    if meta.get("backend") != "xrt":
        print("  -> no NPU: the XDNA EP ran every GEMM on the CPU emulator of the NPU kernel contract (in the "
              "row's precision); all figures are CPU figures.")
    print(f"load average at start {os.getloadavg()[0]:.1f}")
    print(f"model: {model_dir} (whisper-base, fp32 ONNX); language en")
    print("clips: " + ", ".join(f"{c} ({len(ref.split())} words)" for c, (_, ref, _) in clips.items())
          + f"; WER set: {len(utterances)} utterances, {sum(a.size for a, _ in utterances) / SR:.1f} s")
    print()

    print("loading models ...", flush=True)
    factories = {}
    for label, beams in (("greedy", 1), ("beam 5", 5)):
        factories[f"optimum + CPU EP, {label}"] = lambda b=beams: optimum_runner(model_dir, "CPUExecutionProvider", b)
        factories[f"xdna transcribe, CPU EP, {label}"] = lambda b=beams: xdna_transcribe_runner(model_dir, "cpu", b)
        factories[f"xdna transcribe, XDNA EP, {label}"] = lambda b=beams: xdna_transcribe_runner(
            model_dir, "xdna", b, DEFAULT_PRECISION)  # what `xdna transcribe` runs: precision auto
        if not args.no_bf16:
            factories[f"xdna transcribe, XDNA EP bf16, {label}"] = lambda b=beams: xdna_transcribe_runner(
                model_dir, "xdna", b, "bf16")
        if not args.no_faster_whisper:
            for ct in ("int8", "float32"):
                factories[f"faster-whisper {ct}, {label}"] = lambda b=beams, c=ct: faster_whisper_runner(c, b)
    if args.no_faster_whisper:
        print("  faster-whisper: skipped (--no-faster-whisper)")
    else:
        try:
            import faster_whisper  # noqa: F401
        except ImportError:
            print("  faster-whisper: skipped (not installed; pip install 'onnxruntime-ep-xdna[bench]')")
            factories = {k: v for k, v in factories.items() if not k.startswith("faster-whisper")}
    if args.runners:
        factories = {k: v for k, v in factories.items() if k == BASELINE or any(t in k for t in args.runners)}
    runners, results = {}, {}
    for name, make in factories.items():
        try:
            load_s, fn = make()
        except Exception as e:  # one runner failing (e.g. no network for the ct2 wheels) must not sink the rest
            print(f"  {name}: skipped ({type(e).__name__}: {str(e).strip().splitlines()[-1]})")
            continue
        runners[name] = fn
        results[name] = {"load_s": load_s, "clips": {}}
        print(f"  {name}: loaded in {load_s:.1f} s", flush=True)
    if BASELINE not in runners:
        sys.exit(f"the baseline runner '{BASELINE}' could not be loaded")

    names = list(runners)
    for clip, (audio, ref, _) in clips.items():
        duration = audio.size / SR
        print(f"clip {clip}: warm-up + {runs} run(s) x {len(names)} runners ...", flush=True)
        texts, times = {}, {n: [] for n in names}
        for n in names:
            texts[n] = runners[n](audio)  # warm-up; its transcript is the one reported (decoding is deterministic)
        for i in range(runs):
            for n in names[i % len(names):] + names[:i % len(names)]:
                time.sleep(0.2)  # let the previous runner's ORT threads stop spinning
                t, text = timed(runners[n], audio)
                times[n].append(t)
                if normalize_text(text) != normalize_text(texts[n]):
                    print(f"  note: {n} gave a different transcript on run {i + 1}")
        for n in names:
            med = statistics.median(times[n])
            results[n]["clips"][clip] = {"duration_s": duration, "times_s": times[n], "median_s": med,
                                         "rtf": med / duration, "text": texts[n], "reference": ref,
                                         "wer": total_wer([(ref, texts[n])])}
        for n in names:
            c = results[n]["clips"][clip]
            c["vs_baseline"] = results[BASELINE]["clips"][clip]["median_s"] / c["median_s"]
            print(f"  {n:36} {c['median_s']:7.2f} s  RTF {c['rtf']:.3f}  {c['vs_baseline']:.2f}x", flush=True)

    print(f"WER set: {len(utterances)} utterances x {len(names)} runners ...", flush=True)
    for n in names:
        pairs, spent = [], 0.0
        for audio, ref in utterances:
            t, text = timed(runners[n], audio)
            spent += t
            pairs.append((ref, text))
        results[n].update(wer=total_wer(pairs), wer_raw=total_wer(pairs, normalize_text), wer_set_s=spent,
                          wer_transcripts=[h for _, h in pairs])

    print_report(results, clips, runs)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    parts = machine.split("; ")
    header = f"{parts[0]}; onnxruntime {ort.__version__}; {parts[-1]}" + (
        "; XDNA EP = CPU emulator (no NPU)" if meta.get("backend") != "xrt" else "")
    if args.chart:
        draw_chart(args.chart, results, clips, header)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine, "versions": versions, "xdna_backend": meta, "runs": runs,
             "baseline": BASELINE, "wer_references": [ref for _, ref in utterances], "results": results},
            indent=1) + "\n")
        print(f"json: {args.json}")
    if args.section == "all":
        extra = {}
        vad_words_section(model_dir, fetch_speech_samples(), extra)
        if args.json:
            doc = json.loads(Path(args.json).read_text())
            doc.update(extra)
            Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
