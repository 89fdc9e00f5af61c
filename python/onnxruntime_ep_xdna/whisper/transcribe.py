"""`xdna transcribe`: Whisper on ONNX Runtime sessions with a lean greedy decoding loop.

Data path per 30 s window:  audio block -> log-mel (numpy) -> encoder_model.onnx (once)
  -> decoder_model.onnx on the prompt (also yields the cross-attention K/V of every layer)
  -> decoder_with_past_model.onnx once per token, fed the previous step's KV outputs as they are.
The KV cache stays in ORT OrtValues between steps (`run_with_ort_values`): the 12 cross-attention tensors
(1500 x d_model each) are never copied to numpy, only the logits row is. Token selection follows the OpenAI /
transformers rules (suppress lists, timestamp pairing, monotonic timestamps); long files are cut with OpenAI's
seek logic (advance to the end of the last complete timestamped segment). Only transformers-free pieces are used
here (`tokenizers`, numpy), so the command starts in well under a second before the model load.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .audio import (
    N_FFT,
    N_SAMPLES,
    SAMPLE_RATE,
    AudioError,
    AudioStream,
    log_mel_spectrogram,
    probe,
)
from .formats import FORMATS, render

XDNA_EP = "XDNAExecutionProvider"
# What transcribing an already exported model needs beyond numpy and onnxruntime (fetching one needs torch too).
RUNTIME_MODULES = ("soundfile", "tokenizers")
CPU_EP = "CPUExecutionProvider"
SECONDS_PER_TIMESTAMP = 0.02  # Whisper timestamp tokens count 20 ms steps
SAMPLES_PER_TIMESTAMP = int(SECONDS_PER_TIMESTAMP * SAMPLE_RATE)
MAX_INITIAL_TIMESTAMP = 50  # first timestamp of a window at most 1.0 s (OpenAI default)
SILENCE_PEAK = 10 ** (-60 / 20)  # windows quieter than -60 dBFS are not decoded at all
NO_SPEECH_THRESHOLD = 0.6  # OpenAI defaults: skip a window when <|nospeech|> is likely...
LOGPROB_THRESHOLD = -1.0  # ...and the decoded text is not confident either
_LANG_PLACEHOLDER = -1


class TranscribeError(Exception):
    """A model or provider problem, phrased for the user (one line)."""


@dataclass
class Segment:
    start: float
    end: float
    text: str
    tokens: list[int] = field(default_factory=list, repr=False)


@dataclass
class Result:
    text: str
    segments: list[Segment]
    language: str | None
    timings: dict
    duration: float = 0.0


@dataclass
class Decoded:
    tokens: list[int]  # generated tokens, without prompt and without <|endoftext|>
    sum_logprob: float
    no_speech_prob: float
    stop: str  # "eot", "max_tokens" or "repetition"

    @property
    def avg_logprob(self) -> float:
        return self.sum_logprob / (len(self.tokens) + 1)


# --------------------------------------------------------------------------------------------------------------
# Token rules (pure functions on numpy logits; tested without a model)


def _logsumexp(x: np.ndarray) -> float:
    m = float(x.max())
    if m == -np.inf:
        return -np.inf
    return m + math.log(float(np.exp(x - m).sum()))


def apply_timestamp_rules(logits: np.ndarray, tokens: Sequence[int], ts_begin: int, eot: int, no_timestamps: int,
                          max_initial: int | None = MAX_INITIAL_TIMESTAMP) -> None:
    """In place: OpenAI's ApplyTimestampRules (= transformers' WhisperTimeStampLogitsProcessor) for one sequence.

    Timestamps come in pairs (end of one segment, start of the next) except the last; they never decrease; a
    window starts with a timestamp <= `max_initial`; and when timestamps as a whole outweigh the best text token,
    a timestamp is forced.
    """
    logits[no_timestamps] = -np.inf
    last_ts = len(tokens) >= 1 and tokens[-1] >= ts_begin
    penultimate_ts = len(tokens) < 2 or tokens[-2] >= ts_begin
    if last_ts:
        if penultimate_ts:
            logits[ts_begin:] = -np.inf
        else:
            logits[:eot] = -np.inf
    stamps = [t for t in tokens if t >= ts_begin]
    if stamps:
        floor = stamps[-1] if last_ts and not penultimate_ts else stamps[-1] + 1
        logits[ts_begin:floor] = -np.inf
    if not tokens:
        logits[:ts_begin] = -np.inf
        if max_initial is not None:
            logits[ts_begin + max_initial + 1 :] = -np.inf
    text_best = float(logits[:ts_begin].max())
    if text_best > -np.inf and _logsumexp(logits[ts_begin:]) > text_best:
        logits[:ts_begin] = -np.inf


def repetition_cut(tokens: Sequence[int], max_period: int = 32, min_span: int = 24) -> int | None:
    """If `tokens` ends in a loop (a block of <= max_period tokens repeated >= 3 times and >= min_span tokens in
    all), the length that keeps one copy of the block; else None. The usual greedy-decoding hallucination."""
    n = len(tokens)
    for period in range(1, max_period + 1):
        reps = max(3, -(-min_span // period))
        if n < period * reps:
            continue
        block = list(tokens[n - period :])
        if all(list(tokens[n - k * period : n - (k - 1) * period]) == block for k in range(2, reps + 1)):
            end = n - period * (reps - 1)
            while end - period >= 0 and list(tokens[end - period : end]) == block:  # the loop may be longer
                end -= period
            return end + period
    return None


def split_segments(tokens: Sequence[int], ts_begin: int, window_start: int, window_samples: int,
                   complete: bool = True) -> tuple[list[tuple[float, float, list[int]]], int]:
    """OpenAI's seek logic for one window decoded with timestamps.

    `tokens` are the generated tokens (no prompt, no <|endoftext|>); `window_start` and `window_samples` locate the
    window in the file (samples). Returns ([(start_s, end_s, text_tokens)], samples to advance). Segments are the
    spans between consecutive timestamp pairs; when the window does not end in a single timestamp (i.e. speech
    runs past it), the last incomplete segment is dropped and the next window starts at its beginning.
    `complete=False` (decoding stopped early, e.g. a repetition loop) keeps everything and advances a full window,
    so the same loop cannot recur at the same place.
    """
    t0 = window_start / SAMPLE_RATE
    window_s = window_samples / SAMPLE_RATE
    is_ts = [t >= ts_begin for t in tokens]
    single_ending = len(tokens) >= 2 and not is_ts[-2] and is_ts[-1]
    consecutive = [i for i in range(1, len(tokens)) if is_ts[i] and is_ts[i - 1]]

    def ts(t: int) -> float:
        return (t - ts_begin) * SECONDS_PER_TIMESTAMP

    def text_of(span: Sequence[int]) -> list[int]:
        return [t for t in span if t < ts_begin]

    segments: list[tuple[float, float, list[int]]] = []
    if consecutive:
        slices = list(consecutive)
        if single_ending or not complete:
            slices.append(len(tokens))
        last = 0
        for cut in slices:
            span = tokens[last:cut]
            if span:
                start = min(ts(span[0]) if is_ts[last] else 0.0, window_s)
                end = min(max(ts(span[-1]) if span[-1] >= ts_begin else window_s, start), window_s)
                segments.append((t0 + start, t0 + end, text_of(span)))
            last = cut
        if single_ending or not complete:
            advance = window_samples
        else:
            advance = (tokens[last - 1] - ts_begin) * SAMPLES_PER_TIMESTAMP
    else:
        stamps = [t for t in tokens if t >= ts_begin]
        end = window_s
        if stamps and stamps[-1] != ts_begin and complete:
            end = min(ts(stamps[-1]), window_s)
        start = min(ts(tokens[0]) if tokens and is_ts[0] else 0.0, end)
        segments.append((t0 + start, t0 + end, text_of(tokens)))
        advance = window_samples
    if advance <= 0:  # e.g. "<|0.00|> ... <|0.00|><|0.00|>": never stall on one window
        advance = window_samples
    return segments, advance


# --------------------------------------------------------------------------------------------------------------
# Model


def mel_filter_bank(n_mels: int = 80, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters (librosa's default; what Whisper was trained with),
    shape (n_fft/2+1, n_mels)."""
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f < min_log_hz, f / f_sp, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep)

    def mel_to_hz(m):
        m = np.asarray(m, dtype=np.float64)
        return np.where(m < min_log_mel, m * f_sp, min_log_hz * np.exp(logstep * (m - min_log_mel)))

    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    widths = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]  # (bins, n_mels+2)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= 2.0 / (edges[2:] - edges[:-2])
    return filters.astype(np.float32)


