"""Whisper's log-mel front end as an ONNX model (whisper/frontend.py): placement, accuracy, transcripts, bad input.

Accuracy is checked elementwise against float64 numpy (numerics.logmel_exact64) and against the numpy front end
(features.log_mel_spectrogram) within numerics.logmel_bound, which is derived from the GEMM bound of the arithmetic
that ran: bf16x3 (2^-14 + (K + 2) 2^-23 relative to |A|.|B|) on the XDNA EP, fp32 on the CPU EP.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import onnxruntime_ep_xdna as xdna
from numerics import bf16x3_eps, fp32_eps, logmel_bound, logmel_exact64

pytest.importorskip("onnx")

from onnxruntime_ep_xdna.whisper import features as F  # noqa: E402
from onnxruntime_ep_xdna.whisper import frontend as FE  # noqa: E402

EP = xdna.EP_NAME
SR = F.SAMPLE_RATE
MEL_K = FE.N_BINS  # K of the mel GEMM


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    from onnxruntime_ep_xdna.whisper.evaluation import fetch_speech_samples, load_wav_16k

    try:
        samples = fetch_speech_samples()
    except Exception as e:  # no network and nothing cached
        pytest.skip(f"pocketsphinx speech samples not available: {e}")
    return np.concatenate([load_wav_16k(p) for p, _ in samples])  # ~38 s of real speech


def square_wave(seconds: float = 3.0, hz: float = 441.0) -> np.ndarray:
    t = np.arange(int(SR * seconds))
    return np.where((t * hz / SR) % 1.0 < 0.5, 1.0, -1.0).astype(np.float32)  # full scale


ADVERSARIAL = {
    "silence": lambda: np.zeros(SR * 2, np.float32),
    "full_scale_square": square_wave,
    # -100 dBFS: most of its mel power above MEL_POWER_FLOOR (1e-10), some clamped; the file's floor decides.
    "very_quiet_noise": lambda: (1e-5 * np.random.default_rng(0).standard_normal(SR * 2)).astype(np.float32),
    "below_the_power_floor": lambda: (1e-6 * np.random.default_rng(0).standard_normal(SR * 2)).astype(np.float32),
    "quiet_chirp": lambda: (3e-5 * np.sin(2 * np.pi * (100 + 2000 * np.arange(SR * 2) / SR) * np.arange(SR * 2) / SR)
                            ).astype(np.float32),
    "shorter_than_the_pad": lambda: np.linspace(-0.5, 0.5, 190, dtype=np.float32),  # 1 frame
    "odd_length": lambda: (0.3 * np.random.default_rng(1).standard_normal(12_345)).astype(np.float32),
}


def run_whole(audio: np.ndarray, provider: str, precision: str | None = FE.EP_PRECISION, n_mels: int = 80):
    sess = FE.frontend_session(FE.build_logmel_model(n_mels), provider, precision)
    log_mel, log10_max = sess.run(None, {"audio": np.asarray(audio, np.float32)})
    return sess, log_mel, float(log10_max)


def check_against_references(audio: np.ndarray, got: np.ndarray, dft_eps: float, mel_eps: float, what: str,
                             n_mels: int = 80):
    """got within logmel_bound of float64 numpy and of the numpy front end; returns the largest error."""
    filters = F.mel_filter_bank(n_mels)
    exact, parts = logmel_exact64(audio, filters)
    bound = logmel_bound(parts, dft_eps, mel_eps)
    assert got.shape == exact.shape, what
    assert np.isfinite(got).all(), what
    err = np.abs(got.astype(np.float64) - exact)
    assert (err <= bound).all(), f"{what}: error {err.max():.3g} above its bound at {np.argmax(err - bound)}"
    numpy_fe = F.log_mel_spectrogram(audio, n_mels, filters)
    bound_ref = logmel_bound(parts, dft_eps, mel_eps, reference_fp32=True)
    assert (np.abs(got - numpy_fe) <= bound_ref).all(), what
    return float(err.max(initial=0.0))


# ---- placement ------------------------------------------------------------------------------------------------


def assert_gemms_on_the_ep(placed):
    """Both GEMMs on the EP; besides them only the Transpose it fuses into the mel MatMul's A; the rest on the CPU."""
    on_ep = set(placed.on(EP))
    assert {("dft", "Conv"), ("mel_bank", "MatMul")} <= on_ep, placed.summary()
    assert on_ep <= {("dft", "Conv"), ("mel_bank", "MatMul"), ("frames_major", "Transpose")}, placed.summary()
    assert placed.count("CPUExecutionProvider") == len(placed.nodes) - len(on_ep)


