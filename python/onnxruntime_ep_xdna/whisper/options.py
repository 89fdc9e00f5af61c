"""Decoding and transcription options, with the defaults of OpenAI's `whisper` and faster-whisper.

One frozen dataclass, validated on creation, so a server or batch engine can build it once from a request and pass
it on. `TranscriptionOptions.from_kwargs(beam_size=1, ...)` is what `transcribe(audio, **kwargs)` uses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

# OpenAI's temperature schedule for fallback: 0.0, 0.2, ..., 1.0.
DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


class OptionsError(ValueError):
    """An option value that cannot work, phrased for the user (one line)."""


@dataclass(frozen=True)
class TranscriptionOptions:
    """Everything that steers decoding; each field documents its reference behaviour.

    language: None = detected on the first window (probabilities in TranscriptionInfo).
    task: "transcribe" or "translate" (speech in any language -> English text; multilingual models only).
    beam_size: beams at temperature 0 (1 = greedy). best_of: candidates sampled at temperature > 0.
    patience: beam search stops when round(beam_size * patience) sequences have finished (OpenAI's definition).
    length_penalty: None ranks by sum log-prob / length; a float alpha uses ((5 + length) / 6) ** alpha.
    temperature: the fallback schedule; a window is decoded again at the next temperature when its text compresses
      better than compression_ratio_threshold (zlib; repetition) or its average log-prob is below
      log_prob_threshold - unless no_speech_prob > no_speech_threshold says the window is silence.
    no_speech_threshold: a window is skipped when no_speech_prob is above it and the average log-prob is below
      log_prob_threshold.
    condition_on_previous_text: prompt each window with the text committed so far (reset after a window decoded
      above prompt_reset_on_temperature, so a hallucination does not feed itself).
    initial_prompt: text (or token ids) before the first window's prompt. prefix: text the first window's
      transcript must start with. hotwords: hint text put in the prompt (ignored when prefix is given).
    suppress_tokens: token ids never generated; -1 = the model's non-speech symbol set (OpenAI's default).
    suppress_blank: no blank or <|endoftext|> as the first generated token.
    without_timestamps: decode text only (one segment per window; long files then advance by whole windows).
    max_initial_timestamp: the first timestamp of a window is at most this many seconds.
    sample_len: generated tokens per window at most (OpenAI: n_text_ctx // 2 = 224).
    seed: the sampling random generator's seed (temperature > 0), so that runs are reproducible.
    word_timestamps: align every word (Segment.words: start, end, word, probability) from the cross-attention of
      the checkpoint's alignment heads + DTW (OpenAI's timing.py); prepend_punctuations / append_punctuations are
      merged into the next / previous word.
    word_timing_refine: with word_timestamps, move word starts/ends that DTW put in a pause to the speech onset/
      offset seen in the log-mel energy (the pause before a word is otherwise counted in it); False = OpenAI's.
    vad_filter: run Silero VAD first and transcribe only the speech (joined; times mapped back to the original).
      vad_parameters: a vad.VadOptions or a dict of its fields (threshold, neg_threshold, min_speech_duration_ms,
      max_speech_duration_s, min_silence_duration_ms, speech_pad_ms).
    hallucination_silence_threshold: with word_timestamps, skip silences longer than this many seconds around a
      segment that looks hallucinated (improbable, too short or too long words), OpenAI's rule; None = off.
    clip_timestamps: only these stretches are transcribed: (start, end, start, end, ...) seconds or the same as a
      comma-separated string ("0,30,60" = 0-30 s and 60 s to the end); None = everything.
    language_detection_segments: windows (30 s each, from the start) whose language probabilities are averaged
      when the language is detected (OpenAI and faster-whisper: 1).
    """

    language: str | None = None
    task: str = "transcribe"
    beam_size: int = 5
    best_of: int = 5
    patience: float = 1.0
    length_penalty: float | None = None
    temperature: tuple[float, ...] = DEFAULT_TEMPERATURES
    compression_ratio_threshold: float | None = 2.4
    log_prob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True
    prompt_reset_on_temperature: float = 0.5
    initial_prompt: str | Sequence[int] | None = None
    prefix: str | None = None
    hotwords: str | None = None
    suppress_tokens: tuple[int, ...] = (-1,)
    suppress_blank: bool = True
    without_timestamps: bool = False
    max_initial_timestamp: float = 1.0
    sample_len: int | None = None
    seed: int = 0
    word_timestamps: bool = False
    word_timing_refine: bool = True
    prepend_punctuations: str = "\"'“¿([{-"
    append_punctuations: str = "\"'.。,，!！?？:：”)]}、"
    vad_filter: bool = False
    vad_parameters: object = None
    language_detection_segments: int = 1
    hallucination_silence_threshold: float | None = None
    clip_timestamps: object = None

    def __post_init__(self):
        t = self.temperature
        temps = (float(t),) if isinstance(t, (int, float)) else tuple(float(x) for x in t)
        object.__setattr__(self, "temperature", temps)
        object.__setattr__(self, "suppress_tokens", tuple(int(x) for x in (self.suppress_tokens or ())))
        if isinstance(self.initial_prompt, (list, tuple)):
            object.__setattr__(self, "initial_prompt", tuple(int(x) for x in self.initial_prompt))
        if isinstance(self.vad_parameters, dict):
            from .vad import VadOptions

            try:
                object.__setattr__(self, "vad_parameters", VadOptions(**self.vad_parameters))
            except TypeError as e:
                raise OptionsError(f"vad_parameters: {e}") from None
        clips = self.clip_timestamps
        if isinstance(clips, str):
            try:
                clips = tuple(float(x) for x in clips.split(",") if x.strip())
            except ValueError:
                raise OptionsError(f"clip_timestamps must be numbers start,end,...: {self.clip_timestamps!r}") from None
        if clips is not None:
            clips = tuple(float(x) for x in clips)
            if any(not math.isfinite(x) or x < 0 for x in clips) or any(
                    b <= a for a, b in zip(clips[0::2], clips[1::2])) or any(
                    b < a for a, b in zip(clips[1::2], clips[2::2])):
                raise OptionsError(f"clip_timestamps must be increasing start,end pairs in seconds, not {clips!r}")
            object.__setattr__(self, "clip_timestamps", clips or None)
            if clips and self.vad_filter:
                raise OptionsError("clip_timestamps and vad_filter cannot be combined (both choose what is decoded)")
        if self.hallucination_silence_threshold is not None:
            if not (self.hallucination_silence_threshold > 0 and math.isfinite(self.hallucination_silence_threshold)):
                raise OptionsError("hallucination_silence_threshold must be a number of seconds > 0")
            if not self.word_timestamps:
                raise OptionsError("hallucination_silence_threshold needs word_timestamps")
        if not isinstance(self.language_detection_segments, int) or self.language_detection_segments < 1:
            raise OptionsError("language_detection_segments must be an integer >= 1")
        if self.task not in ("transcribe", "translate"):
            raise OptionsError(f"unknown task {self.task!r}: use transcribe or translate")
        if not temps or any(not math.isfinite(x) or x < 0 for x in temps):
            raise OptionsError(f"temperature must be one or more numbers >= 0, not {self.temperature!r}")
        for name in ("beam_size", "best_of"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise OptionsError(f"{name} must be an integer >= 1, not {value!r}")
        if not (self.patience > 0 and math.isfinite(self.patience)):
            raise OptionsError(f"patience must be > 0, not {self.patience!r}")
        if self.length_penalty is not None and not (0 <= self.length_penalty <= 1):
            raise OptionsError(f"length_penalty must be between 0 and 1 (or None), not {self.length_penalty!r}")
        if self.max_initial_timestamp < 0:
            raise OptionsError("max_initial_timestamp must be >= 0")
        if self.sample_len is not None and self.sample_len < 1:
            raise OptionsError("sample_len must be >= 1")
        for name in ("compression_ratio_threshold", "log_prob_threshold", "no_speech_threshold"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise OptionsError(f"{name} must be a finite number or None")

    @classmethod
    def from_kwargs(cls, options: "TranscriptionOptions | None" = None, **kwargs) -> "TranscriptionOptions":
        """`options` (or the defaults) with the given fields replaced; an unknown name is an OptionsError."""
        base = options or cls()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise OptionsError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(base, **kwargs) if kwargs else base

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# The fields of TranscriptionOptions, for `xdna transcribe --help` and documentation tables.
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(TranscriptionOptions))
