"""The numerics every test checks against: one bf16 rounding, one error bound, one comparison.

The bound is the contract's (kernels/gemm_contract.h, stated there once):
    |C - C_exact| <= (2^-7 + 2^-16 + K * 2^-23) * (|A|.|B|)   elementwise,
since bf16 keeps 8 significant bits (each rounded operand within 2^-8 relative, a product of two within
(1 + 2^-8)^2 - 1 = 2^-7 + 2^-16) and K * 2^-23 covers the fp32 accumulation (with a factor 2 of margin, so that
the CPU EP's own fp32 error fits inside as well).
"""

from __future__ import annotations

import numpy as np

TINY = 1e-30  # absolute slack for subnormal products a backend may flush to zero


def bf16_round(x) -> np.ndarray:
    """fp32 -> bf16 -> fp32 with round-to-nearest-even; NaN stays a quiet NaN (the contract's f32_to_bf16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    quiet_nan = (u | 0x00400000) & 0xFFFF0000
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(is_nan, quiet_nan, rounded).astype(np.uint32).view(np.float32)


def bf16_bound(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """The contract's elementwise bound on |C - A.B| for fp32 A [.., M, K] and B [.., K, N] (see the module doc)."""
    with np.errstate(invalid="ignore", over="ignore"):
        mag = np.matmul(np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64)))
    return (2.0**-7 + 2.0**-16 + k * 2.0**-23) * mag + TINY


