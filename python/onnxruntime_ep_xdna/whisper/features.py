"""Whisper's audio front end: the constants, the mel filter bank and the whole-file log-mel spectrogram.

The numbers are OpenAI's `whisper.audio.log_mel_spectrogram` as `transcribe()` uses it: the file is followed by
30 s of zero samples, a centred STFT (periodic Hann 400, hop 160, reflect padding at the start) gives one frame per
160 samples, log10 of the mel power clamped at 1e-10, a floor at (maximum over the WHOLE file) - 8, then
(x + 4) / 4. A window is frames [seek, seek + 3000) of that, padded with 0.0 (in normalised mel space) where the
file has no more frames. tests/test_whisper.py checks this against OpenAI's own code on real speech.

Files are read twice when they are long (pass 1 finds the whole-file maximum, pass 2 serves the windows), so memory
stays bounded: only up to `KEEP_SECONDS` of log-mel are kept from pass 1. Arrays are computed in one go.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterable, Iterator

import numpy as np

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30  # seconds of audio per window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples per window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100
TIME_PRECISION = 0.02  # seconds per timestamp token: the encoder halves the frame rate
FRAMES_PER_TOKEN = round(TIME_PRECISION * FRAMES_PER_SECOND)  # 2 mel frames per timestamp step
N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>
LOG_FLOOR_DB = 8.0  # log10 units below the file's maximum that the spectrogram is clipped at
MEL_POWER_FLOOR = 1e-10  # mel power is clamped here before log10 (so no log-mel is below -10)
NORM_OFFSET, NORM_DIVISOR = 4.0, 4.0  # normalised log-mel = (floored log10 mel + NORM_OFFSET) / NORM_DIVISOR
# Log-mel kept from the first pass of a file (80 mels x 100 frames/s x 4 B = 32 kB per second of audio): files up
# to this length are read once; longer ones are read again for the windows.
KEEP_SECONDS = 20 * 60
# A window whose every sample is below one 16-bit step carries no signal at all (digital silence). It is not
# decoded: Whisper can only hallucinate there, and skipping it is what makes hours of silence cost seconds.
# Anything louder, however quiet, is decoded (the whole-file normalisation lifts quiet recordings).
DIGITAL_SILENCE = 2.0 ** -15


def mel_filter_bank(n_mels: int = 80, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters (librosa's default; OpenAI's mel_filters.npz),
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


def hann_window() -> np.ndarray:
    """The periodic Hann window of N_FFT samples, float64."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)


_HANN = hann_window().astype(np.float32)
SILENT_LOG_MEL = math.log10(MEL_POWER_FLOOR)  # -10: the log-mel of a frame without signal


