"""Read CTranslate2 Whisper checkpoints and turn them into transformers weights.

The registry packages we can reach ship Whisper as CTranslate2 ``model.bin`` files. This module is the
inverse of CTranslate2's own converter (``ctranslate2/converters/transformers.py``, WhisperLoader), so the
result loads into ``transformers.WhisperForConditionalGeneration`` unchanged.

``model.bin`` layout (binary version 6, little-endian, ``ctranslate2/specs/model_spec.py::_serialize``):
u32 version, str spec name, u32 spec revision, u32 variable count, then per variable
{str name, u8 rank, u32 dims[rank], u8 dtype, u32 nbytes, raw data}, then u32 alias count and
(str alias, str target) pairs. A str is a u16 length (including a trailing NUL) followed by the bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# CTranslate2's dtype ids; bfloat16 (5) has no numpy dtype and is widened by hand.
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
SUPPORTED_BINARY_VERSIONS = (5, 6)


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 model.bin this reader understands."""


@dataclass
class CT2Model:
    spec_name: str
    spec_revision: int
    binary_version: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        """A variable by name, following aliases (e.g. the tied output projection)."""
        return self.variables[self.aliases.get(name, name)]


class _Reader:
    def __init__(self, data: memoryview):
        self.data, self.pos = data, 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise CT2FormatError(f"truncated model.bin: need {n} bytes at offset {self.pos}, file has {len(self.data)}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (length,) = self.unpack("H")
        raw = bytes(self.take(length))
        if not raw.endswith(b"\0"):
            raise CT2FormatError(f"string at offset {self.pos - length} is not NUL-terminated")
        return raw[:-1].decode("utf-8")


def read_ct2_model(path: str | Path) -> CT2Model:
    """Parse a CTranslate2 model.bin; the whole file must be consumed exactly."""
    data = memoryview(Path(path).read_bytes())
    r = _Reader(data)
    (version,) = r.unpack("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise CT2FormatError(f"unsupported CTranslate2 binary version {version} (expected one of {SUPPORTED_BINARY_VERSIONS})")
    spec_name = r.string()
    (revision, count) = r.unpack("II")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = r.string()
        (rank,) = r.unpack("B")
        shape = r.unpack(f"{rank}I") if rank else ()
        (dtype_id, nbytes) = r.unpack("BI")
        if dtype_id not in _CT2_DTYPES:
            raise CT2FormatError(f"variable {name!r}: unknown dtype id {dtype_id}")
        raw = r.take(nbytes)
        dtype = _CT2_DTYPES[dtype_id]
        if dtype == "bfloat16":
            # bf16 is the top half of an fp32: widen exactly.
            array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        if array.size != int(np.prod(shape, dtype=np.int64)):
            raise CT2FormatError(f"variable {name!r}: {nbytes} bytes do not fit shape {shape} of {np.dtype(array.dtype).name}")
        variables[name] = array.reshape(shape)
    aliases: dict[str, str] = {}
    if r.pos < len(data):
        (n_alias,) = r.unpack("I")
        for _ in range(n_alias):
            alias = r.string()
            aliases[alias] = r.string()
    if r.pos != len(data):
        raise CT2FormatError(f"{len(data) - r.pos} unexpected trailing bytes after the alias table")
    for alias, target in aliases.items():
        if target not in variables:
            raise CT2FormatError(f"alias {alias!r} points to missing variable {target!r}")
    return CT2Model(spec_name, revision, version, variables, aliases)


@dataclass
class WhisperDims:
    """The shape of a Whisper model, as read back from a CTranslate2 spec."""

    vocab_size: int
    num_mel_bins: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int


def _count_layers(variables: dict[str, np.ndarray], prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in variables:
        n += 1
    return n


def whisper_dims(ct2: CT2Model) -> WhisperDims:
    if ct2.spec_name != "WhisperSpec":
        raise CT2FormatError(f"expected a WhisperSpec model, got {ct2.spec_name!r}")
    v = ct2.variables
    # CT2 stores scalar spec attributes as rank-0 variables. Activation 3 is GELU, the only one Whisper uses.
    if int(v.get("decoder/activation", 3)) != 3 or int(v.get("decoder/pre_norm", 1)) != 1:
        raise CT2FormatError("decoder is not a pre-norm GELU transformer; not a Whisper model")
    embeddings = v["decoder/embeddings/weight"]
    return WhisperDims(
        vocab_size=embeddings.shape[0],
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        d_model=embeddings.shape[1],
        encoder_layers=_count_layers(v, "encoder"),
        decoder_layers=_count_layers(v, "decoder"),
        encoder_attention_heads=int(v["encoder/num_heads"]),
        decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
    )


def _split_rows(array: np.ndarray, parts: int) -> list[np.ndarray]:
    if array.shape[0] % parts:
        raise CT2FormatError(f"cannot split a fused projection of {array.shape[0]} rows into {parts}")
    return np.split(array, parts, axis=0)


def to_transformers_state_dict(ct2: CT2Model) -> dict[str, np.ndarray]:
    """Map CT2 WhisperSpec variables to WhisperForConditionalGeneration parameter names (fp32).

    Inverts CTranslate2's WhisperLoader: self-attention q/k/v are fused row-wise in ``linear_0`` (k_proj has
    no bias in Whisper, so CT2 stored zeros there), cross-attention keeps q in ``linear_0`` and fuses k/v in
    ``linear_1``; the output projection is the last linear. ``proj_out`` is tied to the token embeddings.
    """
    dims = whisper_dims(ct2)
    src = ct2.variables
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        used.add(name)
        return np.ascontiguousarray(src[name], dtype=np.float32)

    def put_linear(dst: str, ct2_name: str) -> None:
        out[f"{dst}.weight"] = take(f"{ct2_name}/weight")
        out[f"{dst}.bias"] = take(f"{ct2_name}/bias")

    def put_norm(dst: str, ct2_name: str) -> None:
        out[f"{dst}.weight"] = take(f"{ct2_name}/gamma")
        out[f"{dst}.bias"] = take(f"{ct2_name}/beta")

    def put_fused_qkv(dst: str, ct2_name: str, parts: str) -> None:
        weights = _split_rows(take(f"{ct2_name}/weight"), len(parts))
        biases = _split_rows(take(f"{ct2_name}/bias"), len(parts))
        for part, w, b in zip(parts, weights, biases):
            out[f"{dst}.{part}_proj.weight"] = w
            if part == "k":
                # Whisper's k_proj has no bias; anything non-zero here means a different model family.
                if np.any(b != 0):
                    raise CT2FormatError(f"{ct2_name}: key bias is not zero; not a Whisper attention block")
            else:
                out[f"{dst}.{part}_proj.bias"] = b

    for side in ("encoder", "decoder"):
        n_layers = dims.encoder_layers if side == "encoder" else dims.decoder_layers
        hf = f"model.{side}"
        out[f"{hf}.embed_positions.weight"] = take(f"{side}/position_encodings/encodings")
        put_norm(f"{hf}.layer_norm", f"{side}/layer_norm")
        for i in range(n_layers):
            c, h = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            put_fused_qkv(f"{h}.self_attn", f"{c}/self_attention/linear_0", "qkv")
            put_linear(f"{h}.self_attn.out_proj", f"{c}/self_attention/linear_1")
            put_norm(f"{h}.self_attn_layer_norm", f"{c}/self_attention/layer_norm")
            if side == "decoder":
                out[f"{h}.encoder_attn.q_proj.weight"] = take(f"{c}/attention/linear_0/weight")
                out[f"{h}.encoder_attn.q_proj.bias"] = take(f"{c}/attention/linear_0/bias")
                put_fused_qkv(f"{h}.encoder_attn", f"{c}/attention/linear_1", "kv")
                put_linear(f"{h}.encoder_attn.out_proj", f"{c}/attention/linear_2")
                put_norm(f"{h}.encoder_attn_layer_norm", f"{c}/attention/layer_norm")
            put_linear(f"{h}.fc1", f"{c}/ffn/linear_0")
            put_linear(f"{h}.fc2", f"{c}/ffn/linear_1")
            put_norm(f"{h}.final_layer_norm", f"{c}/ffn/layer_norm")
    for conv in ("conv1", "conv2"):
        put_linear(f"model.encoder.{conv}", f"encoder/{conv}")
    out["model.decoder.embed_tokens.weight"] = take("decoder/embeddings/weight")

    weights_left = {n for n, a in src.items() if n not in used and a.ndim > 0}
    if weights_left:
        raise CT2FormatError(f"CT2 variables not mapped to transformers (unknown layout): {sorted(weights_left)[:5]}")
    projection = ct2.aliases.get("decoder/projection/weight")
    if projection not in (None, "decoder/embeddings/weight"):
        raise CT2FormatError("decoder output projection is not tied to the embeddings; unsupported")
    return out