def resolve_provider(provider: str) -> str:
    """'xdna' / 'cpu' / a full EP name -> the EP name, registering the XDNA plugin when it is asked for."""
    import onnxruntime as ort

    name = {"xdna": XDNA_EP, "cpu": CPU_EP}.get(provider.lower(), provider)
    if name == XDNA_EP:
        try:
            from .. import register

            register()
        except Exception as e:  # library missing, ABI mismatch, ...
            raise TranscribeError(f"the XDNA execution provider is not available ({_one_line(e)}); "
                                  "use --provider cpu") from None
    if name not in ort.get_available_providers():
        raise TranscribeError(f"execution provider {name!r} is not available in this onnxruntime "
                              f"({', '.join(ort.get_available_providers())})")
    return name


def _one_line(e: object) -> str:
    lines = str(e).strip().splitlines()
    return lines[-1].strip() if lines else type(e).__name__


def resolve_model_dir(model: str | os.PathLike, log: Callable[[str], None] = lambda m: None) -> Path:
    """A directory holding the ONNX export: a given DIR as is, otherwise `ensure_model` (fetch + convert once)."""
    p = Path(model)
    if p.is_dir() and (p / "encoder_model.onnx").is_file():
        return p
    try:
        from .model import ensure_model
    except ImportError as e:
        raise TranscribeError(f"model {model!r}: no export there and model fetching is unavailable ({e})") from None
    try:
        return Path(ensure_model(str(model), log=log))
    except Exception as e:
        raise TranscribeError(f"model {model!r} could not be prepared: {_one_line(e)}") from None