def _log10_mel(frames: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """(k, N_FFT) windowed-to-be frames -> (n_mels, k) log10 mel power, clamped at MEL_POWER_FLOOR, not normalised."""
    spec = np.fft.rfft(frames * _HANN, axis=-1)
    power = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
    mel = power @ filters
    return np.log10(np.maximum(mel, MEL_POWER_FLOOR)).T


def numpy_frames_log10_mel(filters: np.ndarray) -> Callable[[np.ndarray, int], np.ndarray]:
    """The numpy front end: (span of samples, frame count) -> (n_mels, count) log10 mel of the frames at
    span[i*HOP_LENGTH : i*HOP_LENGTH + N_FFT]. whisper/frontend.py has the ONNX model that does the same on the EP."""

    def run(span: np.ndarray, count: int) -> np.ndarray:
        view = np.lib.stride_tricks.sliding_window_view(span, N_FFT)[::HOP_LENGTH][:count]
        return _log10_mel(view, filters)

    return run


class _FrameMaker:
    """Streaming STFT frames of a signal fed in blocks: frame i is centred on sample i*HOP_LENGTH, the start is
    reflect-padded, the end is followed by zeros (OpenAI pads the file with 30 s of zeros before its STFT)."""

    def __init__(self, filters: np.ndarray, frames_log10_mel: Callable[[np.ndarray, int], np.ndarray] | None = None):
        self.filters = filters
        self._log10_mel = frames_log10_mel or numpy_frames_log10_mel(filters)
        self._buf = np.zeros(0, dtype=np.float32)  # signal from absolute sample _buf_start (may be negative)
        self._buf_start = 0
        self._head: list[np.ndarray] = []  # the first samples, until the reflect padding can be built
        self._started = False
        self.n_frames = 0  # frames produced
        self.n_samples = 0
        self.hop_peak: list[np.ndarray] = []  # max |sample| per hop (digital-silence detection)
        self._carry, self._carry_n = 0.0, 0

    def _emit(self, end_sample: int) -> np.ndarray:
        """All not yet produced frames whose window ends at or before absolute sample `end_sample`."""
        half = N_FFT // 2
        last = (end_sample - half) // HOP_LENGTH  # frame i needs samples < i*HOP + half
        count = last + 1 - self.n_frames
        if count <= 0:
            return np.zeros((self.filters.shape[1], 0), np.float32)
        first = self.n_frames * HOP_LENGTH - half - self._buf_start
        span = self._buf[first : first + (count - 1) * HOP_LENGTH + N_FFT]
        if not span.any():  # digital silence: log10 of the 1e-10 clamp, without an FFT (hours of it are common)
            out = np.full((self.filters.shape[1], count), SILENT_LOG_MEL, np.float32)
        else:
            out = self._log10_mel(span, count)
        self.n_frames += count
        drop = self.n_frames * HOP_LENGTH - half - self._buf_start
        self._buf = self._buf[drop:]
        self._buf_start += drop
        return out

    def _start(self, head: np.ndarray) -> None:
        half = N_FFT // 2
        # OpenAI reflects the (already zero-padded) signal; a file shorter than the pad reflects into zeros.
        padded = np.concatenate([head, np.zeros(half + 1, np.float32)]) if head.size <= half else head
        self._buf = np.concatenate([padded[1 : half + 1][::-1], head])
        self._buf_start = -half
        self._started = True

    def feed(self, block: np.ndarray) -> np.ndarray:
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        self._peaks(block)
        self.n_samples += block.size
        if not self._started:
            self._head.append(block)
            head = np.concatenate(self._head)
            if head.size <= N_FFT // 2:
                return np.zeros((self.filters.shape[1], 0), np.float32)
            self._head = []
            self._start(head)
            return self._emit(self._buf_start + self._buf.size)
        self._buf = np.concatenate([self._buf, block])
        return self._emit(self._buf_start + self._buf.size)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(frames still owed for the content, log-mel of the frames after it that still see audio): the content
        is n_samples // HOP_LENGTH frames, as OpenAI counts it; the tail only counts towards the maximum."""
        if not self._started:
            self._start(np.concatenate(self._head) if self._head else np.zeros(0, np.float32))
        content = self.n_samples // HOP_LENGTH
        self._buf = np.concatenate([self._buf, np.zeros(N_FFT + HOP_LENGTH, np.float32)])
        rest = self._emit(self._buf_start + self._buf.size)
        owed = content - (self.n_frames - rest.shape[1])
        return rest[:, :max(owed, 0)], rest[:, max(owed, 0):]

    def _peaks(self, block: np.ndarray) -> None:
        """Max |sample| per HOP_LENGTH samples of the file, carried across block boundaries."""
        x = np.abs(block)
        if self._carry_n:
            k = min(HOP_LENGTH - self._carry_n, x.size)
            if k:
                self._carry = max(self._carry, float(x[:k].max()))
            self._carry_n += k
            x = x[k:]
            if self._carry_n == HOP_LENGTH:
                self.hop_peak.append(np.array([self._carry], np.float32))
                self._carry, self._carry_n = 0.0, 0
        n = x.size // HOP_LENGTH * HOP_LENGTH
        if n:
            self.hop_peak.append(x[:n].reshape(-1, HOP_LENGTH).max(axis=1))
        if x.size > n:
            self._carry, self._carry_n = float(x[n:].max()), x.size - n

    def peaks(self) -> np.ndarray:
        pieces = self.hop_peak + ([np.array([self._carry], np.float32)] if self._carry_n else [])
        return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


class LogMel:
    """The whole-file log-mel of one input, served window by window (forward only).

    `window(seek)` -> (1, n_mels, N_FRAMES) float32: frames [seek, seek + N_FRAMES) normalised with the whole
    file's maximum, 0.0 past the end of the content. `content_frames` and `duration` are known from the start.
    """

    def __init__(self, n_mels: int, filters: np.ndarray, blocks: Callable[[], Iterable[np.ndarray]],
                 keep_seconds: float = KEEP_SECONDS, name: str = "<array>",
                 frames_log10_mel: Callable[[np.ndarray, int], np.ndarray] | None = None):
        """`frames_log10_mel`: the front end that turns frames into log10 mel (numpy_frames_log10_mel by default;
        frontend.EpFrontEnd runs it on the EP)."""
        self.n_mels, self.name = n_mels, name
        self._filters = filters
        self._blocks = blocks
        self._frames_log10_mel = frames_log10_mel
        maker = _FrameMaker(filters, frames_log10_mel)
        kept: list[np.ndarray] | None = []
        peak = -np.inf
        keep_frames = int(keep_seconds * FRAMES_PER_SECOND)
        for block in blocks():
            if not np.isfinite(block).all():
                from .audio import AudioError

                raise AudioError(f"{name}: contains invalid sample values (NaN or infinity)")
            out = maker.feed(block)
            if out.shape[1]:
                peak = max(peak, float(out.max()))
                if kept is not None:
                    kept.append(out)
                    if maker.n_frames > keep_frames:
                        kept = None  # too long to keep: pass 2 recomputes
        rest, tail = maker.finish()
        for part in (rest, tail):
            if part.shape[1]:
                peak = max(peak, float(part.max()))
        self.n_samples = maker.n_samples
        self.content_frames = self.n_samples // HOP_LENGTH
        # OpenAI's maximum also covers its 30 s of zero padding: log10(MEL_POWER_FLOOR) = -10.
        self.max = max(peak, SILENT_LOG_MEL)
        self._peaks = maker.peaks()
        if kept is not None:
            kept.append(rest)
            self._all = np.concatenate(kept, axis=1)[:, : self.content_frames] if kept else None
            self._stream = None
        else:
            self._all = None
            self._stream = None  # pass 2 opened on first use
        self._buf = np.zeros((n_mels, 0), np.float32)
        self._buf_start = 0

    @property
    def duration(self) -> float:
        return self.n_samples / SAMPLE_RATE

    def normalise(self, log_spec: np.ndarray) -> np.ndarray:
        return (np.maximum(log_spec, self.max - LOG_FLOOR_DB) + NORM_OFFSET) / NORM_DIVISOR

    def _pass2(self) -> Iterator[np.ndarray]:
        maker = _FrameMaker(self._filters, self._frames_log10_mel)
        for block in self._blocks():
            out = maker.feed(block)
            if out.shape[1]:
                yield out
        rest, _ = maker.finish()
        yield rest

    def _frames(self, start: int, count: int) -> np.ndarray:
        """Un-normalised frames [start, start+count) of the content (fewer at the end)."""
        end = min(start + count, self.content_frames)
        if self._all is not None:
            return self._all[:, start:end]
        if start < self._buf_start:
            raise ValueError("LogMel only moves forward")
        if self._stream is None:
            self._stream = self._pass2()
        pieces, have = [self._buf], self._buf_start + self._buf.shape[1]
        while have < end:
            block = next(self._stream, None)
            if block is None:
                break
            pieces.append(block)
            have += block.shape[1]
        buf = np.concatenate(pieces, axis=1) if len(pieces) > 1 else self._buf
        buf = buf[:, start - self._buf_start:]
        self._buf, self._buf_start = buf, start
        return buf[:, : end - start]

    def is_silent(self, start: int, count: int) -> bool:
        """True when frames [start, start+count) cover only digital silence (see DIGITAL_SILENCE)."""
        seg = self._peaks[max(start - 2, 0) : start + count + 2]  # hops that the frames' windows touch
        return seg.size == 0 or float(seg.max()) < DIGITAL_SILENCE

    def window(self, seek: int, size: int = N_FRAMES) -> np.ndarray:
        """(1, n_mels, N_FRAMES): `size` frames from `seek` normalised, the rest 0.0 (OpenAI's pad_or_trim)."""
        out = np.zeros((1, self.n_mels, N_FRAMES), np.float32)
        frames = self._frames(seek, min(size, N_FRAMES))
        out[0, :, : frames.shape[1]] = self.normalise(frames)
        return out


def log_mel_spectrogram(audio: np.ndarray, n_mels: int = 80, filters: np.ndarray | None = None) -> np.ndarray:
    """OpenAI's `log_mel_spectrogram(audio, n_mels, padding=N_SAMPLES)[:, :content_frames]` for a whole array:
    (n_mels, len(audio) // HOP_LENGTH), normalised with the whole array's maximum."""
    filters = mel_filter_bank(n_mels) if filters is None else filters
    mel = LogMel(n_mels, filters, lambda: [np.asarray(audio, np.float32).reshape(-1)])
    return mel.normalise(mel._frames(0, mel.content_frames))


def from_array(audio: np.ndarray, n_mels: int, filters: np.ndarray,
               frames_log10_mel: Callable[[np.ndarray, int], np.ndarray] | None = None) -> LogMel:
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    return LogMel(n_mels, filters, lambda: [audio], frames_log10_mel=frames_log10_mel)


def from_file(path: str | os.PathLike, n_mels: int, filters: np.ndarray,
              frames_log10_mel: Callable[[np.ndarray, int], np.ndarray] | None = None) -> LogMel:
    from .audio import iter_audio

    return LogMel(n_mels, filters, lambda: iter_audio(path), name=str(path), frames_log10_mel=frames_log10_mel)
