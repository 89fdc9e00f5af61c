"""Long-form transcription: OpenAI's seek loop over 30 s windows, as a lazy iterator of segments.

    from onnxruntime_ep_xdna.whisper import WhisperModel
    model = WhisperModel("base", provider="xdna")
    segments, info = model.transcribe("talk.mp3", beam_size=5)   # info: language, duration, options
    for s in segments:                                            # decoding happens while iterating
        print(s.start, s.end, s.text)

Per window (whisper/transcribe.py in openai/whisper): decode with temperature fallback; skip it when it is silence
(no_speech_prob > no_speech_threshold and avg_logprob < log_prob_threshold); cut the tokens into segments at
timestamp pairs; when the window does not end with a single timestamp (the last segment is unfinished: speech
runs on, or decoding stopped at the token limit) the unfinished segment is dropped and the next window starts at
the end of the last complete segment, so nothing is lost or decoded twice. The next window's prompt is the text
committed so far (timestamps included), reset after a window decoded above prompt_reset_on_temperature.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from . import features
from .features import FRAMES_PER_TOKEN, HOP_LENGTH, N_FRAMES, SAMPLE_RATE, TIME_PRECISION
from .onnx_model import XDNA_EP, TranscribeError, WhisperOnnx, load_model
from .options import OptionsError, TranscriptionOptions
from .rules import LogitRules, build_prompt, log_softmax, suppress_list
from .search import DecodingResult, decode_with_fallback


@dataclass
class Segment:
    id: int
    seek: int  # mel frame where its window started
    start: float  # seconds
    end: float
    text: str
    tokens: list[int] = field(default_factory=list, repr=False)  # timestamps included
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0


@dataclass
class TranscriptionInfo:
    language: str | None
    language_probability: float | None  # None when the language was given (or the model is English-only)
    duration: float  # seconds of audio
    options: TranscriptionOptions
    all_language_probs: list[tuple[str, float]] | None = None
    timings: dict = field(default_factory=dict)  # filled in while the segments are consumed


@dataclass
class Result:
    """A finished transcription (what the writers in formats.py take)."""

    text: str
    segments: list[Segment]
    language: str | None
    timings: dict
    duration: float = 0.0


def split_segments(tokens: Sequence[int], ts_begin: int) -> tuple[list[tuple[int, int, list[int]]], int | None]:
    """OpenAI's cut of one window's tokens (prompt excluded, no <|endoftext|>) at timestamp pairs.

    Returns ([(start index, end index, tokens)], frames to advance or None = the whole window). Segments run
    between consecutive timestamp pairs; when the tokens do not end with a single timestamp, the unfinished last
    segment is dropped and the advance stops at the last complete segment's end.
    """
    is_ts = [t >= ts_begin for t in tokens]
    single_ending = len(tokens) >= 2 and is_ts[-1] and not is_ts[-2]
    consecutive = [i for i in range(1, len(tokens)) if is_ts[i] and is_ts[i - 1]]
    if consecutive:
        slices = consecutive + ([len(tokens)] if single_ending else [])
        out, last = [], 0
        for cut in slices:
            span = list(tokens[last:cut])
            out.append((span[0] - ts_begin, span[-1] - ts_begin, span))
            last = cut
        if single_ending:
            return out, None
        return out, (tokens[last - 1] - ts_begin) * FRAMES_PER_TOKEN
    stamps = [t for t in tokens if t >= ts_begin]
    end = None
    if stamps and stamps[-1] != ts_begin:  # no pair, but a timestamp: the segment ends there
        end = stamps[-1] - ts_begin
    return [(0, end, list(tokens))], None


class Transcription:
    """The state of one file's transcription; iterate it for segments (see `transcribe`)."""

    def __init__(self, model: WhisperOnnx, mel: features.LogMel, options: TranscriptionOptions,
                 info: TranscriptionInfo, first_window=None,
                 progress: Callable[[float, float], None] | None = None):
        self.model, self.mel, self.options, self.info = model, mel, options, info
        self._first_window = first_window
        self._progress = progress

    def __iter__(self) -> Iterator[Segment]:
        model, mel, opt, info = self.model, self.mel, self.options, self.info
        toks = model.tokens
        t_start = time.perf_counter()
        timings = info.timings
        rng = np.random.default_rng(opt.seed)
        rules = LogitRules.make(toks, suppress_list(toks, opt.suppress_tokens, model.model_suppress),
                                suppress_blank=opt.suppress_blank, without_timestamps=opt.without_timestamps,
                                max_initial_timestamp=opt.max_initial_timestamp)
        all_tokens: list[int] = []
        if opt.initial_prompt:
            all_tokens += (list(opt.initial_prompt) if not isinstance(opt.initial_prompt, str)
                           else model.encode_text(opt.initial_prompt))
        hotwords = model.encode_text(opt.hotwords) if opt.hotwords else []
        prefix = model.encode_text(opt.prefix) if opt.prefix else []
        prompt_reset_since = 0
        seek, content, n_id = 0, mel.content_frames, 0
        windows = 0
        while seek < content:
            size = min(N_FRAMES, content - seek)
            offset = seek * HOP_LENGTH / SAMPLE_RATE
            if self._progress:
                self._progress(offset, info.duration)
            if mel.is_silent(seek, size):  # digital silence: nothing to decode (features.DIGITAL_SILENCE)
                seek += size
                continue
            t0 = time.perf_counter()
            if self._first_window is not None and seek == 0:
                window = self._first_window
            else:
                segment_mel = mel.window(seek, size)
                timings["mel_s"] = timings.get("mel_s", 0.0) + time.perf_counter() - t0
                window = model.encode(segment_mel, timings)
            self._first_window = None
            windows += 1
            prompt, sample_begin = build_prompt(
                toks, info.language, opt.task, without_timestamps=opt.without_timestamps,
                previous=all_tokens[prompt_reset_since:], hotwords=hotwords, prefix=prefix if seek == 0 else ())
            result: DecodingResult = decode_with_fallback(model, window, prompt, sample_begin, rules, opt, rng)
            timings["fallbacks"] = timings.get("fallbacks", 0) + result.attempts - 1
            if opt.no_speech_threshold is not None and result.no_speech_prob > opt.no_speech_threshold and not (
                    opt.log_prob_threshold is not None and result.avg_logprob > opt.log_prob_threshold):
                seek += size  # silence
                continue
            previous_seek = seek
            window_end = (seek + size) * HOP_LENGTH / SAMPLE_RATE
            if opt.without_timestamps:
                spans, advance = [(0, None, result.tokens)], None
            else:
                spans, advance = split_segments(result.tokens, toks.timestamp_begin)
            seek += size if advance is None else advance
            if advance is not None and advance <= 0:  # cannot happen with the timestamp rules; never stall
                seek = previous_seek + size
            committed: list[int] = []
            for start_ts, end_ts, span in spans:
                start = offset + (start_ts * TIME_PRECISION if start_ts is not None else 0.0)
                end = offset + end_ts * TIME_PRECISION if end_ts is not None else window_end
                start, end = min(start, info.duration), min(end, info.duration)
                text = model.text(span)
                if start == end or not text.strip():  # OpenAI clears instantaneous or empty segments
                    continue
                committed += span
                yield Segment(n_id, previous_seek, start, max(end, start), text, list(span), result.temperature,
                              result.avg_logprob, result.compression_ratio, result.no_speech_prob)
                n_id += 1
            all_tokens += committed
            if not opt.condition_on_previous_text or result.temperature > opt.prompt_reset_on_temperature:
                prompt_reset_since = len(all_tokens)
        timings["windows"] = timings.get("windows", 0) + windows
        timings["decode_s"] = timings.get("decode_s", 0.0) + time.perf_counter() - t_start
        if self._progress:
            self._progress(info.duration, info.duration)