def bf16_output_bound(bound: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """A result within `bound` of `exact`, then rounded to bf16 (nearest even: within 2^-8 of its value, which is
    within |exact| + bound): the bound on |bf16(result) - exact|."""
    return bound + 2.0**-8 * (np.abs(exact) + bound)


def summation_order_bound(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two backends computing the same bf16 products may differ only in the order of the fp32 sum:
    |c1 - c2| <= 2 K 2^-23 |A|.|B| (with 1% slack). Any protocol error is orders of magnitude larger."""
    k = a.shape[-1]
    return 2 * k * 2.0**-23 * (np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)) * 1.01 + TINY


def assert_within(actual, exact, bound, what=""):
    """|actual - exact| <= bound elementwise where exact is finite; NaN and +-Inf exactly where exact has them."""
    actual = np.asarray(actual, dtype=np.float64)
    exact = np.asarray(exact, dtype=np.float64)
    assert actual.shape == exact.shape, f"{what}: shape {actual.shape} != {exact.shape}"
    finite = np.isfinite(exact)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(exact), err_msg=f"{what}: NaN positions differ")
    inf = ~finite & ~np.isnan(exact)
    np.testing.assert_array_equal(actual[inf], exact[inf], err_msg=f"{what}: Inf differs")
    err = np.abs(actual[finite] - exact[finite])
    lim = np.broadcast_to(bound, exact.shape)[finite]
    worst = np.argmax(err - lim) if err.size else 0
    assert np.all(err <= lim), f"{what}: error {err.flat[worst]:.3g} exceeds the bound {lim.flat[worst]:.3g}"


def assert_same_gemm(c, ref, a, b):
    """The same bf16 products as a reference backend's, summed in another order (summation_order_bound)."""
    assert_within(c, ref, summation_order_bound(a, b))


def rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- Precision modes (kernels/gemm_contract.h, "Precision modes"; derivations there) ----

def bf16x3_eps(k: int) -> float:
    """bf16x3's relative factor: |C - A.B| <= bf16x3_eps(K) |A|.|B| (gemm_contract.h)."""
    return 2.0**-14 + (k + 2) * 2.0**-23


def fp32_eps(k: int) -> float:
    """An fp32 GEMM's (the CPU EP's, numpy's) relative factor: K + 2 roundings of 2^-24, doubled as above."""
    return (k + 2) * 2.0**-23


def bf16x3_bound(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """bf16x3: |C - A.B| <= (2^-14 + (K + 2) 2^-23) |A|.|B| (hi/lo split drops <= 3.01 * 2^-16 per product)."""
    with np.errstate(invalid="ignore", over="ignore"):
        mag = np.matmul(np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64)))
    return bf16x3_eps(k) * mag + TINY


def int8_scales(x: np.ndarray, axis: int) -> np.ndarray:
    """Symmetric int8 scale max|x|/127 along `axis` (per row of A: axis=-1; per column of B: axis=-2)."""
    return np.max(np.abs(np.asarray(x, np.float64)), axis=axis, keepdims=True) / 127.0


def int8_bound(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """int8 (A8W8): each operand is within half a quantisation step (+0.0005 for the fp32 scaling by 127/amax) of
    its int8 value, so |C - A.B| <= 0.5005 (sb sum|a| + sa sum|b|) + 0.2505 K sa sb + 2^-21 |A|.|B|."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    k = a.shape[-1]
    sa = int8_scales(a, -1)  # [M, 1]
    sb = int8_scales(b, -2)  # [1, N]
    row = np.abs(a).sum(axis=-1, keepdims=True)  # [M, 1]
    col = np.abs(b).sum(axis=-2, keepdims=True)  # [1, N]
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite inputs: checked by position, not by bound
        return 0.5005 * (sb * row + sa * col) + 0.2505 * k * sa * sb + 2.0**-21 * (np.abs(a) @ np.abs(b)) + TINY


# ---- GEMM epilogue (kernels/gemm_contract.h, "Epilogue") ----

GELU_SLOPE = 1.13  # sup |d GELU / dx| = 1.1289 (at x = +-sqrt(2)): how far an input error moves GELU
GELU_APPROX = 2.0**-21  # |GELU_approx(x) - GELU(x)| <= GELU_APPROX |x| (erf within 4.4e-7, fp32 roundings)


def gelu64(x) -> np.ndarray:
    """GELU(x) = x/2 (1 + erf(x / sqrt 2)) in float64 (the erf form of ONNX Gelu and ORT's BiasGelu)."""
    from math import erf
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + np.vectorize(erf, otypes=[np.float64])(x / np.sqrt(2.0)))


def epilogue_exact(product, bias=None, gelu=False, residual=None) -> np.ndarray:
    """act(product + bias) + residual in float64, the epilogue's steps in the contract's order."""
    s = np.asarray(product, np.float64) + (0.0 if bias is None else np.asarray(bias, np.float64))
    y = gelu64(s) if gelu else s
    return y + (0.0 if residual is None else np.asarray(residual, np.float64))


def epilogue_bound(product_bound, product_exact, bias=None, gelu=False, residual=None) -> np.ndarray:
    """The bound on an epilogue's output given the product's bound E (precision_bound):
        s = C + bias: E + 2^-24 |s|;  GELU: GELU_SLOPE (E + 2^-24 |s|) + GELU_APPROX |s|;  + residual: + 2^-24 |y|
    (|s| and |y| taken at the exact values plus the bound, so that the roundings of the computed values fit)."""
    e = np.asarray(product_bound, np.float64)
    s = np.abs(np.asarray(product_exact, np.float64) + (0.0 if bias is None else np.asarray(bias, np.float64))) + e
    err = e + (2.0**-24 * s if bias is not None else 0.0)
    if gelu:
        err = GELU_SLOPE * err + GELU_APPROX * s
    if residual is not None:
        y = np.abs(epilogue_exact(product_exact, bias, gelu, residual)) + err
        err = err + 2.0**-24 * y
    return err + TINY


# ---- The A prologue: LayerNormalization over K (kernels/gemm_contract.h, "A prologue"; derivation there) ----

def layernorm64(x, gamma, beta=None, eps=1e-5) -> np.ndarray:
    """LayerNormalization over the last axis in float64: (x - mean) / sqrt(var + eps) * gamma + beta."""
    x = np.asarray(x, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        y = (x - mean) / np.sqrt(var + eps) * np.asarray(gamma, np.float64)
    return y + (0.0 if beta is None else np.asarray(beta, np.float64))


def layernorm_bound(x, gamma, beta=None, eps=1e-5) -> np.ndarray:
    """Elementwise bound on |LN_fp32(x) - layernorm64(x)| for the contract's fp32 arithmetic (any order of the
    sums), doubled for the second-order terms. s' is at least sqrt(eps) (the variance is clamped at 0), so a row
    whose variance error exceeds it (constant rows) keeps a finite bound."""
    u = 2.0**-24
    x = np.asarray(x, np.float64)
    k = x.shape[-1]
    g = np.abs(np.asarray(gamma, np.float64))
    b = 0.0 if beta is None else np.abs(np.asarray(beta, np.float64))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        s = np.sqrt(var + eps)
        dm = (k + 1) * u * np.abs(x).mean(axis=-1, keepdims=True)
        dv = (3 * k + 7) * u * ((x * x).mean(axis=-1, keepdims=True) + eps)
        ds = dv / s + u * s
        s_low = np.maximum(s - ds, np.sqrt(eps) * (1 - 2 * u))
        d = np.abs(x - mean)
        inv_err = np.minimum(ds / (s * s_low), 1 / s_low)  # |1/s' - 1/s|
        y = np.abs(layernorm64(x, gamma, beta, eps))
        return 2 * (g * ((dm + 2 * u * d) / s_low + d * inv_err) + 2 * u * (y + b))


def prologue_exact(x, gamma, beta, eps, b) -> np.ndarray:
    """LN(x) . B in float64."""
    return np.matmul(layernorm64(x, gamma, beta, eps), np.asarray(b, np.float64))


def prologue_bound(x, gamma, beta, eps, b, precision="bf16") -> np.ndarray:
    """|LN(x).B - exact| for a product of `precision` whose A is the prologue's fp32 output y' = y + e, |e| <= E:
    the product's bound at |y| + E (every bound here grows with |A|), plus E.|B|."""
    e = layernorm_bound(x, gamma, beta, eps)
    y = np.abs(layernorm64(x, gamma, beta, eps))
    b = np.asarray(b, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return precision_bound(y + e, b, precision) + np.matmul(e, np.abs(b))


def carried_bound(a_abs, e, b, precision) -> np.ndarray:
    """|A'.B - A.B| for a product of `precision` whose fp32 A' = A + e carries an earlier step's error, |e| <= E
    (an int8 chain's fc2 reading fc1's output, ops/int8_chain.h): the product's bound at |A| + E (every bound here
    grows with |A|), plus E.|B|."""
    e = np.asarray(e, np.float64)
    b = np.asarray(b, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return precision_bound(np.abs(np.asarray(a_abs, np.float64)) + e, b, precision) + np.matmul(e, np.abs(b))


# ---- Fused attention (kernels/attention_contract.h) ----

# The softmax's exp (emulator_attention.cc exp_nonpositive: 2^n times a degree-3 polynomial of 2^f): relative error
# on every float in [-87, 0] (measured exhaustively against float64: 2^-13.64, scalar and AVX-512 FMA forms alike;
# the polynomial's minimax error 2^-13.71, t = x log2(e)'s fp32 rounding at most 87 2^-24 more). tests check it.
ATTENTION_EXP_ERR = 2.0**-13.5
# One weight P = bf16(exp(x)(1 + e)), |e| <= ATTENTION_EXP_ERR, RNE to 8 significant bits (2^-8):
# |P / exp(x) - 1| <= (1 + 2^-8)(1 + 2^-13.5) - 1 = 2^-8 + 2^-13.5 + 2^-21.5 < 2^-8 + 2^-13.
ATTENTION_RHO = 2.0**-8 + 2.0**-13


def attention_exact(q, kt, v, scale, mask=None) -> np.ndarray:
    """softmax(scale * Q K^T + mask) V in float64 over the last two dims ([.., M, D], [.., D, T], [.., T, Dv]; the
    additive mask broadcast to [.., M, T], -Inf allowed). Rows of finite Q, K and mask with a finite score only."""
    s = scale * np.matmul(np.asarray(q, np.float64), np.asarray(kt, np.float64))
    if mask is not None:
        s = s + np.asarray(mask, np.float64)
    w = np.exp(s - s.max(axis=-1, keepdims=True))
    w /= w.sum(axis=-1, keepdims=True)
    return np.matmul(w, np.asarray(v, np.float64))


def attention_bound(q, kt, v, scale, mask=None) -> np.ndarray:
    """The fused attention contract's elementwise bound on |O - O*|. Each score moves by at most
        delta = |scale| (2^-7 + 2^-16 + (D + 2) 2^-23) |Q|.|K^T|  +  2^-21 max_t |s*_t|
    (the GEMM contract's bound on Q K^T; then the fp32 scaling and the fp32 subtraction of the row max, 2^-24 of
    |s*_t| and of |x_t| = |s*_t - max s*| <= 2 max |s*| each; or, where the AVX-512 softmax takes the exponent in base
    2 by one FMA, fl(s c - fl(c max s)) with c = fl(scale log2 e), c's rounding (1.22 2^-24) and the FMA's (2^-24) of
    |x_t|: 4.5 2^-24 max |s*| < 2^-21 max |s*|; fl(c max s) is the same for the whole row). The row max
    cancels in P/l, so each weight is within a factor (1 + eta) of the exact softmax weight w*, with
        eta = e^(2 max_t delta_t) (1 + rho) / (1 - rho) (1 + T 2^-23) - 1,  rho = ATTENTION_RHO
    (P rounded to bf16 after the fp32 exp's error, the fp32 row sum l). V rounded to bf16 (2^-8), the fp32 PV sum over T
    and the final division add
        |O - O*| <= ((1 + eta)(1 + 2^-8)(1 + (T + 1) 2^-23) - 1) sum_t w*_t |V[t]|.
    With an additive mask (finite or -Inf) the score is fl(fl(scale q.k) + mask): the add's rounding (2^-24 of the
    masked score) joins the scaling's and the subtraction's, so the second term of delta is 2^-21 times the larger
    of max_t |s*_t| and max_t |s*_t + mask_t| over the finite ones; a -Inf score is -Inf exactly, its weight 0."""
    q, kt, v = (np.asarray(x, np.float64) for x in (q, kt, v))
    d, t = q.shape[-1], kt.shape[-1]
    s = scale * np.matmul(q, kt)
    big = np.abs(s).max(axis=-1, keepdims=True)
    if mask is not None:
        s = s + np.asarray(mask, np.float64)
        finite = np.where(np.isfinite(s), np.abs(s), 0)
        big = np.maximum(big, finite.max(axis=-1, keepdims=True))
    delta = abs(scale) * (2.0**-7 + 2.0**-16 + (d + 2) * 2.0**-23) * np.matmul(np.abs(q), np.abs(kt)) \
        + 2.0**-21 * big
    rho = ATTENTION_RHO
    eta = np.exp(2 * delta.max(axis=-1, keepdims=True)) * (1 + rho) / (1 - rho) * (1 + t * 2.0**-23) - 1
    w = np.exp(s - s.max(axis=-1, keepdims=True))
    w /= w.sum(axis=-1, keepdims=True)
    return ((1 + eta) * (1 + 2.0**-8) * (1 + (t + 1) * 2.0**-23) - 1) * np.matmul(w, np.abs(v)) + TINY
def precision_bound(a: np.ndarray, b: np.ndarray, precision: str, runtime_b: bool = False) -> np.ndarray:
    """The bound of `precision` ("bf16", "int8", "bf16x3") on |A.B - exact| for fp32 A [.., M, K] or [K] and
    B [.., K, N] or [K], as the EP computes it: int8 keeps a run-time B in bf16 (the contract's rule)."""
    a, b = np.asarray(a), np.asarray(b)
    k = a.shape[-1]
    if precision == "bf16x3":
        return bf16x3_bound(a, b, k)
    if precision == "bf16" or runtime_b or k == 0:
        return bf16_bound(a, b, k)
    assert precision == "int8", precision
    out = int8_bound(a[None] if a.ndim == 1 else a, b[:, None] if b.ndim == 1 else b)
    if b.ndim == 1:
        out = out[..., 0]
    if a.ndim == 1:
        out = out[..., 0] if b.ndim == 1 else out[..., 0, :]
    return out


def int8_nan_rule(exact: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The int8 contract's NaN rule: a row of A or a column of B holding NaN or Inf makes that row / column of C
    NaN (int8 has no such values). `exact` is A.B [M, N] for 2-D A and B."""
    out = np.array(exact, dtype=np.float64)
    out[~np.all(np.isfinite(a), axis=-1), :] = np.nan
    out[:, ~np.all(np.isfinite(b), axis=-2)] = np.nan
    return out


# ---- Whisper's log-mel front end (whisper/frontend.py: the DFT and the mel bank as GEMMs) ----

def logmel_exact64(audio: np.ndarray, filters: np.ndarray) -> tuple[np.ndarray, dict]:
    """OpenAI's normalised log-mel of `audio` in float64 (features.py's recipe: zeros after the audio, reflect
    padding of N_FFT/2 before it, periodic Hann, |rfft|^2, the float32 mel filters taken as exact, log10 of
    max(., MEL_POWER_FLOOR), floor at the maximum over every frame - LOG_FLOOR_DB, (x + 4) / 4).
    Returns (log-mel [n_mels, content frames], the parts logmel_bound needs)."""
    from onnxruntime_ep_xdna.whisper import features as F

    x = np.asarray(audio, np.float64).reshape(-1)
    padded = np.pad(np.concatenate([x, np.zeros(F.N_FFT)]), (F.N_FFT // 2, 0), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, F.N_FFT)[:: F.HOP_LENGTH]
    n = np.arange(F.N_FFT)
    angle = 2 * np.pi * ((np.arange(F.N_FFT // 2 + 1)[:, None] * n) % F.N_FFT) / F.N_FFT
    hann = F.hann_window()
    cos, sin = (hann * np.cos(angle)).T, (hann * np.sin(angle)).T  # [N_FFT, bins]
    re, im = frames @ cos, frames @ sin
    power = re**2 + im**2
    fb = np.asarray(filters, np.float64)
    mel = power @ fb  # [frames, n_mels]
    peak = max(float(mel.max()), F.MEL_POWER_FLOOR)
    level = np.maximum(np.maximum(mel, F.MEL_POWER_FLOOR), peak * 10.0**-F.LOG_FLOOR_DB)  # the floored power
    out = (np.log10(level) + F.NORM_OFFSET) / F.NORM_DIVISOR
    content = x.size // F.HOP_LENGTH
    parts = dict(re=re, im=im, power=power, mel=mel, level=level, filters=fb,
                 mag_re=np.abs(frames) @ np.abs(cos), mag_im=np.abs(frames) @ np.abs(sin), content=content)
    return out[:content].T, parts


def logmel_bound(parts: dict, dft_eps: float, mel_eps: float, reference_fp32: bool = False) -> np.ndarray:
    """Elementwise bound on |log-mel - logmel_exact64| [n_mels, content] for a front end whose DFT GEMM (K = N_FFT)
    has relative factor `dft_eps` and whose mel GEMM (K = 201) has `mel_eps` (bf16x3_eps or fp32_eps).

    Derivation (fp32 values, u = 2^-24):
      DFT: the basis is rounded to fp32 once (u relative), the GEMM adds dft_eps |x|.|basis|, so
        |Re' - Re| <= dRe = (dft_eps + 2u) (|x|.|hann cos|), likewise Im (2u also covers numpy's frames * hann);
      power: |Re'^2 - Re^2| <= dRe (2|Re| + dRe), + 2 fp32 roundings: dP = (dRe (2|Re| + dRe) + dIm (...))(1 + 4u)
        + 4u P;
      mel (P, F >= 0): dM = dP.F + mel_eps (M + dP.F);
      floor: the output is log10(L) with L = max(M, MEL_POWER_FLOOR, 10^-8 max M), and L moves by at most
        D = max(dM, 10^-8 max dM), so |log10 L' - log10 L| <= -log10(1 - D / L) (infinite when D >= L);
      then / NORM_DIVISOR, + 4e-6 for fp32 log10 and the normalisation's roundings.
    `reference_fp32`: add the numpy reference's own fp32 error (frames * hann, the power cast, the fp32 mel GEMM),
    for comparing with features.log_mel_spectrogram instead of the float64 exact value.
    """
    from onnxruntime_ep_xdna.whisper import features as F

    u = 2.0**-24
    fb = parts["filters"]

    def mel_error(d_eps: float, m_eps: float) -> np.ndarray:
        d_re = (d_eps + 2 * u) * parts["mag_re"]
        d_im = (d_eps + 2 * u) * parts["mag_im"]
        d_p = (d_re * (2 * np.abs(parts["re"]) + d_re) + d_im * (2 * np.abs(parts["im"]) + d_im)) * (1 + 4 * u)
        d_p += 4 * u * parts["power"]
        spread = d_p @ fb
        return spread + m_eps * (parts["mel"] + spread)

    d_mel = mel_error(dft_eps, mel_eps)
    if reference_fp32:
        d_mel = d_mel + mel_error(0.0, fp32_eps(fb.shape[0]))
    d = np.maximum(d_mel, 10.0**-F.LOG_FLOOR_DB * d_mel.max())
    level = parts["level"]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_err = np.where(d < level, -np.log10(np.maximum(1 - d / level, 1e-300)), np.inf)
    return (log_err / F.NORM_DIVISOR + 4e-6)[: parts["content"]].T


def attention_nan_rows(q, kt, scale, mask=None) -> np.ndarray:
    """The rows [.., M] whose softmax ORT's CPU EP makes NaN (the contract's rule): NaN or +Inf among the scores
    scale * Q K^T + mask, or only -Inf (computed in float64: no overflow of finite operands assumed)."""
    with np.errstate(invalid="ignore", over="ignore"):
        s = scale * np.matmul(np.asarray(q, np.float64), np.asarray(kt, np.float64))
        if mask is not None:
            s = s + np.asarray(mask, np.float64)
    return np.isnan(s).any(-1) | np.isposinf(s).any(-1) | np.isneginf(s).all(-1)


def assert_masked_attention(o, q, kt, v, scale, mask, zero_nan_rows, what=""):
    """Attention output o [.., M, Dv] of Q [.., M, D], K^T [.., D, T], V [.., T, Dv] and the additive mask (None or
    broadcasting to [.., M, T]) as the contract gives it: the rows attention_nan_rows names are NaN, or under the
    NaN rule (Where(IsNaN(P), 0, P)) sum_t 0 x V[t]: 0, NaN where V's column holds Inf or NaN; every other row
    within attention_bound of the exact value."""
    q, kt, v = (np.asarray(x, np.float32) for x in (q, kt, v))
    shape = np.broadcast_shapes(q.shape[:-2], kt.shape[:-2], v.shape[:-2])
    q = np.broadcast_to(q, shape + q.shape[-2:])
    kt = np.broadcast_to(kt, shape + kt.shape[-2:])
    v = np.broadcast_to(v, shape + v.shape[-2:])
    m = None if mask is None else np.broadcast_to(np.asarray(mask, np.float32), shape + (q.shape[-2], kt.shape[-1]))
    bad = attention_nan_rows(q, kt, scale, m)
    o = np.asarray(o)
    assert o.shape == shape + (q.shape[-2], v.shape[-1]), (o.shape, what)
    for idx in np.ndindex(*shape):
        rows = bad[idx]
        if rows.any():
            if zero_nan_rows:
                zero_row = np.where(np.isfinite(v[idx]).all(axis=0), 0.0, np.nan)
                np.testing.assert_array_equal(o[idx][rows], np.broadcast_to(zero_row, o[idx][rows].shape),
                                              f"{what} head {idx}: NaN rule rows")
            else:
                assert np.isnan(o[idx][rows]).all(), f"{what} head {idx}: NaN rows"
        ok = ~rows
        mk = None if m is None else m[idx][ok]
        assert_within(o[idx][ok], attention_exact(q[idx][ok], kt[idx], v[idx], scale, mk),
                      attention_bound(q[idx][ok], kt[idx], v[idx], scale, mk), f"{what} head {idx}, finite rows")


def assert_attention_nan_rows(o, q, k, v, scale, expected):
    """Attention output o [H, M, Dv] of Q [H, M, D], K [H, T, D], V [H, T, Dv]: exactly the rows `expected` [H, M]
    hold NaN, all of them NaN (ORT's Softmax), and every other row is within attention_bound of the exact value."""
    nan_rows = np.isnan(o).any(axis=-1)
    np.testing.assert_array_equal(nan_rows, expected)
    assert np.isnan(o[nan_rows]).all()
    kt = k.transpose(0, 2, 1)
    for h in range(len(o)):
        ok = ~expected[h]
        assert_within(o[h][ok], attention_exact(q[h][ok], kt[h], v[h], scale),
                      attention_bound(q[h][ok], kt[h], v[h], scale), f"head {h}, finite rows")
