"""Evaluation helpers: real recorded speech with reference transcripts, and word error rate.

Used by the model verification (model.py), the tests and benchmarks/whisper.py; nothing here is needed to
transcribe.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
import wave

import numpy as np
from pathlib import Path

from .features import SAMPLE_RATE
from .model import ModelFetchError, _pip_download, cache_root

# Real recorded 16 kHz speech with transcripts, in the sdist's test data (BSD-2-Clause).
SPEECH_PACKAGE = "pocketsphinx==5.1.1"
# goforward.raw has no transcript file; this is the hypothesis pocketsphinx's own unit tests assert.
GOFORWARD_TEXT = "go forward ten meters"
# Whisper writes small numbers as digits or words at random ("10 of clubs", "Seven of clubs"), the references
# spell them out: `digits` maps both sides to digits so that this does not swamp the WER of short utterances.
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}


def load_wav_16k(path: str | Path):
    import numpy as np

    with wave.open(str(path), "rb") as w:
        if w.getframerate() != SAMPLE_RATE or w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ModelFetchError(f"{path} is not 16 kHz mono 16-bit PCM")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def normalize_text(text: str) -> str:
    """Lowercase, drop punctuation, collapse spaces; 'mr' and 'mister' compare equal."""
    words = re.sub(r"[^\w\s']", " ", text.lower()).replace("'", "").split()
    return " ".join({"mr": "mister", "mrs": "missus"}.get(w, w) for w in words)


def word_error_rate(reference: str, hypothesis: str) -> float:
    ref, hyp = normalize_text(reference).split(), normalize_text(hypothesis).split()
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(len(ref), 1)


def digits(text: str) -> str:
    """normalize_text, then number words as digits."""
    return " ".join(NUMBER_WORDS.get(w, w) for w in normalize_text(text).split())


def corpus_wer(pairs, norm=digits) -> float:
    """Corpus WER of (reference, hypothesis) pairs: word errors summed over utterances / reference words."""
    pairs = [(norm(ref), norm(hyp)) for ref, hyp in pairs]
    words = [len(ref.split()) for ref, _ in pairs]
    errors = sum(word_error_rate(ref, hyp) * n for (ref, hyp), n in zip(pairs, words))
    return errors / max(sum(words), 1)


def fetch_speech_samples(cache_dir: str | Path | None = None) -> list[tuple[Path, str]]:
    """Real recorded 16 kHz mono speech with reference transcripts, from the pocketsphinx 5.1.1 sdist test data.

    Returns (wav path, transcript) for the 5 LibriVox "Sense and Sensibility" sentences, "go forward ten
    meters" and the 5 "cards" utterances (about 38 s, 11 utterances). Downloaded once (34 MB sdist) into
    <cache>/speech/.
    """
    speech = cache_root(cache_dir) / "speech" / "pocketsphinx-5.1.1"
    index = speech / "samples.json"
    if not index.is_file():
        speech.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".tmp-", dir=speech.parent) as tmp:
            tmp = Path(tmp)
            sdist = _pip_download([SPEECH_PACKAGE], tmp / "dl", sdist=True)[0]
            out = tmp / "samples"
            out.mkdir()
            samples = _extract_speech(sdist, out)
            (out / "samples.json").write_text(json.dumps([[p, t] for p, t in samples], indent=1) + "\n")
            if speech.exists():
                shutil.rmtree(speech)
            os.replace(out, speech)
    return [(speech / p, text) for p, text in json.loads(index.read_text())]


def _extract_speech(sdist: Path, out: Path) -> list[tuple[str, str]]:
    files: dict[str, bytes] = {}
    with tarfile.open(sdist) as tf:
        for m in tf.getmembers():
            parts = m.name.split("/")
            if not m.isfile() or len(parts) < 2:
                continue
            rel = "/".join(parts[1:])
            if (rel.startswith("test/data/librivox/") and rel.endswith((".wav", ".txt"))) or \
                    rel.startswith("test/data/cards/") or rel in ("test/data/goforward.raw", "LICENSE"):
                with tf.extractfile(m) as f:
                    files[rel] = f.read()
    if "LICENSE" in files:
        (out / "LICENSE.pocketsphinx").write_bytes(files["LICENSE"])
    samples: list[tuple[str, str]] = []
    for rel in sorted(r for r in files if r.startswith("test/data/librivox/") and r.endswith(".wav")):
        name = Path(rel).name
        (out / name).write_bytes(files[rel])
        samples.append((name, files[rel[:-4] + ".txt"].decode().strip()))
    if "test/data/goforward.raw" in files:  # headerless 16 kHz s16le -> wav
        with wave.open(str(out / "goforward.wav"), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(SAMPLE_RATE)
            w.writeframes(files["test/data/goforward.raw"])
        samples.append(("goforward.wav", GOFORWARD_TEXT))
    transcription = files.get("test/data/cards/cards.transcription", b"").decode()
    for line in transcription.splitlines():
        m = re.match(r"\s*<s>(.*)</s>\s*\((\w+)\)", line)
        if m and f"test/data/cards/{m.group(2)}.wav" in files:
            name = f"cards_{m.group(2)}.wav"
            (out / name).write_bytes(files[f"test/data/cards/{m.group(2)}.wav"])
            samples.append((name, " ".join(m.group(1).split())))
    if len(samples) < 6:
        raise ModelFetchError(f"{sdist.name}: expected LibriVox and cards test recordings, found {len(samples)}")
    return samples


def espeak_word_clip(words: list[str], gaps: list[float] | None = None, *, voice: str = "en-us", speed: int = 150,
                     lead: float = 0.5) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """Speech with known word boundaries: each word synthesised on its own by espeak-ng (a system program,
    `apt-get install espeak-ng`), trimmed to where its signal is above 1% of its peak, and joined with the given
    silences (default 0.15-0.45 s, varied). Returns (16 kHz audio, [(word, start s, end s)])."""
    import shutil
    import subprocess
    import tempfile

    from .audio import resample

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("espeak-ng is not installed (apt-get install espeak-ng)")
    if gaps is None:
        gaps = [0.15 + 0.3 * ((i * 7) % 5) / 4 for i in range(len(words))]
    sr = 16_000
    parts = [np.zeros(int(lead * sr), np.float32)]
    bounds, t = [], lead
    with tempfile.TemporaryDirectory() as tmp:
        for i, word in enumerate(words):
            path = Path(tmp) / f"{i}.wav"
            subprocess.run([exe, "-v", voice, "-s", str(speed), "-w", str(path), word], check=True,
                           capture_output=True, timeout=60)
            import soundfile as sf

            audio, rate = sf.read(str(path), dtype="float32")
            audio = resample(audio, rate, sr) if rate != sr else audio
            loud = np.nonzero(np.abs(audio) > 0.01 * np.abs(audio).max())[0]
            audio = audio[loud[0]:loud[-1] + 1]
            bounds.append((word, t, t + audio.size / sr))
            parts.append(audio)
            gap = gaps[i] if i < len(gaps) else 0.3
            parts.append(np.zeros(int(round(gap * sr)), np.float32))
            t += audio.size / sr + int(round(gap * sr)) / sr
    parts.append(np.zeros(int(lead * sr), np.float32))
    return np.concatenate(parts), bounds


def word_timing_errors(reference: list[tuple[str, float, float]], words) -> tuple[list[float], int]:
    """|start - reference start| and |end - reference end| of the hypothesis words matched to the reference in
    order by their normalised text (words that do not match are skipped); returns (errors, matched words)."""
    import difflib

    def norm(w: str) -> str:
        return re.sub(r"[^a-z0-9']", "", w.lower())

    ref = [norm(w) for w, _, _ in reference]
    hyp = [norm(w.word) for w in words]
    errors, matched = [], 0
    for block in difflib.SequenceMatcher(a=ref, b=hyp, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            _, s, e = reference[block.a + k]
            w = words[block.b + k]
            errors += [abs(w.start - s), abs(w.end - e)]
            matched += 1
    return errors, matched