def detect_language(model: WhisperOnnx, window) -> list[tuple[str, float]]:
    """OpenAI's detect_language: the decoder's distribution at <|startoftranscript|> over the language tokens,
    highest first. Reuses the window (its cross-attention K/V are computed here once)."""
    logits, _ = model.start(window, [model.tokens.sot])
    codes = list(model.tokens.languages)
    ids = np.array([model.tokens.languages[c] for c in codes])
    probs = np.exp(log_softmax(logits[-1][ids][None].astype(np.float64))[0])
    return sorted(zip(codes, probs.tolist()), key=lambda x: -x[1])


def transcribe(audio: str | os.PathLike | np.ndarray, model: str | os.PathLike | WhisperOnnx = "base",
               options: TranscriptionOptions | None = None, *, provider: str = XDNA_EP,
               progress: Callable[[float, float], None] | None = None, **kwargs
               ) -> tuple[Iterator[Segment], TranscriptionInfo]:
    """Transcribes (or translates to English) a file or a 16 kHz mono float32 array.

    Returns (segments, info) like faster-whisper: the audio is read and the language detected now (errors are
    raised here: AudioError, TranscribeError, OptionsError); the windows are decoded while `segments` is
    iterated. `options` and/or keyword arguments are TranscriptionOptions fields (beam_size=1 for greedy).
    """
    from .audio import AudioError

    opt = TranscriptionOptions.from_kwargs(options, **kwargs)
    whisper = load_model(model, provider)
    t0 = time.perf_counter()
    language = opt.language
    if not whisper.is_multilingual:
        if opt.task == "translate":
            raise TranscribeError("this model is English-only: it cannot translate (use a multilingual model, e.g. base)")
        if language not in (None, "en"):
            raise TranscribeError(f"this model is English-only: --language {language} is not possible")
        language = None
    elif language is not None:
        language = language.lower()
        if language not in whisper.lang_to_id:
            raise OptionsError(f"unknown language {language!r}; the model knows: {', '.join(sorted(whisper.lang_to_id))}")
    if isinstance(audio, np.ndarray):
        if audio.size == 0:
            raise AudioError("<array>: contains no audio samples (zero length)")
        mel = features.from_array(audio, whisper.n_mels, whisper.mel_filters)
    else:
        from .audio import probe

        probe(audio)
        mel = features.from_file(audio, whisper.n_mels, whisper.mel_filters)
        if mel.n_samples == 0:
            raise AudioError(f"{audio}: contains no audio samples (zero length)")
    timings = {"features_s": time.perf_counter() - t0}
    info = TranscriptionInfo(language if whisper.is_multilingual else "en", None, mel.duration, opt, timings=timings)
    first = None
    if whisper.is_multilingual and language is None:
        first = whisper.encode(mel.window(0, min(N_FRAMES, mel.content_frames)), timings)
        probs = detect_language(whisper, first)
        info.language, info.language_probability = probs[0]
        info.all_language_probs = probs
    info.options = opt if info.language == opt.language else TranscriptionOptions.from_kwargs(opt, language=info.language)
    return iter(Transcription(whisper, mel, info.options, info, first, progress)), info


def transcribe_all(audio, model="base", options: TranscriptionOptions | None = None, **kwargs) -> Result:
    """`transcribe` run to the end: all segments, the text, timings (total_s included)."""
    t0 = time.perf_counter()
    segments, info = transcribe(audio, model, options, **kwargs)
    segs = list(segments)
    info.timings["total_s"] = time.perf_counter() - t0
    return Result("".join(s.text for s in segs).strip(), segs, info.language, info.timings, info.duration)


class WhisperModel:
    """A loaded model (sessions + tokenizer) with faster-whisper's call shape:
    `WhisperModel("base", provider="cpu").transcribe(audio, beam_size=5) -> (segments, info)`.
    Transcriptions share the sessions and keep their own state (ORT sessions may be run from several threads)."""

    def __init__(self, model: str | os.PathLike = "base", provider: str = XDNA_EP,
                 log: Callable[[str], None] = lambda m: None):
        self.onnx = load_model(model, provider, log)

    def transcribe(self, audio, options: TranscriptionOptions | None = None, **kwargs):
        return transcribe(audio, self.onnx, options, **kwargs)
