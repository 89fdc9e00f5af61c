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

from onnxruntime_ep_xdna.whisper import features as F  # noqa: E402
from onnxruntime_ep_xdna.whisper import rules as R  # noqa: E402
from onnxruntime_ep_xdna.whisper import search as S  # noqa: E402
from onnxruntime_ep_xdna.whisper.cli import main as cli_main, sample_path  # noqa: E402
from onnxruntime_ep_xdna.whisper.evaluation import word_error_rate  # noqa: E402
from onnxruntime_ep_xdna.whisper.model import make_tiny_random_whisper  # noqa: E402
from onnxruntime_ep_xdna.whisper.onnx_model import WhisperOnnx  # noqa: E402
from onnxruntime_ep_xdna.whisper.options import TranscriptionOptions  # noqa: E402
from onnxruntime_ep_xdna.whisper.transcribe import transcribe, transcribe_all  # noqa: E402

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


# ---- `xdna transcribe`'s decoding on the ONNX sessions -------------------------------------------------------------


def onnx_rules(w, timestamps):
    """transformers' generate() filters (model suppress list, blank + <|endoftext|> at the start, timestamp rules)
    without OpenAI's extra control-token suppression, so both decode the same distribution."""
    return R.LogitRules(np.array(w.model_suppress, np.int64), np.array([w.tokens.blank, w.tokens.eot], np.int64),
                        timestamps, w.tokens.timestamp_begin, w.tokens.eot, w.tokens.no_timestamps, 50)


def greedy(w, window, prompt, sample_begin, rules, max_new_tokens):
    opt = TranscriptionOptions(beam_size=1, sample_len=max_new_tokens)
    return S.decode_window(w, window, prompt, sample_begin, rules, opt, 0.0, np.random.default_rng(0))


def test_greedy_matches_optimum_generate(tiny_multilingual):
    """Same greedy tokens as optimum's generate() on the CPU EP (exact arithmetic on both sides)."""
    import torch
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq

    w = WhisperOnnx(tiny_multilingual, "cpu")
    reference = ORTModelForSpeechSeq2Seq.from_pretrained(tiny_multilingual, provider="CPUExecutionProvider")
    for seed in range(3):
        mel = F.from_array(chirp(3.0, seed), w.n_mels, w.mel_filters).window(0)
        prompt, begin = R.build_prompt(w.tokens, "en", "transcribe", without_timestamps=True)
        decoded = greedy(w, w.encode(mel), prompt, begin, onnx_rules(w, False), 12)
        expected = reference.generate(torch.from_numpy(mel), language="en", task="transcribe", max_new_tokens=12,
                                      return_timestamps=False)[0].tolist()
        if expected[: len(prompt)] == prompt:  # transformers returns the tokens with or without the prompt
            expected = expected[len(prompt):]
        generated = [t for t in expected if t != w.tokens.eot]
        assert decoded.tokens == generated


def brute_force_beam_search(w, encoded, prompt, rules, beam_size, patience, length_penalty, sample_len):
    """OpenAI's beam search written the plain way: every candidate re-run from scratch through decoder_model.onnx
    (batch 1, no cache, no reordering); finished sequences collected until round(beam_size * patience)."""
    def logprobs(seq):
        feed = {"input_ids": np.array([seq], np.int64), "encoder_hidden_states": encoded}
        if w._logits_rows:  # the decoder copy computes the logits of the rows asked for (decoder_graph pass 3)
            feed[w._logits_rows] = np.arange(len(seq), dtype=np.int64)
        out = w.decoder.run(None, feed)[0]
        return out[0, -1]

    beams = [(tuple(prompt), 0.0)]
    finished = {}
    for i in range(sample_len):
        candidates = {}
        for seq, score in beams:
            row = np.array(logprobs(list(seq)), np.float32)
            rules.apply(row, list(seq[len(prompt):]), i)
            lp = row - np.log(np.exp(row - row.max()).sum()) - row.max()
            for t in np.argsort(-lp, kind="stable")[: beam_size + 1]:
                candidates[seq + (int(t),)] = score + float(lp[t])
        ranked = sorted(candidates.items(), key=lambda kv: kv[1], reverse=True)
        beams = [kv for kv in ranked if kv[0][-1] != w.tokens.eot][:beam_size]
        for seq, score in [kv for kv in ranked if kv[0][-1] == w.tokens.eot]:
            if len(finished) < round(beam_size * patience):
                finished[seq] = score
        if len(finished) >= round(beam_size * patience):
            break
    for seq, score in sorted(beams, key=lambda kv: kv[1], reverse=True):
        if len(finished) >= beam_size:
            break
        finished[seq + (w.tokens.eot,)] = score
    def ranked_score(item):
        n = len(item[0]) - len(prompt) - 1
        return item[1] / (n if length_penalty is None else ((5 + n) / 6) ** length_penalty)
    best = max(finished.items(), key=ranked_score)
    return list(best[0][len(prompt):-1]), best[1]


