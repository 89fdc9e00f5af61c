"""The three ONNX Runtime sessions of an optimum Whisper export, driven for batched decoding.

Per window:  log-mel -> encoder_model.onnx (once)
  -> decoder_model.onnx on the first prompt: logits and the cross-attention K/V of every layer (computed once
     per window, kept in OrtValues, never copied to numpy and never repeated per beam: the decoder's attention
     MatMuls broadcast a batch-1 K/V over the beams)
  -> decoder_with_past_model.onnx once per step for ALL sequences of the window (beams or samples) as one batch.
A second prompt on the same window (temperature fallback, language detection first) runs through
decoder_with_past with an empty self-attention cache, reusing the cross-attention K/V.
Only transformers-free pieces are used (`tokenizers`, numpy), so loading starts in well under a second.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import EP_NAME as XDNA_EP
from .._precision import provider_options
from .features import N_TIMESTAMPS, mel_filter_bank
from .rules import SpecialTokens

CPU_EP = "CPUExecutionProvider"
FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")
# decoder_model.onnx + the cross-attention probabilities of the alignment-head layers as extra outputs (word
# timestamps only). Cached per content of decoder_model.onnx and per this module's source (attention_decoder).
ATTENTION_DECODER = "decoder_model_cross_attention.v1.onnx"


def attention_decoder(model_dir: Path, layers: Sequence[int], cache_dir: str | os.PathLike | None = None) -> Path:
    """The word-timing decoder variant of `model_dir` (built once into <cache>/attention/, or next to the model when
    the cache is not writable): decoder_model.onnx with the Softmax outputs of the cross-attention of `layers` as
    graph outputs `cross_attention.<layer>` (batch, heads, tokens, encoder frames). The default path never runs
    it, so decoding without word timestamps costs exactly what it did.

    Keyed by what makes it: the content of decoder_model.onnx (hashed once per file version; the index is shared
    with the optimised copies, which hash the same file), a hash of this function's source (builder_digest) and
    onnx's version. A model re-converted into the same directory, or another package version whose builder
    differs, gets its own variant; `xdna compile --clear-cache` removes them."""
    import tempfile

    try:
        import onnx
        from onnx import helper
    except ImportError:
        raise TranscribeError("word timestamps need the onnx package: pip install 'onnxruntime-ep-xdna[whisper]'") from None
    from .._compile import _model_hash
    from .model import cache_root

    key = "-".join(str(x) for x in sorted(set(layers)))
    source = model_dir / FILES[1]
    root = cache_root(cache_dir)
    digest = f"{_model_hash(source, root / 'optimised')}-{builder_digest()}-onnx{onnx.__version__}"
    name = ATTENTION_DECODER.replace(".onnx", f".layers-{key}.onnx")
    candidates = [root / "attention" / digest / name,
                  model_dir / ATTENTION_DECODER.replace(".onnx", f".layers-{key}.{digest}.onnx")]
    for path in candidates:
        if path.is_file():
            return path
    graph_model = onnx.load(str(source))
    softmax = {}
    for node in graph_model.graph.node:
        if node.op_type == "Softmax" and "encoder_attn" in node.name:
            digits = [int(part.split(".")[1]) for part in node.name.split("/") if part.startswith("layers.")]
            if digits:
                softmax[digits[0]] = node.output[0]
    missing = [x for x in layers if x not in softmax]
    if missing:
        raise TranscribeError(f"{model_dir}: no cross-attention Softmax found for decoder layer(s) {missing}; "
                              "word timestamps need an optimum export of the eager attention")
    for layer in sorted(set(layers)):
        out = f"cross_attention.{layer}"
        graph_model.graph.node.append(helper.make_node("Identity", [softmax[layer]], [out]))
        graph_model.graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    data = graph_model.SerializeToString()
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # atomic: concurrent builders both write complete files
            return path
        except OSError:
            continue
    raise TranscribeError(f"cannot write the word-timing decoder into the cache ({root}) nor next to {model_dir}")


def builder_digest() -> str:
    """A hash of attention_decoder's own source (what the variant holds is decided there alone): a change of it
    keys new variants, a change elsewhere in this module does not. Without source (a sourceless install): the
    package version."""
    import hashlib
    import inspect

    try:
        text = inspect.getsource(attention_decoder)
    except (OSError, TypeError):
        from .. import __version__

        text = f"version {__version__}"
    return hashlib.sha256(f"{ATTENTION_DECODER}\n{text}".encode()).hexdigest()[:12]


class TranscribeError(Exception):
    """A model or provider problem, phrased for the user (one line)."""


def one_line(e: object) -> str:
    lines = str(e).strip().splitlines()
    return lines[-1].strip() if lines else type(e).__name__


def resolve_provider(provider: str) -> str:
    """'xdna' / 'cpu' / a full EP name -> the EP name, registering the XDNA plugin when it is asked for."""
    import onnxruntime as ort

    name = {"xdna": XDNA_EP, "cpu": CPU_EP}.get(provider.lower(), provider)
    if name == XDNA_EP:
        try:
            from .. import register

            register()
        except Exception as e:  # library missing, ABI mismatch, ...
            raise TranscribeError(f"the XDNA execution provider is not available ({one_line(e)}); "
                                  "use --provider cpu") from None
    if name not in ort.get_available_providers():
        raise TranscribeError(f"execution provider {name!r} is not available in this onnxruntime "
                              f"({', '.join(ort.get_available_providers())})")
    return name


def resolve_model_dir(model: str | os.PathLike, log: Callable[[str], None] = lambda m: None) -> Path:
    """A directory holding the ONNX export: a given DIR as is, otherwise `ensure_model` (fetch + convert once)."""
    p = Path(model)
    if p.is_dir() and (p / FILES[0]).is_file():
        return p
    try:
        from .model import ensure_model
    except ImportError as e:
        raise TranscribeError(f"model {model!r}: no export there and model fetching is unavailable ({e})") from None
    try:
        return Path(ensure_model(str(model), log=log))
    except Exception as e:
        raise TranscribeError(f"model {model!r} could not be prepared: {one_line(e)}") from None


class Window:
    """One encoded 30 s window: the encoder output and, once the decoder has seen it, the cross-attention K/V."""

    def __init__(self, encoded, timings: dict):
        self.encoded = encoded
        self.cross: dict | None = None  # past_key_values.N.encoder.{key,value} -> OrtValue (batch 1)
        self.timings = timings  # the transcription's own dict: concurrent transcriptions do not mix figures


class DecoderState:
    """Self-attention K/V of `batch` sequences (OrtValues as the session returned them) + the window's cross K/V."""

    def __init__(self, window: Window, self_kv: dict, batch: int):
        self.window, self.self_kv, self.batch = window, self_kv, batch


BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16, for OrtValue.ortvalue_from_shape_and_type


class _HostMemory:
    """Exposes one CPU OrtValue's memory to numpy (the array interface: no ctypes array type per call)."""

    __slots__ = ("__array_interface__",)

    def __init__(self, pointer: int, shape: tuple, typestr: str):
        self.__array_interface__ = {"data": (pointer, False), "shape": shape, "typestr": typestr, "version": 3}


def host_view(value) -> np.ndarray:
    """A numpy view of a CPU OrtValue's memory. `OrtValue.numpy()` for the types numpy has; a bfloat16 tensor (the
    self-attention cache of decoder_graph pass 7; numpy has no bfloat16, and numpy() raises) as uint16 over
    data_ptr(): the same bits, for code that moves values and never computes on them. The view does not keep
    `value` alive: use it while `value` is referenced."""
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()
    shape = tuple(value.shape())
    if 0 in shape:
        return np.empty(shape, np.uint16)
    return np.asarray(_HostMemory(value.data_ptr(), shape, "<u2"))


def ortvalue_like(rows: np.ndarray, data_type: str):
    """A new CPU OrtValue holding `rows` (uint16 bits when `data_type` is bfloat16, see host_view)."""
    import onnxruntime as ort

    if data_type != "tensor(bfloat16)":
        return ort.OrtValue.ortvalue_from_numpy(rows)
    value = ort.OrtValue.ortvalue_from_shape_and_type(list(rows.shape), BFLOAT16)
    host_view(value)[...] = rows
    return value


