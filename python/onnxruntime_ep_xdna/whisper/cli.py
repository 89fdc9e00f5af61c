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


def add_transcribe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="*", metavar="FILE",
                        help="audio files (wav/flac/ogg/mp3 via soundfile, anything else via ffmpeg); "
                             "none = the bundled sample")
    parser.add_argument("--model", default="base", help="base | tiny.en | DIR with an optimum ONNX export (default base)")
    parser.add_argument("--provider", choices=("xdna", "cpu"), default="xdna",
                        help="run the model's MatMuls on the XDNA EP (default) or everything on the CPU EP")
    parser.add_argument("--language", help="language code (e.g. en, de); detected from the first 30 s if absent")
    parser.add_argument("--task", choices=("transcribe", "translate"), default="transcribe",
                        help="translate = speech in any language to English text")
    parser.add_argument("--format", choices=CHOICES, default="txt",
                        help="output format (default txt); all = every format, needs -o")
    parser.add_argument("-o", "--output-dir", help="write FILE.<format> there instead of printing to stdout")
    parser.add_argument("--progress", action="store_true", help="progress bar on stderr even when it is not a terminal")
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
        max_initial_timestamp=args.max_initial_timestamp, seed=args.seed)


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


def run_transcribe(args) -> int:
    def err(msg: str) -> None:
        print(f"xdna transcribe: error: {msg}", file=sys.stderr)

    missing = [m for m in RUNTIME_MODULES if not _importable(m)]
    if missing:
        err(f"{', '.join(missing)} not installed: pip install 'onnxruntime-ep-xdna[whisper]'")
        return 1
    from .audio import AudioError, probe
    from .formats import json_document, render
    from .onnx_model import TranscribeError, load_model
    from .transcribe import transcribe_all

    try:
        options = options_from_args(args)
    except OptionsError as e:
        err(str(e))
        return 1
    out_dir = Path(args.output_dir) if args.output_dir else None
    if args.format == "all" and out_dir is None:
        err("--format all writes one file per format: give an output directory with -o DIR")
        return 1
    files = list(args.files) or [str(sample_path())]
    if not args.files:
        print(f"no FILE given: transcribing the bundled sample {files[0]}", file=sys.stderr)
    usable, status = [], 0
    json_docs: list[dict] = []  # several files, json, stdout: one JSON array at the end
    json_to_stdout = out_dir is None and args.format == "json" and len(files) > 1
    for f in files:  # every input checked before the model is loaded
        try:
            probe(f)
            usable.append(f)
        except AudioError as e:
            err(str(e))
            status = 2
            json_docs.append({"file": f, "error": str(e)})
    if not usable:
        if json_to_stdout:
            sys.stdout.write(json.dumps(json_docs, ensure_ascii=False, indent=2) + "\n")
        return status
    if out_dir:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            err(f"cannot create output directory {out_dir} ({e.strerror})")
            return 1
    try:
        t = time.perf_counter()
        whisper = load_model(args.model, args.provider, log=lambda m: print(m, file=sys.stderr))
        load_s = time.perf_counter() - t
    except TranscribeError as e:
        err(str(e))
        return 1
    print(f"model {whisper.model_dir} loaded in {load_s:.1f} s on {whisper.provider}", file=sys.stderr)
    show_progress = args.progress or sys.stderr.isatty()
    formats = FORMATS if args.format == "all" else (args.format,)
    for f in usable:
        bar = _ProgressBar(Path(f).name) if show_progress else None
        try:
            result = transcribe_all(f, whisper, options, progress=bar)
        except (AudioError, TranscribeError, OptionsError) as e:
            if bar:
                bar.close()
            err(str(e))
            if isinstance(e, AudioError):
                status = max(status, 2)
                json_docs.append({"file": f, "error": str(e)})
                continue
            return 1  # a model or options problem fails every file alike
        except KeyboardInterrupt:
            if bar:
                bar.close()
            err("interrupted")
            return 130
        if bar:
            bar.close()
        if json_to_stdout:
            json_docs.append(json_document(result, f))
        elif out_dir:
            for fmt in formats:
                target = out_dir / f"{Path(f).stem}.{fmt}"
                try:
                    target.write_text(render(result, fmt), encoding="utf-8")
                    print(f"wrote {target}", file=sys.stderr)
                except OSError as e:  # this file fails; the others still run
                    err(f"{f}: cannot write {target} ({e.strerror or e})")
                    status = max(status, 2)
        else:
            sys.stdout.write(render(result, args.format))
            sys.stdout.flush()
        if not result.text:
            print(f"{f}: no speech detected (empty transcript)", file=sys.stderr)
        proc = result.timings["total_s"]
        rtf = proc / result.duration if result.duration else float("nan")
        lang = f", language {result.language}" if result.language else ""
        print(f"{Path(f).name}: audio {result.duration:.1f} s, processed in {proc:.2f} s, RTF {rtf:.3f}, "
              f"provider {whisper.provider}{lang}", file=sys.stderr)
    if json_to_stdout:
        sys.stdout.write(json.dumps(json_docs, ensure_ascii=False, indent=2) + "\n")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (`python -m onnxruntime_ep_xdna.whisper.cli`); `xdna transcribe` is the same."""
    parser = argparse.ArgumentParser(prog="xdna transcribe", description="Transcribe audio with Whisper on ONNX Runtime")
    add_transcribe_arguments(parser)
    return run_transcribe(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
