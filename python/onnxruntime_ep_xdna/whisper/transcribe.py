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
from .frontend import DEFAULT_FRONTEND, FRONTENDS, frontend_for
from .onnx_model import XDNA_EP, TranscribeError, WhisperOnnx, load_model, one_line
from .options import OptionsError, TranscriptionOptions
from .rules import LogitRules, build_prompt, log_softmax, suppress_list
from .search import DecodingResult, decode_with_fallback
from .timing import (Word, clip_long_words, find_alignment, fit_segment_words, frame_energy_db, merge_punctuations,
                     refine_word_times, speech_frames, word_durations)


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
    words: list[Word] | None = None  # with word_timestamps: Word(start, end, word, probability), else None


@dataclass
class TranscriptionInfo:
    """language_probs: {code: probability} over the model's languages when the language was detected (averaged
    over language_detection_segments windows), else None; all_language_probs: the same, as (code, p) pairs,
    highest first. With vad_filter: duration_after_vad (seconds of speech decoded) and speech_chunks (the
    (start, end) seconds of the original audio that were decoded)."""

    language: str | None
    language_probability: float | None  # None when the language was given (or the model is English-only)
    duration: float  # seconds of audio
    options: TranscriptionOptions
    all_language_probs: list[tuple[str, float]] | None = None
    timings: dict = field(default_factory=dict)  # filled in while the segments are consumed
    language_probs: dict[str, float] | None = None
    duration_after_vad: float | None = None
    speech_chunks: list[tuple[float, float]] | None = None