def run_ort_values(session, names: list[str] | None, feed: dict) -> list:
    """session.run_with_ort_values(names, feed), without the per-run cost of ORT's Python wrapper around it: the
    wrapper iterates the returned vector, whose end is a pybind11 StopIteration thrown as a C++ exception and
    unwound through the loaded libraries, ~45 us per run on the shared 2-core VM (a decoder step is one run per
    token; benchmarks/README.md, "Small EP calls"). Indexing the vector throws nothing. Any failure (or an ORT
    whose private names differ) goes through the public call, which keeps its own error handling and fallback."""
    import onnxruntime as ort

    raw = getattr(session, "_sess", None)
    try:
        c_feed = {n: v._get_c_value() for n, v in feed.items()}
        result = raw.run_with_ort_values(c_feed, names or [o.name for o in session.get_outputs()], None)
        return [ort.OrtValue(result[i]) for i in range(len(result))]
    except Exception:
        return session.run_with_ort_values(names, feed)


def reorder_rows(values: dict, order: np.ndarray) -> dict:
    """The batch rows `order` of each OrtValue: new OrtValues when the batch changes size; otherwise in place,
    copying only the rows that change. In place is safe because the values are the last run's outputs, owned by
    this decoding alone, and host_view() is a view of their memory: a beam step then neither allocates nor
    copies the rows that stay where they are (typically most of them). fp32 or bfloat16 (moved as uint16 bits)."""
    out = {}
    moved = np.flatnonzero(order != np.arange(order.size))  # the same for every value: found once
    sources = order[moved]
    for name, value in values.items():
        rows = host_view(value)
        if order.size != rows.shape[0]:
            out[name] = ortvalue_like(np.take(rows, order, axis=0), value.data_type())
            continue
        if moved.size:
            rows[moved] = rows[sources]  # the right side is gathered into a temporary first
        out[name] = value
    return out