@pytest.mark.parametrize("beam_size,patience,length_penalty,timestamps", [
    (5, 1.0, None, True), (3, 2.0, 0.6, False), (4, 0.5, None, True)])
def test_beam_search_equals_brute_force(tiny_multilingual, beam_size, patience, length_penalty, timestamps):
    """Batched beam search (one decoder_with_past call per step for all beams, cache reordered by beam, cross-
    attention K/V shared at batch 1) finds the same best sequence with the same score as the brute-force search."""
    w = WhisperOnnx(tiny_multilingual, "cpu")
    rules = onnx_rules(w, timestamps)
    opt = TranscriptionOptions(beam_size=beam_size, patience=patience, length_penalty=length_penalty, sample_len=10)
    for seed in range(2):
        mel = F.from_array(chirp(3.0, seed + 7), w.n_mels, w.mel_filters).window(0)
        window = w.encode(mel)
        prompt, begin = R.build_prompt(w.tokens, "en", "transcribe", without_timestamps=not timestamps)
        result = S.decode_window(w, window, prompt, begin, rules, opt, 0.0, np.random.default_rng(0))
        encoded = window.encoded.numpy()
        tokens, score = brute_force_beam_search(w, encoded, prompt, rules, beam_size, patience, length_penalty, 10)
        assert result.tokens == tokens
        assert result.sum_logprob == pytest.approx(score, abs=1e-4)
        assert window.timings["decoder_steps"] <= 10  # one batched call per step, not one per beam


def test_beam_search_on_the_xdna_ep_shares_the_cross_attention(tiny_multilingual):
    """On the XDNA EP the beams' decoder step broadcasts the batch-1 cross-attention K/V (no copy per beam)."""
    w = WhisperOnnx(tiny_multilingual, "xdna")
    mel = F.from_array(chirp(2.0, 3), w.n_mels, w.mel_filters).window(0)
    window = w.encode(mel)
    prompt, begin = R.build_prompt(w.tokens, "en", "transcribe", without_timestamps=False)
    result = S.decode_window(w, window, prompt, begin, onnx_rules(w, True), TranscriptionOptions(sample_len=6), 0.0,
                             np.random.default_rng(0))
    assert all(v.shape()[0] == 1 for v in window.cross.values()) and len(result.tokens) >= 1


def test_second_prompt_reuses_the_cross_attention(tiny_multilingual):
    """A retry (fallback) or the prompt after language detection runs through decoder_with_past on the cached
    cross-attention K/V and gives decoder_model's logits."""
    w = WhisperOnnx(tiny_multilingual, "cpu")
    mel = F.from_array(chirp(2.0, 4), w.n_mels, w.mel_filters).window(0)
    prompt, _ = R.build_prompt(w.tokens, "en", "transcribe", without_timestamps=False)
    first, _ = w.start(w.encode(mel), prompt)
    window = w.encode(mel)
    w.start(window, [w.tokens.sot])
    again, _ = w.start(window, prompt)
    np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-5)


def test_detected_language_is_used(tiny_multilingual):
    w = WhisperOnnx(tiny_multilingual, "cpu")
    audio = chirp(2.0, seed=4)
    segments, info = transcribe(audio, w, beam_size=1, sample_len=8)
    list(segments)
    assert info.language in w.lang_to_id and 0 < info.language_probability <= 1
    assert info.all_language_probs[0] == (info.language, info.language_probability)
    assert info.options.language == info.language
    given, _ = transcribe(audio, w, beam_size=1, sample_len=8, language=info.language)
    assert [s.text for s in given] == [s.text for s in transcribe(audio, w, beam_size=1, sample_len=8)[0]]


