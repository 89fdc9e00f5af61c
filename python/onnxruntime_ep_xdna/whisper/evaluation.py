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