class WhisperOnnx:
    """Sessions, tokenizer and special tokens of one Whisper ONNX export."""

    def __init__(self, model_dir: str | os.PathLike, provider: str = XDNA_EP, session_options=None,
                 precision: str | None = None, compiled: bool | None = None, optimised: bool | None = None,
                 log: Callable[[str], None] | None = None):
        """`compiled` (XDNA EP only; default: on unless XDNA_COMPILED_MODELS=0): load the encoder and decoders
        compiled for the EP (EPContext models, cached by `onnxruntime_ep_xdna._compile` per precision policy),
        compiling them on first use; a cached model that fails to load is logged, compiled again, and as a last
        resort the original model is loaded: never a failed transcription.
        `optimised` (any provider; default: on unless XDNA_OPTIMISED_DECODERS=0): run the decoders and the encoder
        from their leaner copies (decoder_graph.py: the same numbers with ~120 fewer nodes per step; the encoder's
        Reshape targets constant, so that the EP takes the nodes around its attention), built once and cached;
        a copy that fails to build or load is logged and the original is used."""
        import onnxruntime as ort
        import tokenizers

        self.model_dir = Path(model_dir)
        missing = [f for f in FILES + ("tokenizer.json", "config.json") if not (self.model_dir / f).is_file()]
        if missing:
            raise TranscribeError(f"{self.model_dir}: not a Whisper ONNX export (missing {', '.join(missing)})")
        self.provider = resolve_provider(provider)
        # precision: a policy for the XDNA EP's GEMMs (_precision.py); the CPU EP computes in fp32 whatever it says
        self.precision = (precision or "").strip() or None
        try:
            options = provider_options(self.precision) if self.provider == XDNA_EP else {}
        except ValueError as e:
            raise TranscribeError(f"--precision: {one_line(e)}") from None
        providers = [self.provider] if self.provider == CPU_EP else [
            (self.provider, options) if options else self.provider, CPU_EP]
        if session_options is None and self.provider == XDNA_EP:
            from .._placement import session_options as xdna_session_options

            session_options = xdna_session_options()  # placement recorded, ORT's thread spinning off (see there)
        if compiled is None:
            compiled = os.environ.get("XDNA_COMPILED_MODELS", "1") != "0"
        self.compiled = compiled and self.provider == XDNA_EP
        from . import decoder_graph

        self.optimised = decoder_graph.enabled() if optimised is None else optimised
        # Cross-attention K/V kept in bf16 (decoder_graph pass 4): for the XDNA EP, whose fused attention reads
        # them so and gives today's bits; not for the CPU EP nor where a policy asks for bf16x3 (more than bf16).
        self.bf16_cross_kv = (self.optimised and self.provider == XDNA_EP and decoder_graph.bf16_cross_kv_enabled()
                              and "bf16x3" not in " ".join(options.values()))
        # The self-attention cache too (pass 7), where the cross K/V are: the EP's MatMuls read it through their
        # Casts with the same bits.
        self.bf16_self_kv = self.bf16_cross_kv and decoder_graph.bf16_self_kv_enabled()
        # The encoder's copy (decoder_graph pass 9) for the XDNA EP where its fused attention stays: the EP's nodes
        # then give the original's bits. The CPU EP's own fusions of the copy, or bf16x3's unfused attention, round
        # differently: those keep optimum's encoder.
        self.optimised_encoder = (self.optimised and self.provider == XDNA_EP
                                  and "bf16x3" not in " ".join(options.values()))
        self.optimised_paths: dict[str, Path] = {}  # file -> the optimised copy its session was made from
        self._log = log or (lambda m: print(f"[xdna] {m}", file=sys.stderr))
        self.compiled_paths: dict[str, Path] = {}  # file -> the compiled model it was loaded from
        self._provider_options = options  # a compiled model is loaded with the options it was compiled with
        t = time.perf_counter()
        try:
            self.encoder, self.decoder, self.decoder_with_past = (
                self._session(f, session_options, providers) for f in FILES)
        except Exception as e:
            raise TranscribeError(f"{self.model_dir}: ONNX Runtime could not load the model ({one_line(e)})") from None
        if self.provider == XDNA_EP and any(XDNA_EP not in s.get_providers() for s in
                                            (self.encoder, self.decoder, self.decoder_with_past)):
            # ORT's Python API retries on the CPU EP alone when the EP refuses its options: say so, never run on
            # the CPU EP silently
            raise TranscribeError(f"the XDNA execution provider refused its options {options} (ONNX Runtime "
                                  "printed why above)")
        self._check_cross_kv_types(session_options, providers)
        self.load_seconds = time.perf_counter() - t

        self.tokenizer = tokenizers.Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        config = json.loads((self.model_dir / "config.json").read_text())
        gen_path = self.model_dir / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        self.n_mels = int(config.get("num_mel_bins", 80))
        self.mel_filters = mel_filter_bank(self.n_mels)
        self.vocab_size = int(config["vocab_size"])

        def token(text: str, default: int | None = None) -> int | None:
            tid = self.tokenizer.token_to_id(text)
            return default if tid is None else tid

        eot = int(gen.get("eos_token_id", config.get("eos_token_id", token("<|endoftext|>"))))
        sot = int(gen.get("decoder_start_token_id", config.get("decoder_start_token_id",
                                                                 token("<|startoftranscript|>"))))
        no_timestamps = int(gen.get("no_timestamps_token_id", token("<|notimestamps|>")))
        languages = {k.strip("<|>"): int(v) for k, v in (gen.get("lang_to_id") or {}).items()}
        multilingual = bool(gen.get("is_multilingual", self.vocab_size >= 51865)) and bool(languages)
        task_to_id = {k: int(v) for k, v in (gen.get("task_to_id") or {}).items()}
        blank = self.tokenizer.encode(" ", add_special_tokens=False).ids
        begin_suppress = gen.get("begin_suppress_tokens") or config.get("begin_suppress_tokens") or []
        self.tokens = SpecialTokens(
            eot=eot, sot=sot,
            sot_prev=int(gen.get("prev_sot_token_id", token("<|startofprev|>", sot + 103))),
            sot_lm=token("<|startoflm|>"),
            no_speech=token("<|nospeech|>", token("<|nocaptions|>", no_timestamps - 1)),
            no_timestamps=no_timestamps,
            transcribe=task_to_id.get("transcribe", token("<|transcribe|>")),
            translate=task_to_id.get("translate", token("<|translate|>")),
            blank=int(blank[0]) if len(blank) == 1 else int(next((t for t in begin_suppress if t != eot), 220)),
            languages=languages if multilingual else {},
            n_ctx=int(config.get("max_target_positions", 448)),
        )
        if self.tokens.timestamp_begin + N_TIMESTAMPS > self.vocab_size:
            raise TranscribeError(f"{self.model_dir}: the vocabulary has no timestamp tokens after <|notimestamps|>")
        self.model_suppress = [int(t) for t in (gen.get("suppress_tokens") or config.get("suppress_tokens") or [])]

        self._dec_outputs = [o.name for o in self.decoder.get_outputs()]
        from .decoder_graph import LOGITS_ROWS

        self._logits_rows = next((i.name for i in self.decoder.get_inputs() if i.name == LOGITS_ROWS), None)
        self._past_outputs = [o.name for o in self.decoder_with_past.get_outputs()]
        past_inputs = {i.name for i in self.decoder_with_past.get_inputs()}
        # present.N.{decoder,encoder}.{key,value} -> past_key_values.N.…; the with-past graph only re-emits the
        # self-attention (decoder) half, the cross-attention half stays what decoder_model produced.
        self._as_past = {o: o.replace("present.", "past_key_values.", 1) for o in self._dec_outputs[1:]}
        unknown = [p for p in self._as_past.values() if p not in past_inputs]
        if unknown:
            raise TranscribeError(f"{self.model_dir}: unexpected decoder inputs/outputs ({unknown[:2]}…); "
                                  "export with task automatic-speech-recognition-with-past")
        self_key = next(i for i in self.decoder_with_past.get_inputs() if i.name.endswith(".decoder.key"))
        self._kv_heads, self._kv_dim = int(self_key.shape[1]), int(self_key.shape[3])
        self._self_kv_type = self_key.type  # tensor(float), or tensor(bfloat16) after pass 7
        heads = gen.get("alignment_heads") or []
        self.alignment_heads = [(int(a), int(b)) for a, b in heads]  # (decoder layer, head), word timestamps
        if not self.alignment_heads:  # OpenAI's fallback: every head of the second half of the layers
            n_layers = int(config.get("decoder_layers", 0))
            self.alignment_heads = [(layer, h) for layer in range(n_layers // 2, n_layers)
                                    for h in range(self._kv_heads)]
        self._session_options = session_options
        self._providers = providers
        self._attention = None  # the word-timing decoder session, created on first use
        import threading

        self._attention_lock = threading.Lock()

    def _check_cross_kv_types(self, session_options, providers) -> None:
        """decoder_model's cross K/V outputs must have the types decoder_with_past takes (one of the two copies may
        have fallen back to its original): otherwise decoder_with_past is loaded again without the bf16 pass."""
        made = {o.name.replace("present.", "past_key_values.", 1): o.type for o in self.decoder.get_outputs()}
        taken = {i.name: i.type for i in self.decoder_with_past.get_inputs()}
        if all(made.get(name, kind) == kind for name, kind in taken.items()):
            return
        self._log("decoder_model and decoder_with_past_model disagree on the attention K/V types; "
                  "loading the bf16 one again without bf16 K/V")
        self.bf16_cross_kv = self.bf16_self_kv = False
        if "tensor(bfloat16)" in made.values():
            self.optimised_paths.pop(FILES[1], None)
            self.decoder = self._session(FILES[1], session_options, providers)
        else:
            self.optimised_paths.pop(FILES[2], None)
            self.decoder_with_past = self._session(FILES[2], session_options, providers)

    def _session(self, file: str, session_options, providers):
        original = self.model_dir / file
        source = self._optimised_copy(file) or original
        if source != original:
            try:
                session = self._session_of(source, file, session_options, providers)
                self.optimised_paths[file] = source
                return session
            except Exception as e:  # noqa: BLE001 - the copy is an optimisation: the original still runs
                from .decoder_graph import discard

                discard(source)
                self._log(f"{file}: the optimised copy {source} did not load ({one_line(e)}); using the original")
        return self._session_of(original, file, session_options, providers)

    def _optimised_copy(self, file: str) -> Path | None:
        """The cached leaner copy of a model file (decoder_graph.py), or None (off, no copy for it, failed)."""
        from . import decoder_graph

        if not self.optimised or file not in decoder_graph.OPTIMISED_FILES or \
                (file == decoder_graph.ENCODER_FILE and not self.optimised_encoder):
            return None
        try:
            return decoder_graph.optimised_copy(self.model_dir / file, log=self._log, bf16_kv=self.bf16_cross_kv,
                                                bf16_self=self.bf16_self_kv)
        except Exception as e:  # noqa: BLE001
            self._log(f"{file}: building its optimised copy failed ({one_line(e)}); using the original")
            return None

    def _session_of(self, source: Path, file: str, session_options, providers):
        import onnxruntime as ort

        if self.compiled:
            from .._compile import backend_name, cached_compile, discard_cached

            for attempt in (1, 2):
                try:
                    path, fresh = cached_compile(source, backend_name(self._provider_options),
                                                 options=self._provider_options, log=self._log)
                except Exception as e:  # noqa: BLE001 - compiling is an optimisation: the original model still runs
                    self._log(f"{file}: compiling for the XDNA EP failed ({one_line(e)}); loading it uncompiled")
                    break
                try:
                    session = ort.InferenceSession(str(path), sess_options=session_options, providers=providers,
                                                   enable_fallback=0)
                    self.compiled_paths[file] = path
                    return session
                except Exception as e:  # noqa: BLE001
                    discard_cached(path)
                    self._log(f"{file}: the compiled model {path} did not load ({one_line(e)}); "
                              + ("compiling it again" if attempt == 1 and not fresh else "loading it uncompiled"))
                    if fresh:
                        break
        # enable_fallback=0: a refused EP option raises the EP's reason, instead of onnxruntime's Python API
        # retrying on the CPU EP alone and only printing it
        return ort.InferenceSession(str(source), sess_options=session_options, providers=providers, enable_fallback=0)

    @property
    def is_multilingual(self) -> bool:
        return self.tokens.multilingual

    @property
    def lang_to_id(self) -> dict:
        return self.tokens.languages

    @staticmethod
    def _time(timings: dict, key: str, t0: float, steps: int = 0) -> None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
        if steps:
            timings["decoder_steps"] = timings.get("decoder_steps", 0) + steps

    # -- text --------------------------------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text` as Whisper prompts take it (with a leading space, no special tokens)."""
        return self.tokenizer.encode(" " + text.strip(), add_special_tokens=False).ids

    def text(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t < self.tokens.eot], skip_special_tokens=True)

    def language_of(self, token: int) -> str | None:
        return next((code for code, tid in self.tokens.languages.items() if tid == token), None)

    # -- the model ---------------------------------------------------------------------------------------------

    def encode(self, mel: np.ndarray, timings: dict | None = None) -> Window:
        """One window's encoder output; `timings` (a dict per transcription) collects the time spent on it."""
        import onnxruntime as ort

        timings = {} if timings is None else timings
        t0 = time.perf_counter()
        out = run_ort_values(self.encoder, None, {"input_features": ort.OrtValue.ortvalue_from_numpy(mel)})[0]
        self._time(timings, "encoder_s", t0)
        return Window(out, timings)

    def start(self, window: Window, prompt: Sequence[int], rows: Sequence[int] | None = None
              ) -> tuple[np.ndarray, DecoderState]:
        """The prompt through the decoder (batch 1): (logits (len(rows), vocab) of the prompt positions `rows`
        (None: all, (len, vocab)), state). The first prompt of a window also computes its cross-attention K/V;
        later ones reuse them through decoder_with_past. Logits are computed for `rows` only where the decoder
        copy takes xdna_logits_rows (decoder_graph pass 3), which saves the vocabulary projection of the others."""
        import onnxruntime as ort

        t0 = time.perf_counter()
        ids = ort.OrtValue.ortvalue_from_numpy(np.array([list(prompt)], dtype=np.int64))
        picked = np.arange(len(prompt), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        if picked.size == 0 or picked.min() < -len(prompt) or picked.max() >= len(prompt):
            raise ValueError(f"logits rows {list(picked)} outside a prompt of {len(prompt)} tokens")
        picked %= len(prompt)
        if window.cross is None:
            feed = {"input_ids": ids, "encoder_hidden_states": window.encoded}
            if self._logits_rows:
                feed[self._logits_rows] = ort.OrtValue.ortvalue_from_numpy(picked)
            out = run_ort_values(self.decoder, self._dec_outputs, feed)
            past = {self._as_past[n]: v for n, v in zip(self._dec_outputs[1:], out[1:])}
            window.cross = {k: v for k, v in past.items() if ".encoder." in k}
            self_kv = {k: v for k, v in past.items() if ".decoder." in k}
            logits = out[0].numpy()[0]
            if not self._logits_rows:
                logits = logits[picked]
        else:
            empty = ortvalue_like(np.zeros((1, self._kv_heads, 0, self._kv_dim), np.float32 if
                                           self._self_kv_type == "tensor(float)" else np.uint16), self._self_kv_type)
            feed = dict(window.cross)
            for name in self._as_past.values():
                if ".decoder." in name:
                    feed[name] = empty
            feed["input_ids"] = ids
            out = run_ort_values(self.decoder_with_past, self._past_outputs, feed)
            self_kv = {self._as_past[n]: v for n, v in zip(self._past_outputs[1:], out[1:])}
            logits = out[0].numpy()[0][picked]
        self._time(window.timings, "decoder_prompt_s", t0)
        return logits, DecoderState(window, self_kv, 1)

    def step(self, state: DecoderState, tokens: np.ndarray, order: np.ndarray | None
             ) -> tuple[np.ndarray, DecoderState]:
        """One token per sequence through decoder_with_past, all sequences in one call. `order` picks, for each
        new sequence, the row of the cache it continues (beam search); None keeps the rows as they are."""
        import onnxruntime as ort

        t0 = time.perf_counter()
        self_kv = state.self_kv
        if order is not None:
            # Only the self-attention cache (batch x heads x tokens x 64) follows the beams; the cross-attention
            # K/V stay batch 1 and are broadcast by the attention MatMuls.
            self_kv = reorder_rows(self_kv, np.asarray(order, dtype=np.int64))
        feed = dict(state.window.cross)
        feed.update(self_kv)
        feed["input_ids"] = ort.OrtValue.ortvalue_from_numpy(np.asarray(tokens, dtype=np.int64).reshape(-1, 1))
        out = run_ort_values(self.decoder_with_past, self._past_outputs, feed)
        new_kv = {self._as_past[n]: v for n, v in zip(self._past_outputs[1:], out[1:])}
        logits = out[0].numpy()[:, -1]
        self._time(state.window.timings, "decoder_steps_s", t0, steps=1)
        return logits, DecoderState(state.window, new_kv, len(tokens))


    def align(self, window: Window, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Word timing: `tokens` (sot sequence, <|notimestamps|>, text, <|endoftext|>) through the attention
        decoder variant: (logits (len, vocab), cross-attention of the alignment heads (heads, len, frames))."""
        import onnxruntime as ort

        with self._attention_lock:
            if self._attention is None:
                t = time.perf_counter()
                path = attention_decoder(self.model_dir, [layer for layer, _ in self.alignment_heads])
                try:
                    self._attention = ort.InferenceSession(str(path), sess_options=self._session_options,
                                                           providers=self._providers, enable_fallback=0)
                except Exception as e:
                    raise TranscribeError(f"{path}: ONNX Runtime could not load the word-timing decoder "
                                          f"({one_line(e)})") from None
                self._attention_outputs = ["logits"] + [f"cross_attention.{layer}" for layer in
                                                        sorted({layer for layer, _ in self.alignment_heads})]
                self._time(window.timings, "word_timing_load_s", t)
        t0 = time.perf_counter()
        ids = np.array([list(tokens)], dtype=np.int64)
        out = run_ort_values(self._attention, self._attention_outputs, {
            "input_ids": ort.OrtValue.ortvalue_from_numpy(ids), "encoder_hidden_states": window.encoded})
        per_layer = {int(n.split(".")[1]): v.numpy()[0] for n, v in zip(self._attention_outputs[1:], out[1:])}
        attention = np.stack([per_layer[layer][head] for layer, head in self.alignment_heads])
        logits = out[0].numpy()[0]
        self._time(window.timings, "word_timing_s", t0)
        return logits, attention


_MODEL_CACHE: dict[tuple[str, str, str], WhisperOnnx] = {}


def load_model(model: str | os.PathLike | WhisperOnnx = "base", provider: str = XDNA_EP,
               log: Callable[[str], None] = lambda m: None, precision: str | None = None) -> WhisperOnnx:
    """A WhisperOnnx for a model name or directory, cached per process (sessions are expensive to create).
    `precision`: the XDNA EP's precision policy (a mode, a named policy or rules: onnxruntime_ep_xdna._precision)."""
    if not isinstance(model, (str, os.PathLike)):  # a loaded model (or anything with its methods, e.g. a test fake)
        return model
    model_dir = resolve_model_dir(model, log)
    key = (str(model_dir.resolve()), provider, (precision or "").strip())
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = WhisperOnnx(model_dir, provider, precision=precision)
    return _MODEL_CACHE[key]