def test_concurrent_transcriptions_on_one_model(tiny_en):
    """What a server does: several transcriptions at once on one loaded model give each its sequential result."""
    from concurrent.futures import ThreadPoolExecutor

    w = WhisperOnnx(tiny_en, "xdna")
    clips = [chirp(3.0, seed) for seed in range(4)]
    expected = [transcribe_all(c, w, beam_size=2, sample_len=12).text for c in clips]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: transcribe_all(c, w, beam_size=2, sample_len=12).text, clips))
    assert got == expected


def test_long_audio_is_cut_into_windows(tiny_en):
    w = WhisperOnnx(tiny_en, "xdna")
    seen = []
    r = transcribe_all(chirp(65.0, seed=3), w, beam_size=1, sample_len=16, temperature=0,
                       progress=lambda done, total: seen.append((done, total)))
    assert r.timings["windows"] >= 3  # 65 s needs at least three 30 s windows
    assert r.duration == pytest.approx(65.0)
    assert seen[-1] == (pytest.approx(65.0), pytest.approx(65.0))
    starts = [s.start for s in r.segments]
    assert starts == sorted(starts) and all(0 <= s.start <= s.end <= 65.0 + 1e-6 for s in r.segments)


# ---- features: OpenAI's own log_mel_spectrogram on real speech ------------------------------------------------------


@pytest.fixture(scope="session")
def openai_audio_module(tmp_path_factory):
    """openai-whisper's whisper/audio.py (+ utils.py, mel_filters.npz) from its PyPI sdist, imported as is (it needs
    only numpy and torch; the package itself would pull numba and tiktoken)."""
    import importlib
    import tarfile

    from onnxruntime_ep_xdna.whisper import model as wmodel

    root = tmp_path_factory.mktemp("openai")
    try:
        sdist = wmodel._pip_download([wmodel.NORMALIZER_PACKAGE], root / "dl", sdist=True)[0]
    except Exception as e:  # no network and nothing in pip's cache
        pytest.skip(f"openai-whisper sdist not available: {e}")
    pkg = root / "openai_whisper_ref"
    (pkg / "assets").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    with tarfile.open(sdist) as tf:
        for m in tf.getmembers():
            for name in ("whisper/audio.py", "whisper/utils.py", "whisper/assets/mel_filters.npz"):
                if m.name.endswith(name):
                    (pkg / name.removeprefix("whisper/")).write_bytes(tf.extractfile(m).read())
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("openai_whisper_ref.audio")
    finally:
        sys.path.remove(str(root))


# Our STFT runs in float64 (numpy), OpenAI's in float32 (torch): on this speech the normalised log-mel agreed to
# 1.7e-5 (mean 1.3e-7) when measured; the bound is 1e-4 (0.0004 log10 units, i.e. 0.004 dB).
FEATURE_TOLERANCE = 1e-4


