"""Whisper's log-mel front end as an ONNX model, so that its two GEMMs run on the XDNA EP (bf16x3).

`build_logmel_model(n_mels)` is OpenAI's `log_mel_spectrogram(audio, n_mels, padding=N_SAMPLES)[:, :content]`
(features.log_mel_spectrogram) as a graph built here, with no downloaded weights:
  audio [N] -> zeros after it, reflect padding of N_FFT/2 before it (of the zero-padded signal, as OpenAI's)
    -> Conv1d with the constant basis [hann*cos; -hann*sin] (2 x 201 rows of N_FFT taps, stride HOP_LENGTH): the
       windowed real DFT as a GEMM                                                              (XDNA EP)
    -> squared magnitude -> MatMul with the mel filter bank [201, n_mels]                       (XDNA EP)
    -> max(., MEL_POWER_FLOOR), log10, floor at (maximum over every frame that sees the audio) - 8,
       (x + 4) / 4, the first N // HOP_LENGTH frames                                           (CPU EP)
Outputs `log_mel` [n_mels, N // HOP_LENGTH] and `log10_max` (the maximum the floor was taken from).

`build_logmel_model(n_mels, whole=False)` is the same graph without the padding and the normalisation: the log10
mel of the frames of an already padded span of samples. `xdna transcribe --frontend ep` uses that one through
features.LogMel, which streams files and takes the whole-file maximum across its blocks (two passes over long
files), exactly as the numpy front end does.

Accuracy: the GEMMs must run in bf16x3. In plain bf16 (8 significant bits) the DFT's cancellations put errors of
many dB into quiet bins. tests/numerics.py `logmel_bound` derives the elementwise bound of the result from the
contract's bf16x3 GEMM bound (kernels/gemm_contract.h); tests/test_frontend.py checks it on real speech, silence,
a full-scale square wave and very quiet audio.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

import numpy as np

from .features import (HOP_LENGTH, LOG_FLOOR_DB, MEL_POWER_FLOOR, N_FFT, NORM_DIVISOR, NORM_OFFSET, hann_window,
                       mel_filter_bank)

FRONTENDS = ("ep", "cpu")
# `xdna transcribe`'s default: the numpy front end, measured faster than the EP's (benchmarks/frontend.py).
DEFAULT_FRONTEND = "cpu"
N_BINS = N_FFT // 2 + 1  # 201 DFT bins of the real signal
# The precision the front end's GEMMs need on the EP (see the module doc).
EP_PRECISION = "bf16x3"
# Frames per session run when streaming: bounds the im2col buffer (frames x N_FFT floats, 4.8 MB) and the Conv
# output, whatever the block a caller passes.
MAX_FRAMES_PER_RUN = 3000


def dft_basis() -> np.ndarray:
    """[2 * N_BINS, 1, N_FFT] float32 Conv weights: rows k = hann * cos(2 pi k n / N_FFT), then hann * -sin(...).
    Computed in float64 and rounded once."""
    n = np.arange(N_FFT)
    k = np.arange(N_BINS)[:, None]
    angle = 2 * np.pi * ((k * n) % N_FFT) / N_FFT  # reduced first: exact phase for every k*n
    hann = hann_window()
    basis = np.concatenate([hann * np.cos(angle), -hann * np.sin(angle)])
    return basis.astype(np.float32)[:, None, :]


def build_logmel_model(n_mels: int = 80, whole: bool = True, filters: np.ndarray | None = None):
    """The front end as an onnx.ModelProto (see the module doc); `filters` default: features.mel_filter_bank."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    filters = mel_filter_bank(n_mels) if filters is None else np.asarray(filters, np.float32)
    if filters.shape != (N_BINS, n_mels):
        raise ValueError(f"mel filters of shape {filters.shape}, expected {(N_BINS, n_mels)}")
    inits = [
        numpy_helper.from_array(dft_basis(), "dft_basis"),
        numpy_helper.from_array(filters, "mel_filters"),
        numpy_helper.from_array(np.array([1, 1, -1], np.int64), "shape_ncw"),
        numpy_helper.from_array(np.array([N_BINS, N_BINS], np.int64), "split_re_im"),
        numpy_helper.from_array(np.array(MEL_POWER_FLOOR, np.float32), "power_floor"),
        numpy_helper.from_array(np.array(1 / math.log(10), np.float32), "inv_ln10"),
    ]
    nodes = []
    signal = "audio" if whole else "samples"
    if whole:
        # OpenAI appends 30 s of zeros, then reflect-pads both ends by N_FFT/2. Zeros reaching past the last frame
        # that sees audio (N_FFT of them) change nothing: later frames are all zeros, log-mel -10, never above the
        # maximum. The reflection is of the zero-padded signal, so files shorter than N_FFT/2 reflect into zeros.
        inits += [
            numpy_helper.from_array(np.array([0, N_FFT], np.int64), "pad_zeros"),
            numpy_helper.from_array(np.array([0, 0, N_FFT // 2, 0, 0, 0], np.int64), "pad_reflect"),
            numpy_helper.from_array(np.array(LOG_FLOOR_DB, np.float32), "floor_db"),
            numpy_helper.from_array(np.array(NORM_OFFSET, np.float32), "norm_offset"),
            numpy_helper.from_array(np.array(1 / NORM_DIVISOR, np.float32), "inv_norm_divisor"),
            numpy_helper.from_array(np.array([0], np.int64), "zero_1d"),
            numpy_helper.from_array(np.array([1], np.int64), "one_1d"),
            numpy_helper.from_array(np.array([HOP_LENGTH], np.int64), "hop_1d"),
        ]
        nodes += [
            helper.make_node("Pad", ["audio", "pad_zeros"], ["audio_zeros"], mode="constant", name="pad_zeros"),
            helper.make_node("Reshape", ["audio_zeros", "shape_ncw"], ["audio_ncw"], name="to_ncw"),
            helper.make_node("Pad", ["audio_ncw", "pad_reflect"], ["padded"], mode="reflect", name="pad_reflect"),
        ]
        conv_in = "padded"
    else:
        nodes.append(helper.make_node("Reshape", ["samples", "shape_ncw"], ["samples_ncw"], name="to_ncw"))
        conv_in = "samples_ncw"
    nodes += [
        # [1, 2*N_BINS, T]: the windowed real DFT of every frame (XDNA EP: 1-D Conv as a GEMM, constant weights).
        helper.make_node("Conv", [conv_in, "dft_basis"], ["spectrum"], strides=[HOP_LENGTH], name="dft"),
        helper.make_node("Mul", ["spectrum", "spectrum"], ["spectrum_sq"], name="square"),
        helper.make_node("Split", ["spectrum_sq", "split_re_im"], ["re_sq", "im_sq"], axis=1, name="split_re_im"),
        helper.make_node("Add", ["re_sq", "im_sq"], ["power"], name="power"),
        helper.make_node("Transpose", ["power"], ["power_t"], perm=[0, 2, 1], name="frames_major"),
        # [1, T, n_mels] (XDNA EP: constant-weight MatMul).
        helper.make_node("MatMul", ["power_t", "mel_filters"], ["mel"], name="mel_bank"),
        helper.make_node("Max", ["mel", "power_floor"], ["mel_clamped"], name="clamp"),
        helper.make_node("Log", ["mel_clamped"], ["ln_mel"], name="ln"),
        helper.make_node("Mul", ["ln_mel", "inv_ln10"], ["log10_mel_t"], name="log10"),
    ]
    if whole:
        nodes += [
            helper.make_node("ReduceMax", ["log10_mel_t"], ["log10_max"], keepdims=0, name="file_max"),
            helper.make_node("Sub", ["log10_max", "floor_db"], ["floor"], name="floor"),
            helper.make_node("Max", ["log10_mel_t", "floor"], ["floored"], name="apply_floor"),
            helper.make_node("Add", ["floored", "norm_offset"], ["offset"], name="offset"),
            helper.make_node("Mul", ["offset", "inv_norm_divisor"], ["normalised"], name="scale"),
            # The content: N // HOP_LENGTH frames, as OpenAI counts them.
            helper.make_node("Shape", ["audio"], ["n_samples"], name="n_samples"),
            helper.make_node("Div", ["n_samples", "hop_1d"], ["n_content"], name="n_content"),
            helper.make_node("Slice", ["normalised", "zero_1d", "n_content", "one_1d"], ["content"], name="content"),
            helper.make_node("Squeeze", ["content", "zero_1d"], ["content_2d"], name="squeeze"),
            helper.make_node("Transpose", ["content_2d"], ["log_mel"], perm=[1, 0], name="mels_major"),
        ]
        outputs = [helper.make_tensor_value_info("log_mel", TensorProto.FLOAT, [n_mels, "frames"]),
                   helper.make_tensor_value_info("log10_max", TensorProto.FLOAT, [])]
    else:
        nodes += [
            helper.make_node("Squeeze", ["log10_mel_t", "zero_1d"], ["log10_mel_2d"], name="squeeze"),
            helper.make_node("Transpose", ["log10_mel_2d"], ["log10_mel"], perm=[1, 0], name="mels_major"),
        ]
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "zero_1d"))
        outputs = [helper.make_tensor_value_info("log10_mel", TensorProto.FLOAT, [n_mels, "frames"])]
    graph = helper.make_graph(nodes, f"whisper_log_mel_{n_mels}{'' if whole else '_frames'}",
                              [helper.make_tensor_value_info(signal, TensorProto.FLOAT, ["samples"])], outputs,
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                              producer_name="onnxruntime-ep-xdna")
    model.ir_version = 9  # what onnxruntime >= 1.17 reads
    onnx.checker.check_model(model)
    return model


def frontend_session(model, provider: str = "xdna", precision: str | None = EP_PRECISION, session_options=None):
    """An InferenceSession of a front-end ModelProto. provider 'xdna': the XDNA EP first (with `precision`, None =
    the EP's default), the CPU EP for the rest; 'cpu': the CPU EP alone. Placement is recorded."""
    import onnxruntime as ort

    from .. import EP_NAME
    from .._placement import session_options as xdna_session_options
    from .onnx_model import CPU_EP, resolve_provider

    name = resolve_provider(provider)
    so = session_options or xdna_session_options()
    if name == EP_NAME:
        options = {} if precision is None else {"precision": precision}
        providers = [(EP_NAME, options), CPU_EP]
    else:
        providers = [name] if name == CPU_EP else [name, CPU_EP]
    # enable_fallback=0: without it onnxruntime's Python API retries on the CPU EP alone when an EP refuses its
    # options, and only prints why; a front end in the wrong place is not what was asked for.
    session = ort.InferenceSession(model.SerializeToString(), so, providers=providers, enable_fallback=0)
    if name not in session.get_providers():
        raise RuntimeError(f"{name} refused the log-mel front end's session (options {providers[0][1] if name == EP_NAME else {}}"
                           "; see the EP error above)")
    return session


class EpFrontEnd:
    """The frames model in a session, callable as features.LogMel's `frames_log10_mel`:
    (span of samples, frame count) -> (n_mels, count) float32 log10 mel."""

    def __init__(self, n_mels: int, filters: np.ndarray | None = None, provider: str = "xdna",
                 precision: str | None = EP_PRECISION):
        self.n_mels = n_mels
        self.session = frontend_session(build_logmel_model(n_mels, whole=False, filters=filters), provider, precision)

    def __call__(self, span: np.ndarray, count: int) -> np.ndarray:
        span = np.ascontiguousarray(span, dtype=np.float32)
        out = np.empty((self.n_mels, count), np.float32)
        for first in range(0, count, MAX_FRAMES_PER_RUN):
            n = min(MAX_FRAMES_PER_RUN, count - first)
            start = first * HOP_LENGTH
            piece = span[start:start + (n - 1) * HOP_LENGTH + N_FFT]
            out[:, first:first + n] = self.session.run(None, {"samples": piece})[0]
        return out


def make_frontend(frontend: str, n_mels: int, filters: np.ndarray | None = None, provider: str = "xdna",
                  precision: str | None = EP_PRECISION) -> Callable[[np.ndarray, int], np.ndarray] | None:
    """'cpu' -> None (features' numpy front end); 'ep' -> an EpFrontEnd on `provider`."""
    if frontend == "cpu":
        return None
    if frontend != "ep":
        raise ValueError(f"unknown front end {frontend!r} (one of {', '.join(FRONTENDS)})")
    return EpFrontEnd(n_mels, filters, provider, precision)


_LOCK = threading.Lock()


def frontend_for(model, frontend: str) -> Callable[[np.ndarray, int], np.ndarray] | None:
    """The front end of a loaded WhisperOnnx (its provider and mel filters), created once per model and kind."""
    if frontend not in FRONTENDS:
        raise ValueError(f"unknown front end {frontend!r} (one of {', '.join(FRONTENDS)})")
    if frontend == "cpu":
        return None
    with _LOCK:
        made = model.__dict__.setdefault("_frontends", {})
        if frontend not in made:
            made[frontend] = make_frontend(frontend, model.n_mels, model.mel_filters, model.provider)
        return made[frontend]