@dataclass
class Result:
    """A finished transcription (what the writers in formats.py take)."""

    text: str
    segments: list[Segment]
    language: str | None
    timings: dict
    duration: float = 0.0
    language_probs: dict[str, float] | None = None  # detected language: every language's probability
    speech_chunks: list[tuple[float, float]] | None = None  # vad_filter: the stretches of the original decoded


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
                 progress: Callable[[float, float], None] | None = None, timeline=None):
        self.model, self.mel, self.options, self.info = model, mel, options, info
        self._first_window = first_window
        self._progress = progress
        self._timeline = timeline  # vad.SpeechTimeline: joined speech -> original times (None = no VAD)

    def _to_original(self, segments: list[Segment]) -> None:
        tl = self._timeline
        if tl is None:
            return
        for seg in segments:
            for w in seg.words or ():
                # the chunk holding the word's middle; the joined neighbour's padding is not part of the word
                # (in the original, removed silence lies between them)
                k = tl.chunk_of((w.start + w.end) / 2)
                w.start = round(tl.original(tl.clamp(w.start, k), k), 3)
                w.end = round(tl.original(tl.clamp(w.end, k), k), 3)
            first, last = tl.chunk_of(seg.start), tl.chunk_of(seg.end, is_end=True)
            seg.start = round(tl.original(seg.start, first), 3)
            seg.end = max(seg.start, round(tl.original(seg.end, last), 3))
            if seg.words:  # with word timing the segment spans its words
                seg.start, seg.end = seg.words[0].start, max(seg.words[-1].end, seg.words[0].start)

    def _add_words(self, window, segments: list[Segment], offset: float, size: int, last_speech: float) -> float:
        """Word timing of one window's segments (OpenAI's add_word_timestamps); returns the new last speech end."""
        model, opt = self.model, self.options
        toks = model.tokens
        text_tokens = [[t for t in seg.tokens if t < toks.eot] for seg in segments]
        flat = [t for part in text_tokens for t in part]
        if not flat:
            return last_speech
        sot_seq = [toks.sot]
        if toks.multilingual:
            sot_seq += [toks.languages[self.info.language], toks.translate if opt.task == "translate" else toks.transcribe]
        logits, attention = model.align(window, sot_seq + [toks.no_timestamps] + flat + [toks.eot])
        sampled = logits[len(sot_seq):len(sot_seq) + len(flat), :toks.eot].astype(np.float64)
        probs = np.exp(log_softmax(sampled))[np.arange(len(flat)), flat]
        words = find_alignment(attention, len(sot_seq), probs, flat, size, model.text, toks.eot, self.info.language)
        words = merge_punctuations(words, opt.prepend_punctuations, opt.append_punctuations)
        if opt.word_timing_refine:  # starts/ends out of pauses, from the window's log-mel (timing.refine_word_times)
            seek = round(offset * SAMPLE_RATE / HOP_LENGTH)
            refine_word_times(words, speech_frames(frame_energy_db(self.mel.window(seek, size)[0, :, :size])), 0.0)
        median, max_duration = word_durations(words)
        clip_long_words(words, max_duration)
        # Hand the words out to their segments by token counts (punctuation merging keeps tokens together).
        per_segment: list[list[Word]] = []
        k = 0
        for part in text_tokens:
            taken, count = [], 0
            while k < len(words) and count < len(part):
                w = words[k]
                count += len(w.tokens)
                w.start = round(offset + w.start, 3)
                w.end = round(offset + w.end, 3)
                taken.append(w)
                k += 1
            per_segment.append(taken)
        last_speech = fit_segment_words(per_segment, segments, median, max_duration, last_speech)
        for seg, taken in zip(segments, per_segment):
            seg.words = taken
        return last_speech

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
        content, n_id = mel.content_frames, 0
        windows = 0
        last_speech = 0.0
        clips = clip_frames(opt.clip_timestamps, content)
        clip_index = 0
        seek = clips[0][0] if clips else content
        threshold = opt.hallucination_silence_threshold
        while clip_index < len(clips):
            clip_start, clip_end = clips[clip_index]
            seek = max(seek, clip_start)
            if seek >= clip_end:  # this clip is done: on to the next one
                clip_index += 1
                continue
            size = min(N_FRAMES, clip_end - seek)
            offset = seek * HOP_LENGTH / SAMPLE_RATE
            if self._progress:
                self._progress(self._timeline.original(offset) if self._timeline else offset, info.duration)
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
            segments: list[Segment] = []
            content_end = mel.duration
            for start_ts, end_ts, span in spans:
                start = offset + (start_ts * TIME_PRECISION if start_ts is not None else 0.0)
                end = offset + end_ts * TIME_PRECISION if end_ts is not None else window_end
                start, end = min(start, content_end), min(end, content_end)
                text = model.text(span)
                if start == end or not text.strip():  # OpenAI clears instantaneous or empty segments
                    continue
                segments.append(Segment(0, previous_seek, start, max(end, start), text, list(span),
                                        result.temperature, result.avg_logprob, result.compression_ratio,
                                        result.no_speech_prob))
            if opt.word_timestamps and segments:
                self._add_words(window, segments, offset, size, last_speech)
                last_word_end = _last_word_end(segments)
                if advance is not None and last_word_end is not None and last_word_end > offset:
                    # OpenAI: an unfinished window resumes after its last aligned word (with a hallucination
                    # threshold: only when more than that much of the window is left, else the whole window)
                    if threshold is None or window_end - last_word_end > threshold:
                        seek = max(previous_seek + 1, round(last_word_end * 100))
                    else:
                        seek = previous_seek + size
                if threshold is not None:
                    first = next((g for g in segments if g.words), None)
                    if first is not None and is_segment_anomaly(first) and first.start - offset > threshold:
                        # a likely hallucination after a long silence: decode again from where it starts
                        seek = previous_seek + round((first.start - offset) * 100)
                        continue
                    cut = hallucination_cut(segments, threshold, last_speech, offset, window_end)
                    if cut is not None:
                        k, start = cut
                        seek = round(max(offset + 1, start) * 100)
                        if mel.duration - segments[k].end < threshold:
                            seek = content
                        del segments[k:]
                last_word_end = _last_word_end(segments)
                if last_word_end is not None:
                    last_speech = last_word_end
            committed = [t for seg in segments for t in seg.tokens]
            self._to_original(segments)
            for seg in segments:
                seg.id = n_id
                n_id += 1
                yield seg
            all_tokens += committed
            if not opt.condition_on_previous_text or result.temperature > opt.prompt_reset_on_temperature:
                prompt_reset_since = len(all_tokens)
        timings["windows"] = timings.get("windows", 0) + windows
        timings["decode_s"] = timings.get("decode_s", 0.0) + time.perf_counter() - t_start
        if self._progress:
            self._progress(info.duration, info.duration)


def clip_frames(clip_timestamps, content: int) -> list[tuple[int, int]]:
    """OpenAI's clip_timestamps (start, end, start, end, ... seconds; a missing last end = the end of the audio)
    as (start, end) mel frames inside the audio; None/empty = the whole audio."""
    if not clip_timestamps:
        return [(0, content)] if content > 0 else []
    values = [float(x) for x in clip_timestamps]
    if len(values) % 2:
        values.append(content / 100)
    clips = []
    for a, b in zip(values[0::2], values[1::2]):
        start, end = min(round(a * 100), content), min(round(b * 100), content)
        if end > start:
            clips.append((start, end))
    return clips


