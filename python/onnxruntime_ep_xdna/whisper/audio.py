"""Audio input for Whisper: any file -> 16 kHz mono float32, streamed in blocks.

soundfile (libsndfile) reads wav/flac/ogg/mp3 and friends; anything else goes through an `ffmpeg` subprocess when
one is installed. Nothing here holds a whole long file in memory: `iter_audio` yields blocks and `Resampler`
carries its filter state across them, so a 2 h recording costs the same memory as a 2 min one.
Every failure is an `AudioError` whose message is one line meant for the user.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Iterator

import numpy as np

from .features import SAMPLE_RATE

_BLOCK_SECONDS = 30.0


class AudioError(Exception):
    """A problem with an input file, phrased for the user (one line, no traceback needed)."""


@dataclass(frozen=True)
class AudioInfo:
    path: str
    sample_rate: int
    channels: int
    duration: float | None  # seconds; None when the decoder cannot tell in advance (ffmpeg without ffprobe)
    decoder: str  # "soundfile" or "ffmpeg"


class Resampler:
    """Streaming polyphase windowed-sinc resampler (Kaiser window), rate `src` -> `dst`.

    Output sample n sits at input position n * src / dst; its value is the input convolved with a low-pass sinc
    (cut-off at the lower Nyquist, slightly rolled off) evaluated at that position. With L/M = dst/src in lowest
    terms there are only L distinct fractional positions, so the filter bank is L rows precomputed once.
    """

    def __init__(self, src: int, dst: int = SAMPLE_RATE, half_width: int = 16, beta: float = 8.6):
        g = gcd(src, dst)
        self.up, self.down = dst // g, src // g
        cutoff = min(1.0, self.up / self.down) * 0.94
        # Taps per side in input samples: `half_width` zero crossings of the (possibly widened) sinc.
        self.half = int(math.ceil(half_width / cutoff))
        offsets = np.arange(-self.half + 1, self.half + 1, dtype=np.float64)  # input taps relative to floor(pos)
        frac = np.arange(self.up, dtype=np.float64)[:, None] / self.up  # (L, 1) fractional positions
        d = offsets[None, :] - frac  # distance tap -> output position
        window = np.kaiser(2 * self.half + 1, beta)
        # Window evaluated at continuous positions by interpolation (the table is fine-grained enough).
        w = np.interp(d, np.arange(-self.half, self.half + 1), window, left=0.0, right=0.0)
        bank = cutoff * np.sinc(cutoff * d) * w
        bank /= bank.sum(axis=1, keepdims=True)  # unit DC gain for every phase
        self.bank = bank.astype(np.float32)
        self._buf = np.zeros(self.half - 1, dtype=np.float32)  # zeros before the signal start
        self._buf_start = -(self.half - 1)  # absolute input index of _buf[0]
        self._n_out = 0  # output samples produced so far

    def _produce(self, available_end: int) -> np.ndarray:
        """All outputs whose taps lie below absolute input index `available_end`."""
        # Output n needs inputs up to floor(n*down/up) + half, which must be < available_end.
        last = ((available_end - self.half) * self.up - 1) // self.down
        n = np.arange(self._n_out, last + 1, dtype=np.int64)
        if n.size == 0:
            return np.zeros(0, dtype=np.float32)
        base = (n * self.down) // self.up
        phase = (n * self.down) % self.up
        out = np.empty(n.size, dtype=np.float32)
        taps = np.arange(-self.half + 1, self.half + 1, dtype=np.int64)
        step = 1 << 15  # bound the (outputs x taps) gather matrix to a few MB
        for i in range(0, n.size, step):
            idx = base[i : i + step, None] + taps[None, :] - self._buf_start
            out[i : i + step] = np.einsum("ij,ij->i", self._buf[idx], self.bank[phase[i : i + step]])
        self._n_out = int(n[-1]) + 1
        # Keep only the input still needed by the next output.
        keep_from = (self._n_out * self.down) // self.up - self.half + 1
        drop = max(0, keep_from - self._buf_start)
        self._buf = self._buf[drop:]
        self._buf_start += drop
        return out

    def process(self, block: np.ndarray) -> np.ndarray:
        if self.up == self.down:
            return block.astype(np.float32, copy=False)
        self._buf = np.concatenate([self._buf, block.astype(np.float32, copy=False)])
        return self._produce(self._buf_start + self._buf.size)

    def flush(self, total_in: int) -> np.ndarray:
        """Outputs for the end of a signal of `total_in` input samples (zeros assumed past the end)."""
        if self.up == self.down:
            return np.zeros(0, dtype=np.float32)
        total_out = -(-total_in * self.up // self.down)  # ceil
        self._buf = np.concatenate([self._buf, np.zeros(self.half + 1, dtype=np.float32)])
        out = self._produce(self._buf_start + self._buf.size)
        return out[: max(0, total_out - (self._n_out - out.size))]


def resample(audio: np.ndarray, src: int, dst: int = SAMPLE_RATE) -> np.ndarray:
    """One-shot resampling of a 1-D signal (same filter as the streaming path)."""
    if src == dst:
        return audio.astype(np.float32, copy=False)
    r = Resampler(src, dst)
    return np.concatenate([r.process(audio), r.flush(audio.size)])


def _check_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise AudioError(f"{p}: file not found")
    if p.is_dir():
        raise AudioError(f"{p}: is a directory, not an audio file")
    try:
        size = p.stat().st_size
        with open(p, "rb"):
            pass
    except OSError as e:
        raise AudioError(f"{p}: cannot be read ({e.strerror})") from None
    if size == 0:
        raise AudioError(f"{p}: file is empty (0 bytes)")
    return p


def _ffmpeg() -> str | None:
    return shutil.which("ffmpeg")


def _ffprobe_duration(p: Path) -> float | None:
    exe = shutil.which("ffprobe")
    if not exe:
        return None
    try:
        out = subprocess.run(
            [exe, "-v", "error", "-show_entries", "format=duration", "-of", "default=nw=1:nk=1", str(p)],
            capture_output=True, text=True, timeout=60,
        ).stdout.strip()
        return float(out)
    except (ValueError, subprocess.SubprocessError, OSError):
        return None


def probe(path: str | os.PathLike) -> AudioInfo:
    """Opens the file far enough to know how it will be decoded; raises AudioError otherwise."""
    import soundfile as sf

    p = _check_path(path)
    try:
        info = sf.info(str(p))
        if info.samplerate <= 0 or info.channels <= 0:
            raise AudioError(f"{p}: invalid audio header (rate {info.samplerate}, {info.channels} channels)")
        frames = info.frames if 0 <= info.frames < 2**62 else None  # libsndfile reports huge values when unknown
        duration = frames / info.samplerate if frames is not None else None
        return AudioInfo(str(p), info.samplerate, info.channels, duration, "soundfile")
    except AudioError:
        raise
    except Exception as e:  # libsndfile: unknown format, truncated header, ...
        sf_reason = _one_line(e)
    if _ffmpeg() is None:
        raise AudioError(
            f"{p}: not an audio file soundfile can read ({sf_reason}); install ffmpeg to decode other formats"
        )
    # Decode a little to make sure ffmpeg understands it; this catches text files renamed to .mp3 and the like.
    proc = subprocess.run(
        [_ffmpeg(), "-nostdin", "-v", "error", "-i", str(p), "-t", "1", "-f", "f32le", "-ac", "1", "-ar",
         str(SAMPLE_RATE), "-"],
        capture_output=True,
    )
    if proc.returncode != 0:
        msg = _one_line(proc.stderr.decode(errors="replace")) or f"ffmpeg exit code {proc.returncode}"
        raise AudioError(f"{p}: not a readable audio file (ffmpeg: {msg})")
    return AudioInfo(str(p), SAMPLE_RATE, 1, _ffprobe_duration(p), "ffmpeg")


def _one_line(e: object) -> str:
    text = str(e).strip().splitlines()
    return text[-1].strip() if text else type(e).__name__


def _downmix(block: np.ndarray) -> np.ndarray:
    return block.mean(axis=1, dtype=np.float32) if block.ndim == 2 else block.astype(np.float32, copy=False)


def iter_audio(path: str | os.PathLike, block_seconds: float = _BLOCK_SECONDS) -> Iterator[np.ndarray]:
    """Yields the file as 16 kHz mono float32 blocks (roughly `block_seconds` long each)."""
    info = probe(path)
    if info.decoder == "soundfile":
        yield from _iter_soundfile(info, block_seconds)
    else:
        yield from _iter_ffmpeg(info, block_seconds)


def _iter_soundfile(info: AudioInfo, block_seconds: float) -> Iterator[np.ndarray]:
    import soundfile as sf

    resampler = Resampler(info.sample_rate)
    total = 0
    try:
        with sf.SoundFile(info.path) as f:
            blocksize = max(1, int(block_seconds * info.sample_rate))
            while True:
                block = f.read(blocksize, dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                total += block.shape[0]
                out = resampler.process(_downmix(block))
                if out.size:
                    yield out
    except sf.LibsndfileError as e:
        raise AudioError(f"{info.path}: corrupt or truncated audio ({_one_line(e)})") from None
    tail = resampler.flush(total)
    if tail.size:
        yield tail


def _iter_ffmpeg(info: AudioInfo, block_seconds: float) -> Iterator[np.ndarray]:
    cmd = [_ffmpeg(), "-nostdin", "-v", "error", "-i", info.path, "-f", "f32le", "-ac", "1", "-ar", str(SAMPLE_RATE), "-"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # stderr is drained by a thread while stdout is read: a damaged file can make ffmpeg write more errors than
    # a pipe holds (64 KiB), and ffmpeg would then block on stderr while we block on stdout.
    err_chunks: list[bytes] = []
    drain = threading.Thread(target=lambda: err_chunks.extend(iter(lambda: proc.stderr.read(65536), b"")),
                             daemon=True)
    drain.start()
    nbytes = int(block_seconds * SAMPLE_RATE) * 4
    try:
        while True:
            data = proc.stdout.read(nbytes)
            if not data:
                break
            usable = len(data) - len(data) % 4
            yield np.frombuffer(data[:usable], dtype="<f4").astype(np.float32)
        code = proc.wait()
        drain.join()
        if code != 0:
            err = b"".join(err_chunks).decode(errors="replace")
            raise AudioError(f"{info.path}: ffmpeg failed to decode it ({_one_line(err)})")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def load_audio(path: str | os.PathLike) -> np.ndarray:
    """The whole file as 16 kHz mono float32 (for short files; transcription streams it through features.LogMel)."""
    blocks = list(iter_audio(path))
    audio = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    if audio.size == 0:
        raise AudioError(f"{path}: contains no audio samples (zero length)")
    if not np.isfinite(audio).all():
        raise AudioError(f"{path}: contains invalid sample values (NaN or infinity)")
    return audio