def test_the_dft_and_the_mel_bank_run_on_the_ep_the_rest_on_the_cpu(tmp_path):
    """Both model variants; and the nodes' precision is bf16x3 (the EP's partition report)."""
    import onnx

    from onnxruntime_ep_xdna._placement import partition

    path = tmp_path / "logmel.onnx"
    onnx.save(FE.build_logmel_model(80), str(path))
    report = partition(path, {"precision": FE.EP_PRECISION}, run=True, dims={"samples": SR})
    gemms = {d.node: d for d in report.decisions}
    assert set(gemms) == {"dft", "mel_bank"}
    for d in gemms.values():
        assert d.placed_on == EP and d.precision == "bf16x3", d
        assert d.executed["precision"] == "bf16x3" and d.executed["device_calls"] >= 1, d.executed
    for whole in (True, False):
        sess = FE.frontend_session(FE.build_logmel_model(80, whole=whole), "xdna", FE.EP_PRECISION)
        placed = xdna.placement(sess)
        assert_gemms_on_the_ep(placed)
        signal = np.random.default_rng(2).standard_normal(SR).astype(np.float32)
        out = sess.run(None, {"audio" if whole else "samples": signal})[0]
        assert out.shape == (80, SR // F.HOP_LENGTH if whole else (SR - F.N_FFT) // F.HOP_LENGTH + 1)


def test_the_model_is_built_from_features_constants():
    model = FE.build_logmel_model(128)
    inits = {i.name: i for i in model.graph.initializer}
    from onnx import numpy_helper

    np.testing.assert_array_equal(numpy_helper.to_array(inits["mel_filters"]), F.mel_filter_bank(128))
    basis = numpy_helper.to_array(inits["dft_basis"])
    assert basis.shape == (2 * FE.N_BINS, 1, F.N_FFT)
    # The basis is the windowed DFT: one frame through it is numpy's rfft of the windowed frame.
    frame = np.random.default_rng(3).standard_normal(F.N_FFT)
    spec = np.fft.rfft(frame * F.hann_window())
    np.testing.assert_allclose(basis[:FE.N_BINS, 0] @ frame, spec.real, atol=1e-4)
    np.testing.assert_allclose(basis[FE.N_BINS:, 0] @ frame, spec.imag, atol=1e-4)
    with pytest.raises(ValueError, match="mel filters of shape"):
        FE.build_logmel_model(80, filters=F.mel_filter_bank(128))


# ---- accuracy -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_cpu_ep_model_matches_numpy_within_the_fp32_bound(name):
    audio = ADVERSARIAL[name]()
    _, got, _ = run_whole(audio, "cpu")
    check_against_references(audio, got, fp32_eps(F.N_FFT), fp32_eps(MEL_K), name)


def test_cpu_ep_model_matches_numpy_on_real_speech(speech):
    _, got, log10_max = run_whole(speech, "cpu")
    check_against_references(speech, got, fp32_eps(F.N_FFT), fp32_eps(MEL_K), "speech")
    assert log10_max == pytest.approx(F.from_array(speech, 80, F.mel_filter_bank(80)).max, abs=1e-4)


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_ep_bf16x3_matches_numpy_within_its_bound(name):
    audio = ADVERSARIAL[name]()
    _, got, _ = run_whole(audio, "xdna")
    worst = check_against_references(audio, got, bf16x3_eps(F.N_FFT), bf16x3_eps(MEL_K), name)
    print(f"{name}: largest |EP bf16x3 - float64| = {worst:.3g}", file=sys.stderr)
    if name == "silence":  # zeros in, zeros out of both GEMMs: only fp32 log10's rounding is left
        assert np.abs(got - (F.SILENT_LOG_MEL + F.NORM_OFFSET) / F.NORM_DIVISOR).max() <= 1e-6


@pytest.mark.parametrize("n_mels", [80, 128])  # 128: large-v3
def test_ep_bf16x3_matches_numpy_on_real_speech(speech, n_mels):
    _, got, _ = run_whole(speech, "xdna", n_mels=n_mels)
    worst = check_against_references(speech, got, bf16x3_eps(F.N_FFT), bf16x3_eps(MEL_K), "speech", n_mels)
    print(f"speech, {n_mels} mels: largest |EP bf16x3 - float64| = {worst:.3g}", file=sys.stderr)


def test_plain_bf16_breaks_the_bf16x3_bound(speech):
    """The bound is not vacuous: the same model with the EP's plain bf16 GEMMs falls outside it."""
    _, got, _ = run_whole(speech, "xdna", precision="bf16")
    exact, parts = logmel_exact64(speech, F.mel_filter_bank(80))
    bound = logmel_bound(parts, bf16x3_eps(F.N_FFT), bf16x3_eps(MEL_K))
    assert (np.abs(got - exact) > bound).any()


def test_streaming_logmel_on_the_ep_front_end(speech):
    """features.LogMel with the EP front end (two passes, odd blocks): the windows transcribe() feeds the encoder
    are the float64 log-mel within the bound of the front end's arithmetic."""
    frontend = FE.EpFrontEnd(80, provider="xdna")  # bf16x3
    eps = (bf16x3_eps(F.N_FFT), bf16x3_eps(MEL_K))
    blocks = [speech[i:i + 7_331] for i in range(0, speech.size, 7_331)]
    mel = F.LogMel(80, F.mel_filter_bank(80), lambda: iter(blocks), keep_seconds=10, frames_log10_mel=frontend)
    exact, parts = logmel_exact64(speech, F.mel_filter_bank(80))
    bound = logmel_bound(parts, *eps)
    content = exact.shape[1]
    for seek in (0, 1234, content - 500):
        size = min(F.N_FRAMES, content - seek)
        got = mel.window(seek, size)[0]
        assert (np.abs(got[:, :size] - exact[:, seek:seek + size]) <= bound[:, seek:seek + size]).all(), seek
        assert (got[:, size:] == 0.0).all()


# ---- transcribe(): option, errors, transcripts ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory):
    pytest.importorskip("optimum.onnxruntime", reason="the whisper extra is not installed")
    from onnxruntime_ep_xdna.whisper.model import make_tiny_random_whisper

    return make_tiny_random_whisper(tmp_path_factory.mktemp("tiny-en-fe"), seed=1, multilingual=False)


def test_bad_input_gives_the_same_errors_on_both_front_ends(tiny_en):
    from onnxruntime_ep_xdna.whisper.audio import AudioError
    from onnxruntime_ep_xdna.whisper.onnx_model import WhisperOnnx
    from onnxruntime_ep_xdna.whisper.options import OptionsError
    from onnxruntime_ep_xdna.whisper.transcribe import transcribe

    w = WhisperOnnx(tiny_en, "cpu")
    bad = {"empty": np.zeros(0, np.float32), "nan": np.array([0.1, np.nan] * 4000, np.float32),
           "inf": np.array([0.1, np.inf] * 4000, np.float32)}
    for name, audio in bad.items():
        messages = []
        for frontend in ("cpu", "ep"):
            with pytest.raises(AudioError) as e:
                transcribe(audio, w, beam_size=1, sample_len=4, frontend=frontend)
            messages.append(str(e.value))
        assert messages[0] == messages[1], name
    with pytest.raises(OptionsError, match="frontend"):
        transcribe(np.zeros(SR, np.float32), w, frontend="gpu")


def test_cli_frontend_ep_runs_end_to_end(tiny_en, tmp_path, capsys):
    from onnxruntime_ep_xdna.whisper.cli import main as cli_main

    audio = (0.3 * np.sin(2 * np.pi * 440 * np.arange(SR * 2) / SR)).astype(np.float32)
    pcm = (audio * 32767).astype("<i2")
    import wave

    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(SR)
        f.writeframes(pcm.tobytes())
    texts = {}
    for frontend in ("cpu", "ep"):
        assert cli_main(["--model", str(tiny_en), "--provider", "cpu", "--frontend", frontend, "--beam-size", "1",
                         "--format", "txt", str(path)]) == 0
        texts[frontend] = capsys.readouterr().out
    assert texts["ep"] == texts["cpu"]
    from onnxruntime_ep_xdna.whisper.transcribe import WhisperModel

    model = WhisperModel(str(tiny_en), provider="cpu", frontend="ep")
    segments, _ = model.transcribe(audio, beam_size=1)
    assert "".join(s.text for s in segments).strip() == texts["cpu"].strip()
    assert "ep" in model.onnx._frontends  # the ONNX front end ran


@pytest.fixture(scope="module")
def whisper_base():
    if os.environ.get("XDNA_SKIP_REAL_MODEL"):
        pytest.skip("XDNA_SKIP_REAL_MODEL is set")
    from onnxruntime_ep_xdna.whisper.model import ensure_model

    return ensure_model("base", log=lambda m: print(m, file=sys.stderr))


def test_real_whisper_base_transcript_unchanged_by_the_ep_front_end(whisper_base):
    from onnxruntime_ep_xdna.whisper.cli import sample_path
    from onnxruntime_ep_xdna.whisper.onnx_model import WhisperOnnx
    from onnxruntime_ep_xdna.whisper.transcribe import transcribe_all

    w = WhisperOnnx(whisper_base, "xdna")
    texts = {fe: transcribe_all(sample_path(), w, beam_size=1, frontend=fe).text for fe in ("cpu", "ep")}
    assert texts["ep"] == texts["cpu"]
    assert_gemms_on_the_ep(xdna.placement(w._frontends["ep"].session))