PUNCTUATION = set("\"'“¿([{-\"'.。,，!！?？:：”)]}、")


def _last_word_end(segments: list[Segment]) -> float | None:
    ends = [w.end for seg in segments for w in (seg.words or ())]
    return ends[-1] if ends else None


def word_anomaly_score(word: Word) -> float:
    """OpenAI's score of a word that looks hallucinated: improbable, too short or too long."""
    duration = word.end - word.start
    score = 1.0 if word.probability < 0.15 else 0.0
    if duration < 0.133:
        score += (0.133 - duration) * 15
    if duration > 2.0:
        score += duration - 2.0
    return score


def is_segment_anomaly(segment: Segment | None) -> bool:
    if segment is None or not segment.words:
        return False
    words = [w for w in segment.words if w.word not in PUNCTUATION][:8]
    score = sum(word_anomaly_score(w) for w in words)
    return score >= 3 or score + 0.01 >= len(words)


def hallucination_cut(segments: list[Segment], threshold: float, last_speech: float, offset: float,
                      window_end: float) -> tuple[int, float] | None:
    """OpenAI's hallucination_silence_threshold rule: the first anomalous segment with silence (longer than the
    threshold, or the window edge) or more anomalies on both sides -> (its index, its start); None = keep all."""
    previous_end = last_speech
    for i, seg in enumerate(segments):
        if not seg.words:
            continue
        if is_segment_anomaly(seg):
            following = next((g for g in segments[i + 1:] if g.words), None)
            next_start = following.words[0].start if following is not None else window_end
            silence_before = seg.start - previous_end > threshold or seg.start < threshold or seg.start - offset < 2.0
            silence_after = (next_start - seg.end > threshold or is_segment_anomaly(following)
                             or window_end - seg.end < 2.0)
            if silence_before and silence_after:
                return i, seg.start
        previous_end = seg.end
    return None


def detect_language(model: WhisperOnnx, window) -> list[tuple[str, float]]:
    """OpenAI's detect_language: the decoder's distribution at <|startoftranscript|> over the language tokens,
    highest first. Reuses the window (its cross-attention K/V are computed here once)."""
    logits, _ = model.start(window, [model.tokens.sot])
    codes = list(model.tokens.languages)
    ids = np.array([model.tokens.languages[c] for c in codes])
    probs = np.exp(log_softmax(logits[-1][ids][None].astype(np.float64))[0])
    return sorted(zip(codes, probs.tolist()), key=lambda x: -x[1])


