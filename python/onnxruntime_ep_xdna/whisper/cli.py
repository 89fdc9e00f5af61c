"""`xdna transcribe`: the command line over transcribe.py.

Importing this module needs only the standard library (the parser is complete even without the whisper extra);
the heavy imports happen in `run_transcribe`, which says what to install when something is missing.
Exit status: 0 = every file transcribed and written, 1 = model/provider/options problem (nothing transcribed),
2 = at least one file failed (unusable input or unwritable output; the others were still done).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from .formats import CHOICES, FORMATS
from .options import DEFAULT_TEMPERATURES, OptionsError, TranscriptionOptions

# What transcribing an already exported model needs beyond numpy and onnxruntime (fetching one needs torch too).
RUNTIME_MODULES = ("soundfile", "tokenizers")
_D = TranscriptionOptions()


def sample_path() -> Path:
    """The bundled real-speech sample (LibriVox, public domain) used when `xdna transcribe` gets no file."""
    return Path(__file__).resolve().parent.parent / "samples" / "librivox_sense_and_sensibility_0870.wav"


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else float(text)


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip()) if text.strip() else ()


def precision_note(whisper) -> str:
    """", precision P" on the XDNA EP, or a note that the CPU EP ignores a --precision other than the default."""
    from .._precision import DEFAULT, describe

    asked = getattr(whisper, "precision", None)
    if whisper.provider == "XDNAExecutionProvider":
        return f", precision {describe(asked)}"
    return f" (fp32: --precision {asked} applies to the XDNA EP only)" if asked and asked != DEFAULT else ""


def add_precision_argument(parser) -> None:
    """--precision POLICY (xdna transcribe, serve, batch): onnxruntime_ep_xdna._precision."""
    from .._precision import DEFAULT

    parser.add_argument("--precision", default=DEFAULT, metavar="POLICY",
                        help="the XDNA EP's arithmetic: bf16, int8, bf16x3, a named policy (mixed, mixed-conv) or "
                             "precision_policy rules such as 'bf16:name=*proj_out*;int8:weight=constant' "
                             "(default %(default)s: the fastest within 0.5 WER points of fp32, benchmarks/README.md)")


def add_transcribe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="*", metavar="FILE",
                        help="audio files (wav/flac/ogg/mp3 via soundfile, anything else via ffmpeg), directories "
                             "(their audio files), or - for audio on stdin; none = the bundled sample")
    parser.add_argument("--recursive", action="store_true", help="look for audio in subdirectories of a directory too")
    parser.add_argument("--file-list", metavar="LIST", help="a text file naming one input per line (- = stdin)")
    parser.add_argument("--model", default="base", help="base | tiny.en | DIR with an optimum ONNX export (default base)")
    parser.add_argument("--provider", choices=("xdna", "cpu"), default="xdna",
                        help="run the model's MatMuls on the XDNA EP (default) or everything on the CPU EP")
    add_precision_argument(parser)
    parser.add_argument("--frontend", choices=("cpu", "ep"), default=None,
                        help="log-mel front end: numpy (cpu, the default: measured faster) or an ONNX model on "
                             "--provider (ep: its DFT and mel GEMMs on the XDNA EP in bf16x3)")
    parser.add_argument("--language", help="language code (e.g. en, de); detected from the first 30 s if absent")
    parser.add_argument("--task", choices=("transcribe", "translate"), default="transcribe",
                        help="translate = speech in any language to English text")
    parser.add_argument("--format", type=_formats, default=("txt",), metavar="FMT[,FMT...]",
                        help=f"output format(s), comma-separated: {', '.join(CHOICES)} (default txt); all = every "
                             "format; more than one needs -o")
    parser.add_argument("-o", "--output-dir", help="write FILE.<format> there instead of printing to stdout")
    parser.add_argument("--progress", action="store_true", help="progress bar on stderr even when it is not a terminal")
    parser.add_argument("--verbose", action="store_true",
                        help="print each segment on stderr as soon as it is decoded (instead of the progress bar)")
    w = parser.add_argument_group("voice activity detection and word timestamps")
    w.add_argument("--vad", action="store_true",
                   help="Silero VAD first: transcribe only the speech (silence and noise yield no text)")
    w.add_argument("--vad-threshold", type=float, default=0.5, help="speech probability threshold (default 0.5)")
    w.add_argument("--vad-min-speech-duration-ms", type=int, default=0, help="shorter speech is dropped (default 0)")
    w.add_argument("--vad-max-speech-duration-s", type=float, default=float("inf"),
                   help="longer speech is split (default no limit)")
    w.add_argument("--vad-min-silence-duration-ms", type=int, default=2000,
                   help="a pause this long ends a speech chunk (default 2000)")
    w.add_argument("--vad-speech-pad-ms", type=int, default=400, help="padding around speech chunks (default 400)")
    w.add_argument("--word-timestamps", action="store_true",
                   help="time every word (cross-attention + DTW); words in json, cues per word/line in srt/vtt")
    w.add_argument("--no-word-timing-refine", dest="word_timing_refine", action="store_false",
                   help="keep DTW's word bounds as they are (by default they are moved onto pauses and speech onsets "
                        "in the audio's energy)")
    w.add_argument("--prepend-punctuations", default=_D.prepend_punctuations,
                   help="punctuation merged into the next word")
    w.add_argument("--append-punctuations", default=_D.append_punctuations,
                   help="punctuation merged into the previous word")
    w.add_argument("--max-line-width", type=int, help="srt/vtt: characters per line (needs --word-timestamps)")
    w.add_argument("--max-line-count", type=int, help="srt/vtt: lines per cue (needs --word-timestamps)")
    w.add_argument("--max-words-per-line", type=int, help="srt/vtt: words per line (needs --word-timestamps)")
    w.add_argument("--highlight-words", action="store_true",
                   help="srt/vtt: one cue per word, the spoken word underlined (needs --word-timestamps)")
    w.add_argument("--hallucination-silence-threshold", type=float,
                   help="with --word-timestamps: skip silences longer than this (s) around likely hallucinations")
    w.add_argument("--clip-timestamps", help="only transcribe these stretches: start,end,start,end,... seconds "
                                             "(a missing last end = the end of the file)")
    w.add_argument("--language-detection-segments", type=int, default=1,
                   help="30 s windows whose language probabilities are averaged (default 1)")
    d = parser.add_argument_group("decoding (defaults: OpenAI whisper / faster-whisper)")
    d.add_argument("--beam-size", type=int, default=_D.beam_size, help=f"beams at temperature 0; 1 = greedy (default {_D.beam_size})")
    d.add_argument("--best-of", type=int, default=_D.best_of, help=f"candidates sampled at temperature > 0 (default {_D.best_of})")
    d.add_argument("--patience", type=float, default=_D.patience, help="beam search patience (default 1.0)")
    d.add_argument("--length-penalty", type=_optional_float, default=_D.length_penalty,
                   help="alpha of ((5+length)/6)**alpha; default none = divide by length")
    d.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURES[0], help="first temperature (default 0)")
    d.add_argument("--temperature-increment-on-fallback", type=_optional_float, default=0.2,
                   help="next temperatures up to 1.0 when a window fails the thresholds (default 0.2; none = no fallback)")
    d.add_argument("--compression-ratio-threshold", type=_optional_float, default=_D.compression_ratio_threshold,
                   help="fallback when the text's zlib compression ratio is above (default 2.4; none = off)")
    d.add_argument("--log-prob-threshold", type=_optional_float, default=_D.log_prob_threshold,
                   help="fallback when the average log-probability is below (default -1.0; none = off)")
    d.add_argument("--no-speech-threshold", type=_optional_float, default=_D.no_speech_threshold,
                   help="silence when P(no speech) is above and the log-probability below threshold (default 0.6)")
    d.add_argument("--condition-on-previous-text", action=argparse.BooleanOptionalAction,
                   default=_D.condition_on_previous_text,
                   help="prompt each window with the text committed so far (default on)")
    d.add_argument("--prompt-reset-on-temperature", type=float, default=_D.prompt_reset_on_temperature,
                   help="drop that prompt after a window decoded above this temperature (default 0.5)")
    d.add_argument("--initial-prompt", help="text to prompt the first window with (spelling, names, style)")
    d.add_argument("--prefix", help="text the transcript of the first window starts with")
    d.add_argument("--hotwords", help="hint words/phrases put in every window's prompt (ignored with --prefix)")
    d.add_argument("--suppress-tokens", type=_int_list, default=_D.suppress_tokens,
                   help="comma-separated token ids never generated; -1 = non-speech symbols (default -1)")
    d.add_argument("--suppress-blank", action=argparse.BooleanOptionalAction, default=_D.suppress_blank,
                   help="no blank as the first token of a window (default on)")
    d.add_argument("--without-timestamps", action="store_true",
                   help="decode text only (segments = whole windows)")
    d.add_argument("--max-initial-timestamp", type=float, default=_D.max_initial_timestamp,
                   help="latest first timestamp of a window in seconds (default 1.0)")
    d.add_argument("--seed", type=int, default=_D.seed, help="random seed of sampling at temperature > 0 (default 0)")


def _formats(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(x.strip().lower() for x in text.split(",") if x.strip()))
    bad = [n for n in names if n not in CHOICES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown format {', '.join(bad) or text!r}; choose from {', '.join(CHOICES)}")
    return FORMATS if "all" in names else names


def options_from_args(args) -> TranscriptionOptions:
    temps: tuple[float, ...] = (args.temperature,)
    inc = args.temperature_increment_on_fallback
    if inc is not None and inc > 0:
        n = int(round((1.0 - args.temperature) / inc))
        temps = tuple(round(args.temperature + i * inc, 6) for i in range(max(n, 0) + 1))
    return TranscriptionOptions(
        language=args.language, task=args.task, beam_size=args.beam_size, best_of=args.best_of,
        patience=args.patience, length_penalty=args.length_penalty, temperature=temps,
        compression_ratio_threshold=args.compression_ratio_threshold, log_prob_threshold=args.log_prob_threshold,
        no_speech_threshold=args.no_speech_threshold, condition_on_previous_text=args.condition_on_previous_text,
        prompt_reset_on_temperature=args.prompt_reset_on_temperature, initial_prompt=args.initial_prompt,
        prefix=args.prefix, hotwords=args.hotwords, suppress_tokens=args.suppress_tokens,
        suppress_blank=args.suppress_blank, without_timestamps=args.without_timestamps,
        max_initial_timestamp=args.max_initial_timestamp, seed=args.seed,
        word_timestamps=args.word_timestamps, word_timing_refine=args.word_timing_refine,
        prepend_punctuations=args.prepend_punctuations,
        append_punctuations=args.append_punctuations, vad_filter=args.vad,
        vad_parameters=dict(threshold=args.vad_threshold, min_speech_duration_ms=args.vad_min_speech_duration_ms,
                            max_speech_duration_s=args.vad_max_speech_duration_s,
                            min_silence_duration_ms=args.vad_min_silence_duration_ms,
                            speech_pad_ms=args.vad_speech_pad_ms) if args.vad else None,
        language_detection_segments=args.language_detection_segments,
        hallucination_silence_threshold=args.hallucination_silence_threshold, clip_timestamps=args.clip_timestamps)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        return False


class _ProgressBar:
    def __init__(self, name: str, stream=sys.stderr):
        self.name, self.stream, self._last = name, stream, -1

    def __call__(self, done: float, total: float | None) -> None:
        if total:
            frac = min(1.0, done / total)
            filled = int(frac * 30)
            line = f"\r{self.name}: [{'#' * filled}{'.' * (30 - filled)}] {frac * 100:5.1f}% {_hms(done)}/{_hms(total)}"
        else:
            line = f"\r{self.name}: {_hms(done)} processed"
        if line != self._last:
            self.stream.write(line)
            self.stream.flush()
            self._last = line

    def close(self) -> None:
        if self._last != -1:
            self.stream.write("\n")
            self.stream.flush()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".mp4", ".aac", ".webm", ".mkv",
                    ".mov", ".wma", ".aif", ".aiff", ".caf", ".amr", ".au"}
STDIN = "-"


def expand_inputs(files: Sequence[str], recursive: bool = False, file_list: str | None = None
                  ) -> tuple[list[str], list[tuple[str, str]]]:
    """Command-line inputs -> (audio inputs in order, [(input, error)]). A directory gives its audio files
    (by extension, sorted; subdirectories with recursive); a list file names one input per line (# comments)."""
    names = list(files)
    problems: list[tuple[str, str]] = []
    if file_list:
        try:
            text = sys.stdin.read() if file_list == STDIN else Path(file_list).read_text(encoding="utf-8")
            names += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        except (OSError, UnicodeDecodeError) as e:
            problems.append((file_list, f"{file_list}: cannot read the file list ({getattr(e, 'strerror', None) or e})"))
    out: list[str] = []
    for name in names:
        p = Path(name)
        if name != STDIN and p.is_dir():
            found = sorted(q for q in (p.rglob("*") if recursive else p.iterdir())
                           if q.is_file() and q.suffix.lower() in AUDIO_EXTENSIONS)
            if not found:
                problems.append((name, f"{name}: directory holds no audio files"
                                       f"{'' if recursive else ' (subdirectories need --recursive)'}"))
            out += [str(q) for q in found]
        else:
            out.append(name)
    return list(dict.fromkeys(out)), problems


def output_paths(inputs: Sequence[str], out_dir: Path, formats: Sequence[str]) -> dict[str, dict[str, Path]]:
    """input -> {format: output path}: <stem>.<format>, made unique (two inputs with the same stem get -2, -3...)
    and never the path of an input."""
    taken = {str(Path(f).resolve()) for f in inputs if f != STDIN}
    used: set[str] = set()
    result = {}
    for f in inputs:
        stem = "stdin" if f == STDIN else Path(f).stem
        n = 1
        while True:
            base = stem if n == 1 else f"{stem}-{n}"
            paths = {fmt: out_dir / f"{base}.{fmt}" for fmt in formats}
            keys = {str(p.resolve()) for p in paths.values()}
            if not keys & (taken | used):
                break
            n += 1
        used |= keys
        result[f] = paths
    return result


def _read_stdin(tmp_dir: Path) -> Path:
    path = tmp_dir / "stdin"
    with open(path, "wb") as out:
        while True:
            block = sys.stdin.buffer.read(1 << 20)
            if not block:
                break
            out.write(block)
    return path


def run_transcribe(args) -> int:
    def err(msg: str) -> None:
        print(f"xdna transcribe: error: {msg}", file=sys.stderr)

    missing = [m for m in RUNTIME_MODULES if not _importable(m)]
    if missing:
        err(f"{', '.join(missing)} not installed: pip install 'onnxruntime-ep-xdna[whisper]'")
        return 1
    import tempfile

    from .audio import AudioError, probe
    from .formats import WriterOptions

    try:
        options = options_from_args(args)
    except OptionsError as e:
        err(str(e))
        return 1
    wanted = [n for n, v in (("--max-line-width", args.max_line_width), ("--max-line-count", args.max_line_count),
                             ("--max-words-per-line", args.max_words_per_line),
                             ("--highlight-words", args.highlight_words)) if v]
    if wanted and not args.word_timestamps:
        err(f"{', '.join(wanted)} need(s) --word-timestamps")
        return 1
    try:
        writer_options = WriterOptions(args.max_line_width, args.max_line_count, args.max_words_per_line,
                                       args.highlight_words)
    except ValueError as e:
        err(str(e))
        return 1
    formats = tuple(args.format) if not isinstance(args.format, str) else _formats(args.format)
    out_dir = Path(args.output_dir) if args.output_dir else None
    if len(formats) > 1 and out_dir is None:
        err(f"{len(formats)} formats write one file each: give an output directory with -o DIR")
        return 1
    files, problems = expand_inputs(args.files, args.recursive, args.file_list)
    if files.count(STDIN) and args.file_list == STDIN:
        err("stdin cannot be both the file list and an audio input")
        return 1
    if not files and not problems:
        files = [str(sample_path())]
        print(f"no FILE given: transcribing the bundled sample {files[0]}", file=sys.stderr)
    total = len(files) + len(problems)
    failed: list[tuple[str, str]] = []
    json_docs: list[dict] = []  # several files, json, stdout: one JSON array at the end
    json_to_stdout = out_dir is None and formats == ("json",) and total > 1

    def fail(name: str, message: str) -> None:
        err(message)
        failed.append((name, message))
        json_docs.append({"file": name, "error": message})

    for name, message in problems:
        fail(name, message)
    with tempfile.TemporaryDirectory(prefix="xdna-stdin-") as tmp:
        sources: dict[str, str] = {}  # input name -> path to read
        usable = []
        for f in files:  # every input checked before the model is loaded
            try:
                path = str(_read_stdin(Path(tmp))) if f == STDIN else f
                probe(path)
                sources[f] = path
                usable.append(f)
            except AudioError as e:
                fail(f, str(e).replace(str(Path(tmp) / "stdin"), "<stdin>"))
            except OSError as e:
                fail(f, f"{f}: cannot read ({e.strerror or e})")
        status = _transcribe_files(args, options, writer_options, formats, out_dir, usable, sources, json_docs,
                                   json_to_stdout, fail, err) if usable else 0
    if json_to_stdout and (failed or usable) and status != 1:
        sys.stdout.write(json.dumps(json_docs, ensure_ascii=False, indent=2) + "\n")
    if status in (1, 130):
        return status
    if failed:
        print(f"xdna transcribe: {len(failed)} of {total} input(s) failed: "
              f"{', '.join(name for name, _ in failed)}", file=sys.stderr)
        return 2
    return 0


def _transcribe_files(args, options, writer_options, formats, out_dir, usable, sources, json_docs, json_to_stdout,
                      fail, err) -> int:
    from .audio import AudioError
    from .formats import format_timestamp, json_document, render
    from .frontend import DEFAULT_FRONTEND
    from .onnx_model import TranscribeError, load_model
    from .transcribe import transcribe_all

    if out_dir:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            err(f"cannot create output directory {out_dir} ({e.strerror})")
            return 1
        targets = output_paths(usable, out_dir, formats)
    try:
        t = time.perf_counter()
        whisper = load_model(args.model, args.provider, log=lambda m: print(m, file=sys.stderr),
                             precision=getattr(args, "precision", None))
        load_s = time.perf_counter() - t
    except TranscribeError as e:
        err(str(e))
        return 1
    print(f"model {whisper.model_dir} loaded in {load_s:.1f} s on {whisper.provider}{precision_note(whisper)}",
          file=sys.stderr)
    verbose = getattr(args, "verbose", False)
    show_progress = (args.progress or sys.stderr.isatty()) and not verbose

    def live(seg) -> None:
        print(f"[{format_timestamp(seg.start)} --> {format_timestamp(seg.end)}] {seg.text.strip()}",
              file=sys.stderr, flush=True)

    for f in usable:
        label = "<stdin>" if f == STDIN else f
        bar = _ProgressBar(Path(label).name) if show_progress else None
        try:
            result = transcribe_all(sources[f], whisper, options, progress=bar, on_segment=live if verbose else None,
                                    frontend=getattr(args, "frontend", None) or DEFAULT_FRONTEND)
        except (AudioError, TranscribeError, OptionsError) as e:
            if bar:
                bar.close()
            if isinstance(e, AudioError):
                fail(f, str(e).replace(sources[f], label))
                continue
            err(str(e))
            return 1  # a model or options problem fails every file alike
        except KeyboardInterrupt:
            if bar:
                bar.close()
            err("interrupted")
            return 130
        if bar:
            bar.close()
        if json_to_stdout:
            json_docs.append(json_document(result, label))
        elif out_dir:
            for fmt, target in targets[f].items():
                try:
                    target.write_text(render(result, fmt, writer_options), encoding="utf-8")
                    print(f"wrote {target}", file=sys.stderr)
                except OSError as e:  # this file fails; the others still run
                    fail(f, f"{label}: cannot write {target} ({e.strerror or e})")
        else:
            sys.stdout.write(render(result, formats[0], writer_options))
            sys.stdout.flush()
        if not result.text:
            print(f"{label}: no speech detected (empty transcript)", file=sys.stderr)
        proc = result.timings["total_s"]
        rtf = proc / result.duration if result.duration else float("nan")
        lang = f", language {result.language}" if result.language else ""
        print(f"{Path(label).name}: audio {result.duration:.1f} s, processed in {proc:.2f} s, RTF {rtf:.3f}, "
              f"provider {whisper.provider}{lang}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (`python -m onnxruntime_ep_xdna.whisper.cli`); `xdna transcribe` is the same."""
    parser = argparse.ArgumentParser(prog="xdna transcribe", description="Transcribe audio with Whisper on ONNX Runtime")
    add_transcribe_arguments(parser)
    return run_transcribe(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