def test_features_match_openai_log_mel_on_real_speech(openai_audio_module):
    import torch

    from onnxruntime_ep_xdna.whisper.evaluation import fetch_speech_samples, load_wav_16k

    samples = fetch_speech_samples()
    audio = np.concatenate([load_wav_16k(p) for p, _ in samples] * 2)  # ~76 s: three windows
    ref = openai_audio_module.log_mel_spectrogram(torch.from_numpy(audio), 80, padding=F.N_SAMPLES).numpy()
    content = audio.size // F.HOP_LENGTH
    assert ref.shape[1] == content + F.N_FRAMES
    ours = F.log_mel_spectrogram(audio, 80)
    assert ours.shape == (80, content)
    assert np.abs(ours - ref[:, :content]).max() < FEATURE_TOLERANCE
    np.testing.assert_allclose(F.mel_filter_bank(80).T, openai_audio_module.mel_filters("cpu", 80).numpy(), atol=1e-6)
    # The windows transcribe() feeds the encoder: OpenAI's mel[:, seek:seek+size] then pad_or_trim (0.0 in mel
    # space), from a file read in blocks and (with a small keep budget) computed in a second pass.
    path = write_wav_float(Path(openai_audio_module.__file__).parent / "speech.wav", audio)
    ref16 = openai_audio_module.log_mel_spectrogram(torch.from_numpy(load_pcm16(path)), 80, padding=F.N_SAMPLES)
    ref16 = ref16.numpy()
    mel = F.LogMel(80, F.mel_filter_bank(80), lambda: __import__("onnxruntime_ep_xdna.whisper.audio",
                   fromlist=["iter_audio"]).iter_audio(path, block_seconds=7.3), keep_seconds=20)
    for seek in (0, 2345, content - 1000):
        size = min(F.N_FRAMES, content - seek)
        expected = openai_audio_module.pad_or_trim(torch.from_numpy(ref16[:, seek:seek + size]), F.N_FRAMES).numpy()
        got = mel.window(seek, size)[0]
        assert np.abs(got - expected).max() < FEATURE_TOLERANCE, seek
        assert (got[:, size:] == 0.0).all()