class WhisperOnnx:
    """The three ONNX sessions of an optimum Whisper export plus what decoding needs from its config files."""

    FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")

    def __init__(self, model_dir: str | os.PathLike, provider: str = XDNA_EP, session_options=None):
        import onnxruntime as ort
        import tokenizers

        self.model_dir = Path(model_dir)
        missing = [f for f in self.FILES + ("tokenizer.json", "config.json") if not (self.model_dir / f).is_file()]
        if missing:
            raise TranscribeError(f"{self.model_dir}: not a Whisper ONNX export (missing {', '.join(missing)})")
        self.provider = resolve_provider(provider)
        providers = [self.provider] if self.provider == CPU_EP else [self.provider, CPU_EP]
        if session_options is None and self.provider == XDNA_EP:
            from .._placement import session_options as xdna_session_options

            session_options = xdna_session_options()  # placement recorded, ORT's thread spinning off (see there)
        t = time.perf_counter()
        try:
            self.encoder, self.decoder, self.decoder_with_past = (
                ort.InferenceSession(str(self.model_dir / f), sess_options=session_options, providers=providers)
                for f in self.FILES
            )
        except Exception as e:
            raise TranscribeError(f"{self.model_dir}: ONNX Runtime could not load the model ({_one_line(e)})") from None
        self.load_seconds = time.perf_counter() - t

        self.tokenizer = tokenizers.Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        config = json.loads((self.model_dir / "config.json").read_text())
        gen_path = self.model_dir / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        self.n_mels = int(config.get("num_mel_bins", 80))
        self.mel_filters = mel_filter_bank(self.n_mels)
        self.max_target_positions = int(config.get("max_target_positions", 448))
        self.vocab_size = int(config["vocab_size"])

        def token(text: str, default: int | None = None) -> int | None:
            tid = self.tokenizer.token_to_id(text)
            return default if tid is None else tid

        self.eot = int(gen.get("eos_token_id", config.get("eos_token_id", token("<|endoftext|>"))))
        self.sot = int(gen.get("decoder_start_token_id", config.get("decoder_start_token_id", token("<|startoftranscript|>"))))
        self.no_timestamps = int(gen.get("no_timestamps_token_id", token("<|notimestamps|>")))
        self.ts_begin = self.no_timestamps + 1
        self.sot_prev = int(gen.get("prev_sot_token_id", token("<|startofprev|>", self.sot + 103)))
        self.no_speech = token("<|nospeech|>", token("<|nocaptions|>", self.no_timestamps - 1))
        self.lang_to_id = {k.strip("<|>"): int(v) for k, v in (gen.get("lang_to_id") or {}).items()}
        self.task_to_id = {k: int(v) for k, v in (gen.get("task_to_id") or {}).items()}
        self.is_multilingual = bool(gen.get("is_multilingual", self.vocab_size >= 51865)) and bool(self.lang_to_id)
        if self.is_multilingual and not self.task_to_id:
            self.task_to_id = {"transcribe": token("<|transcribe|>"), "translate": token("<|translate|>")}
        self.suppress = np.array(gen.get("suppress_tokens") or config.get("suppress_tokens") or [], dtype=np.int64)
        self.max_initial_timestamp = gen.get("max_initial_timestamp_index", MAX_INITIAL_TIMESTAMP)
        self.begin_suppress = np.array(gen.get("begin_suppress_tokens") or config.get("begin_suppress_tokens")
                                       or [220, self.eot], dtype=np.int64)

        self._dec_outputs = [o.name for o in self.decoder.get_outputs()]
        self._past_outputs = [o.name for o in self.decoder_with_past.get_outputs()]
        past_inputs = {i.name for i in self.decoder_with_past.get_inputs()}
        # present.N.{decoder,encoder}.{key,value} -> past_key_values.N.…; the with-past graph only re-emits the
        # self-attention (decoder) half, the cross-attention half stays what decoder_model produced.
        self._as_past = {o: o.replace("present.", "past_key_values.", 1) for o in self._dec_outputs[1:]}
        unknown = [p for p in self._as_past.values() if p not in past_inputs]
        if unknown:
            raise TranscribeError(f"{self.model_dir}: unexpected decoder inputs/outputs ({unknown[:2]}…); "
                                  "export with task automatic-speech-recognition-with-past")

    # -- one window -------------------------------------------------------------------------------------------

    def features(self, window: np.ndarray) -> np.ndarray:
        return log_mel_spectrogram(window, self.mel_filters)

    def encode(self, mel: np.ndarray):
        import onnxruntime as ort

        return self.encoder.run_with_ort_values(None, {"input_features": ort.OrtValue.ortvalue_from_numpy(mel)})[0]

    def prompt(self, language: str | None, task: str, timestamps: bool, previous: Sequence[int] = ()) -> list[int]:
        """[<|startofprev|> prev…] <|startoftranscript|> [<|lang|> <|task|>] [<|notimestamps|>];
        language None on a multilingual model leaves a placeholder that `decode` fills by detection."""
        head = [self.sot_prev, *previous[-(self.max_target_positions // 2 - 1) :]] if previous else []
        tokens = head + [self.sot]
        if self.is_multilingual:
            tokens.append(self.lang_to_id[language] if language else _LANG_PLACEHOLDER)
            tokens.append(self.task_to_id[task])
        if not timestamps:
            tokens.append(self.no_timestamps)
        return tokens

    def decode(self, encoded, prompt: list[int], timestamps: bool, max_new_tokens: int | None = None,
               timings: dict | None = None, stop_repetitions: bool = True) -> tuple[Decoded, list[int]]:
        """Greedy decoding of one window. Returns the result and the prompt actually used (language filled in).

        `stop_repetitions` ends decoding in a token loop (see `repetition_cut`); off = plain greedy decoding.
        """
        import onnxruntime as ort

        timings = timings if timings is not None else {}
        prompt = list(prompt)
        sot_index = prompt.index(self.sot)
        head = prompt.index(_LANG_PLACEHOLDER) if _LANG_PLACEHOLDER in prompt else len(prompt)
        limit = self.max_target_positions - len(prompt) - 1
        max_new_tokens = min(limit, max_new_tokens or self.max_target_positions // 2)

        t = time.perf_counter()
        ids = ort.OrtValue.ortvalue_from_numpy(np.array([prompt[:head]], dtype=np.int64))
        outputs = self.decoder.run_with_ort_values(self._dec_outputs, {"input_ids": ids, "encoder_hidden_states": encoded})
        logits = outputs[0].numpy()[0]
        past = {self._as_past[name]: value for name, value in zip(self._dec_outputs[1:], outputs[1:])}
        timings["decoder_prompt_s"] = timings.get("decoder_prompt_s", 0.0) + time.perf_counter() - t
        no_speech_prob = float(np.exp(logits[sot_index, self.no_speech] - _logsumexp(logits[sot_index])))
        if head < len(prompt):  # language detection from the <|startoftranscript|> position
            lang_ids = np.array(sorted(self.lang_to_id.values()))
            prompt[head] = int(lang_ids[np.argmax(logits[sot_index, lang_ids])])
        next_logits = logits[-1]

        steps_s, steps = 0.0, 0

        def step(token: int) -> np.ndarray:
            nonlocal past, steps_s, steps
            t0 = time.perf_counter()
            feed = dict(past)
            feed["input_ids"] = ort.OrtValue.ortvalue_from_numpy(np.array([[token]], dtype=np.int64))
            out = self.decoder_with_past.run_with_ort_values(self._past_outputs, feed)
            for name, value in zip(self._past_outputs[1:], out[1:]):
                past[self._as_past[name]] = value
            steps_s += time.perf_counter() - t0
            steps += 1
            return out[0].numpy()[0, -1]

        for token in prompt[head:]:
            next_logits = step(token)  # the detected language token, then the rest of the prompt

        tokens: list[int] = []
        sum_logprob, stop = 0.0, "max_tokens"
        while len(tokens) < max_new_tokens:
            token, logprob = self._select(next_logits, tokens, timestamps)
            if token == self.eot:
                stop = "eot"
                sum_logprob += logprob
                break
            tokens.append(token)
            sum_logprob += logprob
            cut = repetition_cut(tokens) if stop_repetitions and len(tokens) >= 24 else None
            if cut is not None:
                del tokens[cut:]
                stop = "repetition"
                break
            if len(tokens) < max_new_tokens:
                next_logits = step(token)
        timings["decoder_steps_s"] = timings.get("decoder_steps_s", 0.0) + steps_s
        timings["decoder_steps"] = timings.get("decoder_steps", 0) + steps
        return Decoded(tokens, sum_logprob, no_speech_prob, stop), prompt

    def _select(self, logits: np.ndarray, tokens: list[int], timestamps: bool) -> tuple[int, float]:
        x = np.array(logits, dtype=np.float32)
        if self.suppress.size:
            x[self.suppress] = -np.inf
        if not tokens:
            x[self.begin_suppress] = -np.inf
        if timestamps:
            apply_timestamp_rules(x, tokens, self.ts_begin, self.eot, self.no_timestamps, self.max_initial_timestamp)
        token = int(np.argmax(x))
        return token, float(x[token]) - _logsumexp(x)

    def text(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t < self.eot], skip_special_tokens=True)

    def language_of(self, token: int) -> str | None:
        return next((code for code, tid in self.lang_to_id.items() if tid == token), None)


# --------------------------------------------------------------------------------------------------------------
# Whole files


_MODEL_CACHE: dict[tuple[str, str], WhisperOnnx] = {}


def load_model(model: str | os.PathLike | WhisperOnnx = "base", provider: str = XDNA_EP,
               log: Callable[[str], None] = lambda m: None) -> WhisperOnnx:
    """A WhisperOnnx for a model name or directory, cached per process (sessions are expensive to create)."""
    if isinstance(model, WhisperOnnx):
        return model
    model_dir = resolve_model_dir(model, log)
    key = (str(model_dir.resolve()), provider)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = WhisperOnnx(model_dir, provider)
    return _MODEL_CACHE[key]


def transcribe(audio: str | os.PathLike | np.ndarray, model: str | os.PathLike | WhisperOnnx = "base",
               provider: str = XDNA_EP, language: str | None = None, task: str = "transcribe",
               timestamps: bool | None = None, condition_on_previous_text: bool = False,
               progress: Callable[[float, float | None], None] | None = None) -> Result:
    """Transcribes (or translates to English) a file path or a 16 kHz mono float32 array.

    timestamps: None = only when the audio is longer than one 30 s window (segments then come from timestamp
    tokens); True/False forces it. Raises AudioError / TranscribeError with one-line messages.
    """
    t_start = time.perf_counter()
    whisper = load_model(model, provider)
    load_s = time.perf_counter() - t_start
    if task not in ("transcribe", "translate"):
        raise TranscribeError(f"unknown task {task!r}: use transcribe or translate")
    if not whisper.is_multilingual:
        if task == "translate":
            raise TranscribeError("this model is English-only: it cannot translate (use a multilingual model, e.g. base)")
        if language not in (None, "en"):
            raise TranscribeError(f"this model is English-only: --language {language} is not possible")
        language = None
    elif language is not None:
        language = language.lower()
        if language not in whisper.lang_to_id:
            raise TranscribeError(f"unknown language {language!r}; the model knows: {', '.join(sorted(whisper.lang_to_id))}")

    t_audio0 = time.perf_counter()
    stream = AudioStream(audio)
    if stream.at_end(0):
        raise AudioError(f"{stream.name}: contains no audio samples (zero length)")
    timings: dict = {"load_s": load_s, "audio_s": time.perf_counter() - t_audio0, "mel_s": 0.0, "encoder_s": 0.0,
                     "windows": 0}
    total = stream.duration
    if timestamps is None:
        timestamps = total is None or total > N_SAMPLES / SAMPLE_RATE
    detected: str | None = language

    segments: list[Segment] = []
    previous: list[int] = []
    seek = 0
    while True:
        t0 = time.perf_counter()
        if seek and stream.at_end(seek):
            break
        window = stream.window(seek, N_SAMPLES)
        timings["audio_s"] += time.perf_counter() - t0
        if window.size == 0 or (seek and window.size < SAMPLE_RATE // 10):  # nothing or a < 0.1 s tail
            break
        if progress:
            progress(seek / SAMPLE_RATE, total)
        if float(np.abs(window).max()) < SILENCE_PEAK:  # digital silence: Whisper would only hallucinate here
            seek += window.size
            continue
        t0 = time.perf_counter()
        mel = whisper.features(window)
        t1 = time.perf_counter()
        encoded = whisper.encode(mel)
        t2 = time.perf_counter()
        timings["mel_s"] += t1 - t0
        timings["encoder_s"] += t2 - t1
        timings["windows"] += 1
        prompt = whisper.prompt(detected, task, timestamps, previous if condition_on_previous_text else ())
        decoded, used = whisper.decode(encoded, prompt, timestamps, timings=timings)
        if whisper.is_multilingual and detected is None:
            detected = whisper.language_of(used[used.index(whisper.sot) + 1])  # fixed for the rest of the file
        if decoded.no_speech_prob > NO_SPEECH_THRESHOLD and decoded.avg_logprob < LOGPROB_THRESHOLD:
            seek += window.size
            continue
        if timestamps:
            spans, advance = split_segments(decoded.tokens, whisper.ts_begin, seek, window.size,
                                            complete=decoded.stop == "eot")
        else:
            spans, advance = [(seek / SAMPLE_RATE, (seek + window.size) / SAMPLE_RATE, decoded.tokens)], window.size
        for start, end, tokens in spans:
            text = whisper.text(tokens)
            if text.strip():
                segments.append(Segment(start, end, text, tokens))
        previous = [t for t in decoded.tokens if t < whisper.eot] if decoded.stop == "eot" else []
        seek += advance
    duration = stream.samples_read / SAMPLE_RATE
    if progress:
        progress(duration, duration)
    timings["total_s"] = time.perf_counter() - t_start
    timings["transcribe_s"] = timings["total_s"] - load_s
    text = "".join(s.text for s in segments).strip()
    if not whisper.is_multilingual:
        detected = "en"
    return Result(text, segments, detected, timings, duration)


# --------------------------------------------------------------------------------------------------------------
# CLI


def sample_path() -> Path:
    """The bundled real-speech sample (LibriVox, public domain) used when `xdna transcribe` gets no file."""
    return Path(__file__).resolve().parent.parent / "samples" / "librivox_sense_and_sensibility_0870.wav"


def add_transcribe_arguments(parser) -> None:
    parser.add_argument("files", nargs="*", metavar="FILE",
                        help="audio files (wav/flac/ogg/mp3 via soundfile, anything else via ffmpeg); "
                             "none = the bundled sample")
    parser.add_argument("--model", default="base", help="base | tiny.en | DIR with an optimum ONNX export (default base)")
    parser.add_argument("--provider", choices=("xdna", "cpu"), default="xdna",
                        help="run the model's MatMuls on the XDNA EP (default) or everything on the CPU EP")
    parser.add_argument("--language", help="language code (e.g. en, de); detected from the first 30 s if absent")
    parser.add_argument("--task", choices=("transcribe", "translate"), default="transcribe",
                        help="translate = speech in any language to English text")
    parser.add_argument("--format", choices=FORMATS, default="txt", help="output format (default txt)")
    parser.add_argument("-o", "--output-dir", help="write FILE.<format> there instead of printing to stdout")
    parser.add_argument("--condition-on-previous-text", action="store_true",
                        help="prompt each 30 s window with the previous window's text (OpenAI's default): keeps "
                             "casing and punctuation across windows, but risks repeating a hallucination")
    parser.add_argument("--progress", action="store_true", help="progress bar on stderr even when it is not a terminal")


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
    """`xdna transcribe`: 0 = all files done, 1 = model/provider problem, 2 = at least one unusable input."""

    def err(msg: str) -> None:
        print(f"xdna transcribe: error: {msg}", file=sys.stderr)

    missing = [m for m in RUNTIME_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        err(f"{', '.join(missing)} not installed: pip install 'onnxruntime-ep-xdna[whisper]'")
        return 1
    files = list(args.files) or [str(sample_path())]
    if not args.files:
        print(f"no FILE given: transcribing the bundled sample {files[0]}", file=sys.stderr)
    usable, status = [], 0
    for f in files:  # every input checked before the model is loaded
        try:
            probe(f)
            usable.append(f)
        except AudioError as e:
            err(str(e))
            status = 2
    if not usable:
        return status
    out_dir = Path(args.output_dir) if args.output_dir else None
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
    for f in usable:
        bar = _ProgressBar(Path(f).name) if show_progress else None
        try:
            result = transcribe(f, whisper, language=args.language, task=args.task,
                                timestamps=True if args.format in ("srt", "vtt") else None,
                                condition_on_previous_text=args.condition_on_previous_text, progress=bar)
        except (AudioError, TranscribeError) as e:
            if bar:
                bar.close()
            err(str(e))
            status = max(status, 2 if isinstance(e, AudioError) else 1)
            continue
        except KeyboardInterrupt:
            if bar:
                bar.close()
            err("interrupted")
            return 130
        if bar:
            bar.close()
        text = render(result, args.format)
        if out_dir:
            target = out_dir / f"{Path(f).stem}.{args.format}"
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target}", file=sys.stderr)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
        if not result.text:
            print(f"{f}: no speech detected (empty transcript)", file=sys.stderr)
        proc = result.timings["transcribe_s"]
        rtf = proc / result.duration if result.duration else float("nan")
        lang = f", language {result.language}" if result.language else ""
        print(f"{Path(f).name}: audio {result.duration:.1f} s, processed in {proc:.2f} s, RTF {rtf:.3f}, "
              f"provider {whisper.provider}{lang}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (`python -m onnxruntime_ep_xdna.whisper.transcribe`); `xdna transcribe` is the same."""
    import argparse

    parser = argparse.ArgumentParser(prog="xdna transcribe", description="Transcribe audio with Whisper on ONNX Runtime")
    add_transcribe_arguments(parser)
    return run_transcribe(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