def transcribe(audio: str | os.PathLike | np.ndarray, model: str | os.PathLike | WhisperOnnx = "base",
               options: TranscriptionOptions | None = None, *, provider: str = XDNA_EP, precision: str | None = None,
               progress: Callable[[float, float], None] | None = None, frontend: str = DEFAULT_FRONTEND,
               **kwargs) -> tuple[Iterator[Segment], TranscriptionInfo]:
    """Transcribes (or translates to English) a file or a 16 kHz mono float32 array.

    Returns (segments, info) like faster-whisper: the audio is read and the language detected now (errors are
    raised here: AudioError, TranscribeError, OptionsError); the windows are decoded while `segments` is
    iterated. `options` and/or keyword arguments are TranscriptionOptions fields (beam_size=1 for greedy).
    `precision`: the XDNA EP's precision policy when `model` is a name or directory (bf16, int8, bf16x3, mixed, or
    rules: README "Precision modes"; None = the EP's bf16).
    `frontend`: 'cpu' computes the log-mel in numpy, 'ep' with the ONNX front end (whisper/frontend.py) on the
    model's provider (its GEMMs on the XDNA EP in bf16x3).
    """
    from .audio import AudioError

    if frontend not in FRONTENDS:
        raise OptionsError(f"frontend must be one of {', '.join(FRONTENDS)}, not {frontend!r}")
    opt = TranscriptionOptions.from_kwargs(options, **kwargs)
    whisper = load_model(model, provider, precision=precision)
    try:
        frames_log10_mel = frontend_for(whisper, frontend)
    except TranscribeError:
        raise
    except Exception as e:  # the EP refused the front end's session (e.g. no bf16x3 in this build)
        raise TranscribeError(f"the {frontend} log-mel front end could not be created: {one_line(e)}") from None
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
    timeline = None
    t_vad = 0.0
    if opt.vad_filter:
        from .audio import load_audio
        from .vad import VadOptions, collect_speech, speech_chunks

        samples = np.asarray(audio, dtype=np.float32).reshape(-1) if isinstance(audio, np.ndarray) else None
        if samples is None:
            from .audio import probe

            probe(audio)
            samples = load_audio(audio)
        if samples.size == 0:
            raise AudioError(f"{'<array>' if isinstance(audio, np.ndarray) else audio}: contains no audio samples "
                             "(zero length)")
        t = time.perf_counter()
        chunks = speech_chunks(samples, opt.vad_parameters or VadOptions())
        t_vad = time.perf_counter() - t
        duration = samples.size / SAMPLE_RATE
        speech, timeline = collect_speech(samples, chunks)
        mel = (features.from_array(speech, whisper.n_mels, whisper.mel_filters, frames_log10_mel)
               if speech.size else None)
    elif isinstance(audio, np.ndarray):
        if audio.size == 0:
            raise AudioError("<array>: contains no audio samples (zero length)")
        mel = features.from_array(audio, whisper.n_mels, whisper.mel_filters, frames_log10_mel)
        duration = mel.duration
    else:
        from .audio import probe

        probe(audio)
        mel = features.from_file(audio, whisper.n_mels, whisper.mel_filters, frames_log10_mel)
        if mel.n_samples == 0:
            raise AudioError(f"{audio}: contains no audio samples (zero length)")
        duration = mel.duration
    timings = {"features_s": time.perf_counter() - t0 - t_vad}
    if opt.vad_filter:
        timings["vad_s"] = t_vad
    info = TranscriptionInfo(language if whisper.is_multilingual else "en", None, duration, opt, timings=timings)
    if timeline is not None:
        info.duration_after_vad = (mel.duration if mel is not None else 0.0)
        info.speech_chunks = [(a / SAMPLE_RATE, b / SAMPLE_RATE) for a, b in timeline.chunks]
    first = None
    if mel is None:  # VAD found no speech at all: nothing to decode
        if whisper.is_multilingual and language is None:
            info.language = None
        return iter(()), info
    if whisper.is_multilingual and language is None:
        first = whisper.encode(mel.window(0, min(N_FRAMES, mel.content_frames)), timings)
        totals = dict(detect_language(whisper, first))
        n = 1
        for k in range(1, opt.language_detection_segments):
            seek = k * N_FRAMES
            if seek >= mel.content_frames:
                break
            window = whisper.encode(mel.window(seek, min(N_FRAMES, mel.content_frames - seek)), timings)
            for code, p in detect_language(whisper, window):
                totals[code] += p
            n += 1
        probs = sorted(((c, p / n) for c, p in totals.items()), key=lambda x: -x[1])
        info.language, info.language_probability = probs[0]
        info.all_language_probs = probs
        info.language_probs = dict(probs)
    info.options = opt if info.language == opt.language else TranscriptionOptions.from_kwargs(opt, language=info.language)
    return iter(Transcription(whisper, mel, info.options, info, first, progress, timeline)), info


def transcribe_all(audio, model="base", options: TranscriptionOptions | None = None, *,
                   on_segment: Callable[[Segment], None] | None = None, **kwargs) -> Result:
    """`transcribe` run to the end: all segments, the text, timings (total_s included). `on_segment` is called
    with each segment as soon as it is decoded (live output)."""
    t0 = time.perf_counter()
    segments, info = transcribe(audio, model, options, **kwargs)
    segs = []
    for seg in segments:
        segs.append(seg)
        if on_segment is not None:
            on_segment(seg)
    info.timings["total_s"] = time.perf_counter() - t0
    return Result("".join(s.text for s in segs).strip(), segs, info.language, info.timings, info.duration,
                  info.language_probs, info.speech_chunks)


class WhisperModel:
    """A loaded model (sessions + tokenizer) with faster-whisper's call shape:
    `WhisperModel("base", provider="cpu").transcribe(audio, beam_size=5) -> (segments, info)`.
    Transcriptions share the sessions and keep their own state (ORT sessions may be run from several threads)."""

    def __init__(self, model: str | os.PathLike = "base", provider: str = XDNA_EP,
                 log: Callable[[str], None] = lambda m: None, precision: str | None = None,
                 frontend: str = DEFAULT_FRONTEND):
        self.onnx = load_model(model, provider, log, precision=precision)
        self.frontend = frontend

    def transcribe(self, audio, options: TranscriptionOptions | None = None, **kwargs):
        kwargs.setdefault("frontend", self.frontend)
        return transcribe(audio, self.onnx, options, **kwargs)