def write_wav_float(path: Path, audio: np.ndarray) -> Path:
    pcm = np.round(np.clip(audio, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(SR)
        f.writeframes(pcm.tobytes())
    return path


def load_pcm16(path: Path) -> np.ndarray:
    import soundfile as sf

    return sf.read(str(path), dtype="float32")[0]


# ---- `xdna transcribe` as a user runs it ------------------------------------------------------------------------


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxruntime_ep_xdna.cli", "transcribe", *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.mark.parametrize("fmt", ["txt", "srt", "vtt", "tsv", "json"])
def test_cli_formats(tiny_en, tmp_path, fmt):
    wav = write_wav(tmp_path / "speechlike.wav", chirp(3.0))
    proc = run_cli("--model", tiny_en, "--format", fmt, "-o", tmp_path / "out", wav)  # the default decoding
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "RTF" in proc.stderr and "provider XDNAExecutionProvider" in proc.stderr
    text = (tmp_path / "out" / f"speechlike.{fmt}").read_text()
    if fmt == "json":
        doc = json.loads(text)
        assert doc["duration"] == pytest.approx(3.0) and doc["language"] == "en"
    elif fmt == "vtt":
        assert text.startswith("WEBVTT")
    elif fmt == "tsv":
        assert text.splitlines()[0] == "start\tend\ttext"
        assert all(len(line.split("\t")) == 3 and line.split("\t")[0].isdigit() for line in text.splitlines()[1:])


FAST = ("--beam-size", "1", "--temperature-increment-on-fallback", "none")  # decoding itself is not under test


def test_cli_format_all_writes_every_format_and_needs_a_directory(tiny_en, tmp_path):
    wav = write_wav(tmp_path / "a.wav", chirp(2.0))
    proc = run_cli("--model", tiny_en, *FAST, "--format", "all", "-o", tmp_path / "out", wav)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.suffix for p in (tmp_path / "out").iterdir()) == [".json", ".srt", ".tsv", ".txt", ".vtt"]
    proc = run_cli("--model", tiny_en, "--format", "all", wav)
    assert proc.returncode == 1 and "-o DIR" in proc.stderr


def test_cli_json_of_several_files_is_one_valid_document(tiny_en, tmp_path):
    a, b = write_wav(tmp_path / "a.wav", chirp(2.0, 1)), write_wav(tmp_path / "b.wav", chirp(1.5, 2))
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    proc = run_cli("--model", tiny_en, *FAST, "--format", "json", a, bad, b)
    assert proc.returncode == 2, proc.stderr
    docs = json.loads(proc.stdout)  # one array, not concatenated documents
    assert [Path(d["file"]).name for d in docs] == ["bad.wav", "a.wav", "b.wav"]
    assert "error" in docs[0] and docs[1]["duration"] == pytest.approx(2.0) and docs[2]["duration"] == pytest.approx(1.5)


def test_cli_unwritable_output_fails_that_file_only(tiny_en, tmp_path):
    a, b = write_wav(tmp_path / "a.wav", chirp(2.0, 1)), write_wav(tmp_path / "b.wav", chirp(1.5, 2))
    out = tmp_path / "out"
    (out / "a.txt").mkdir(parents=True)  # a directory where a.txt should go: writing it fails
    proc = run_cli("--model", tiny_en, *FAST, "-o", out, a, b)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert any("a.wav" in line and "cannot write" in line for line in proc.stderr.splitlines()), proc.stderr
    assert (out / "b.txt").is_file()


def test_cli_condition_on_previous_text_over_long_audio(tiny_en, tmp_path):
    wav = write_wav(tmp_path / "long.wav", chirp(45.0, seed=5))
    proc = run_cli("--model", tiny_en, "--beam-size", "2", "--no-condition-on-previous-text", "--format", "json",
                   "--initial-prompt", "hello", wav)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["duration"] == pytest.approx(45.0)


@pytest.mark.parametrize("hidden", ["soundfile", "onnxruntime_ep_xdna.whisper.cli"])
def test_cli_missing_extra_message_whatever_flags(tmp_path, hidden):
    """With the whisper extra (or part of it) missing, any transcribe flags give the install hint and exit 1, the
    status of the main path's model/provider problems (not argparse's 2)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {hidden!r}:\n"
        "            raise ImportError('No module named ' + repr(name))\n"
        "        return None\n"
        "sys.meta_path.insert(0, Hide())\n")
    env = dict(os.environ, PYTHONPATH=str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_ep_xdna.cli", "transcribe", "--beam-size", "3",
                           "--initial-prompt", "hi", "--format", "srt", "x.wav"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stderr
    assert "pip install 'onnxruntime-ep-xdna[whisper]'" in proc.stderr and "Traceback" not in proc.stderr


def test_ffmpeg_errors_are_drained_while_decoding(tmp_path, monkeypatch):
    """An ffmpeg that writes far more than a pipe holds (64 KiB) to stderr before its output must not deadlock:
    the decode ends with the error as a message."""
    from onnxruntime_ep_xdna.whisper import audio as A

    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\nhead -c 400000 /dev/zero | tr '\\0' 'e' >&2\n"
                    "head -c 64000 /dev/zero\necho 'decode error: damaged frame' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(A, "_ffmpeg", lambda: str(fake))
    info = A.AudioInfo(str(tmp_path / "damaged.mp3"), SR, 1, None, "ffmpeg")
    import threading

    outcome = {}

    def run():
        try:
            outcome["blocks"] = list(A._iter_ffmpeg(info, 1.0))
        except A.AudioError as e:
            outcome["error"] = str(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "ffmpeg stderr not drained: decode hung"
    assert "damaged frame" in outcome.get("error", ""), outcome


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
    assert cli_main(["--beam-size", "2", "--hotwords", "x", "whatever.wav"]) == 1
    assert "soundfile not installed: pip install 'onnxruntime-ep-xdna[whisper]'" in capsys.readouterr().err


def test_cli_bad_model_dir_is_a_message(tmp_path):
    wav = write_wav(tmp_path / "a.wav", chirp(1.0))
    proc = run_cli("--model", tmp_path, wav)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error" in proc.stderr


# ---- precision policies (issue 13) ------------------------------------------------------------------------------


def test_precision_policy_names_modes_and_rules():
    from onnxruntime_ep_xdna._precision import NAMED, provider_options

    assert provider_options(None) == {} and provider_options(" ") == {}
    assert provider_options("int8") == {"precision": "int8"}
    # auto: int8 on the emulator (this machine has no NPU), bf16 when the backend is xrt
    assert provider_options("auto") == {"precision": "int8"}
    assert provider_options("mixed") == {"precision_policy": NAMED["mixed"]}
    rules = "bf16:name=*proj_out*;int8:weight=constant"
    assert provider_options(rules) == {"precision_policy": rules}
    with pytest.raises(ValueError, match="bad precision policy 'fp4'"):
        provider_options("fp4")
    with pytest.raises(ValueError, match="bad rule 'int8:weight=often'"):  # checked as the EP does
        provider_options("bf16:op=Conv;int8:weight=often")


def test_precision_reaches_every_session_of_the_model(tiny_multilingual):
    """The policy is a provider option of the encoder and both decoders: int8 changes their numbers (within the
    int8 contract), bf16x3 brings them closer to the CPU EP's fp32 than bf16 does."""
    mel = F.log_mel_spectrogram(chirp(2.0), 80)[None, :, :]
    mel = np.pad(mel, ((0, 0), (0, 0), (0, 3000 - mel.shape[-1])))
    outs = {}
    for provider, precision in (("cpu", None), ("xdna", None), ("xdna", "int8"), ("xdna", "bf16x3"),
                                ("xdna", "bf16:op=Conv;int8:weight=constant")):
        w = WhisperOnnx(tiny_multilingual, provider, precision=precision)
        window = w.encode(mel.astype(np.float32))
        logits, _ = w.start(window, [w.tokens.sot])
        outs[(provider, precision)] = (window.encoded.numpy(), logits)
    (enc32, log32), (enc16, log16) = outs[("cpu", None)], outs[("xdna", None)]
    err = {k: (np.abs(e - enc32).max(), np.abs(lg - log32).max()) for k, (e, lg) in outs.items()}
    assert not np.array_equal(outs[("xdna", "int8")][0], enc16)  # the encoder's products ran in int8
    assert not np.array_equal(outs[("xdna", "int8")][1], log16)  # and the decoder's
    assert err[("xdna", "bf16x3")][0] < err[("xdna", None)][0] / 10, err
    assert err[("xdna", "bf16x3")][1] < err[("xdna", None)][1] / 10, err
    mixed = outs[("xdna", "bf16:op=Conv;int8:weight=constant")][0]
    assert not np.array_equal(mixed, enc16) and not np.array_equal(mixed, outs[("xdna", "int8")][0])


def test_cli_precision_option(tiny_en, tmp_path):
    wav = write_wav(tmp_path / "speechlike.wav", chirp(2.0))
    proc = run_cli("--model", tiny_en, *FAST, "--precision", "mixed", wav)
    assert proc.returncode == 0, proc.stderr
    assert "on XDNAExecutionProvider, precision mixed (bf16:name=*proj_out*;int8:weight=constant)" in proc.stderr
    proc = run_cli("--model", tiny_en, *FAST, "--precision", "int8:weight=sometimes", wav)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--precision: bad rule 'int8:weight=sometimes' in precision_policy" in proc.stderr
    proc = run_cli("--model", tiny_en, *FAST, "--provider", "cpu", "--precision", "bf16x3", wav)
    assert proc.returncode == 0 and "--precision bf16x3 applies to the XDNA EP only" in proc.stderr
    from onnxruntime_ep_xdna._precision import DEFAULT

    proc = run_cli("--model", tiny_en, *FAST, wav)  # the default policy, said where the model is loaded
    assert proc.returncode == 0 and f"on XDNAExecutionProvider, precision {DEFAULT} (int8)" in proc.stderr


def test_serve_and_batch_take_the_precision_option(tiny_en, tmp_path):
    from onnxruntime_ep_xdna.batch import run_batch
    from onnxruntime_ep_xdna.cli import build_parser

    for command in (["serve"], ["batch", "-o", str(tmp_path / "o"), "x.wav"], ["transcribe"]):
        assert build_parser().parse_args([*command, "--precision", "int8"]).precision == "int8"
    wav = write_wav(tmp_path / "a.wav", chirp(1.0))
    fast = TranscriptionOptions(beam_size=1, temperature=(0.0,), sample_len=8, language="en")
    summary = run_batch([str(wav)], tmp_path / "out", model=str(tiny_en), provider="xdna", precision="bf16x3",
                        options=fast)
    assert summary.done == 1, summary
    summary = run_batch([str(wav)], tmp_path / "out2", model=str(tiny_en), provider="xdna", precision="int8:x=y",
                        options=fast)
    assert summary.exit_code == 1 and "bad rule 'int8:x=y'" in summary.message, summary


# ---- the real model -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def whisper_base() -> Path:
    if os.environ.get("XDNA_SKIP_REAL_MODEL"):
        pytest.skip("XDNA_SKIP_REAL_MODEL is set")
    from onnxruntime_ep_xdna.whisper.model import ensure_model

    return ensure_model("base", log=lambda m: print(m, file=sys.stderr))


SAMPLE_TEXT = ("and mister john dashwood had then leisure to consider how much there might be prudently in his "
               "power to do for them")


def test_real_whisper_base_transcribes_the_sample_on_the_ep(whisper_base):
    w = WhisperOnnx(whisper_base, "xdna")
    result = transcribe_all(sample_path(), w)  # the defaults: beam 5, fallback, timestamps
    assert result.language == "en"
    assert word_error_rate(SAMPLE_TEXT, result.text) <= 0.1, result.text
    assert result.segments and result.segments[0].start <= 1.0 and result.segments[-1].end <= result.duration
    placed = xdna.placement(w.encoder)
    if "encoder_model.onnx" in w.compiled_paths:  # compiled for the EP (the default): every MatMul is in EPContext nodes
        assert placed.count(EP, ("EPContext",)) >= 1 and placed.count("CPUExecutionProvider", ("MatMul",)) == 0
        assert matmul_count(w.compiled_paths["encoder_model.onnx"]) == 0
    else:
        assert placed.count(EP, ("MatMul",)) == matmul_count(whisper_base / "encoder_model.onnx")


def test_real_whisper_base_bf16_cross_kv_gives_the_same_tokens_and_scores(whisper_base, monkeypatch):
    """The cross-attention K/V kept in bf16 (decoder_graph pass 3) feed the EP's fused attention the values it
    rounded them to itself: the same tokens and the same log-probabilities, beam 5 and greedy, as with fp32 K/V."""
    monkeypatch.setenv("XDNA_BF16_CROSS_KV", "0")
    fp32 = WhisperOnnx(whisper_base, "xdna", precision="int8")
    monkeypatch.delenv("XDNA_BF16_CROSS_KV")
    bf16 = WhisperOnnx(whisper_base, "xdna", precision="int8")
    assert bf16.bf16_cross_kv and not fp32.bf16_cross_kv
    for beams in (5, 1):
        a, b = (transcribe_all(sample_path(), w, language="en", beam_size=beams) for w in (fp32, bf16))
        assert [s.tokens for s in a.segments] == [s.tokens for s in b.segments]
        assert [s.avg_logprob for s in a.segments] == [s.avg_logprob for s in b.segments]
        assert word_error_rate(SAMPLE_TEXT, b.text) <= 0.1, b.text


def test_real_whisper_base_bf16_self_kv_gives_the_same_tokens_scores_and_times(whisper_base, monkeypatch):
    """The self-attention cache kept in bf16 (decoder_graph pass 7) is read through by the EP's MatMuls, which round
    a run-time B to those very values: the same tokens, log-probabilities and timestamps, beam 5 and greedy."""
    monkeypatch.setenv("XDNA_BF16_SELF_KV", "0")
    fp32 = WhisperOnnx(whisper_base, "xdna", precision="int8")
    monkeypatch.delenv("XDNA_BF16_SELF_KV")
    bf16 = WhisperOnnx(whisper_base, "xdna", precision="int8")
    assert bf16.bf16_self_kv and not fp32.bf16_self_kv
    for beams in (5, 1):
        a, b = (transcribe_all(sample_path(), w, language="en", beam_size=beams) for w in (fp32, bf16))
        assert [(s.tokens, s.avg_logprob, s.start, s.end) for s in a.segments] == \
            [(s.tokens, s.avg_logprob, s.start, s.end) for s in b.segments]


def test_real_whisper_base_batched_search_equals_the_plain_search(whisper_base, monkeypatch):
    """On real speech and whisper-base's real logits, search.py's batched step gives the candidates, sum
    log-probs (bit for bit) and results of the plain row-by-row loop (tests/search_reference.py): the 29 s
    clip of benchmarks/whisper.py with beam 5 and greedy, the bundled sample without timestamps and with the
    temperature fallback forced (best-of sampling from the same seed)."""
    import search_reference
    from onnxruntime_ep_xdna.whisper.evaluation import fetch_speech_samples, load_wav_16k

    utterances = {p.stem: p for p, _ in fetch_speech_samples()}
    stems = [f"sense_and_sensibility_01_austen_64kb-{n}" for n in ("0870", "0880", "0890", "0920", "0930")]
    gap = np.zeros(SR * 3 // 10, np.float32)
    clip = np.concatenate([x for s in stems + ["goforward"] for x in (load_wav_16k(utterances[s]), gap)][:-1])
    w = WhisperOnnx(whisper_base, "xdna")
    runs = [(clip, dict(beam_size=5)), (clip, dict(beam_size=1)),
            (sample_path(), dict(beam_size=5, without_timestamps=True)),
            (sample_path(), dict(beam_size=1, best_of=3, log_prob_threshold=0.0, no_speech_threshold=None,
                                 temperature=(0.0, 0.4, 1.0), seed=5))]
    for audio, options in runs:
        batched, plain = search_reference.batched_and_plain(
            monkeypatch, lambda: transcribe_all(audio, w, language="en", **options))
        assert len(batched) >= 2 and batched == plain, options


def test_real_whisper_base_xdna_and_cpu_transcripts_agree(whisper_base):
    """The EP changes the arithmetic (bf16 operands), not the loop: on real speech both EPs give the same text."""
    texts = {p: transcribe_all(sample_path(), WhisperOnnx(whisper_base, p), beam_size=1).text for p in ("cpu", "xdna")}
    assert texts["xdna"] == texts["cpu"]
    assert word_error_rate(SAMPLE_TEXT, texts["cpu"]) <= 0.1, texts["cpu"]


def test_real_whisper_base_quiet_recording_is_not_dropped(whisper_base):
    """The sample at a peak of -61 dBFS (the old -60 dBFS gate skipped it): whole-file normalisation restores it."""
    import soundfile as sf

    audio = sf.read(str(sample_path()), dtype="float32")[0]
    quiet = audio * (0.0009 / np.abs(audio).max())
    result = transcribe_all(quiet, WhisperOnnx(whisper_base, "xdna"), language="en")
    assert word_error_rate(SAMPLE_TEXT, result.text) <= 0.1, result.text


def test_real_whisper_base_long_form_cut_by_the_token_limit_loses_no_words(whisper_base):
    """~81 s of real speech decoded with a 40-token limit per window (the longest sentence needs ~30), so windows
    stop mid-sentence: with the seek to the last complete segment the transcript keeps every word (same WER as
    without the limit). (A window with no complete segment at all advances 30 s, as in the references; at the
    default 224 tokens that takes a >70 s sentence.)"""
    from onnxruntime_ep_xdna.whisper.evaluation import corpus_wer, fetch_speech_samples, load_wav_16k

    samples = fetch_speech_samples()
    gap = np.zeros(SR * 3 // 10, np.float32)
    audio = np.concatenate([x for p, _ in samples * 2 for x in (load_wav_16k(p), gap)])
    reference = " ".join(t for _, t in samples * 2)
    w = WhisperOnnx(whisper_base, "xdna")
    full = transcribe_all(audio, w, language="en", beam_size=1)
    cut = transcribe_all(audio, w, language="en", beam_size=1, sample_len=40)
    assert cut.timings["windows"] >= full.timings["windows"] + 2  # the limit really cut windows
    wer_full, wer_cut = corpus_wer([(reference, full.text)]), corpus_wer([(reference, cut.text)])
    assert wer_full <= 0.1 and wer_cut <= wer_full + 0.02, (wer_full, wer_cut, cut.text)
    assert len(cut.text.split()) >= len(reference.split()) * 0.95


@pytest.mark.parametrize("graph,minimum", [("encoder_model.onnx", 0.95), ("decoder_model_merged.onnx", 0.95)])
def test_real_whisper_base_matmul_flops_on_the_ep(whisper_base, graph, minimum):
    dims = {"batch_size": 1, "encoder_sequence_length": 1500, "decoder_sequence_length": 4,
            "encoder_sequence_length_out": 1500, "past_decoder_sequence_length": 4}
    report = xdna.partition(whisper_base / graph, run=graph == "encoder_model.onnx", dims=dims)
    assert report.ep_share >= minimum, report.table()
