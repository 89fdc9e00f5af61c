"""The work of one worker, the same in every engine (in-process, a local process, a Ray actor): load the model
once, then per input: decode the audio (here, in the worker), transcribe it, render every requested format.
The rendered text goes back to the driver, which alone writes outputs (jobs.commit).

Only the whisper package's public API is used (load through WhisperOnnx with our session options, so each
worker can be held to its share of the cores; transcribe_all; formats.render).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..whisper.options import TranscriptionOptions


@dataclass(frozen=True)
class WorkerConfig:
    model: str = "base"
    provider: str = "xdna"
    options: TranscriptionOptions = field(default_factory=TranscriptionOptions)
    formats: tuple[str, ...] = ("txt",)
    threads: int = 0  # ORT intra-op + EP emulator threads per worker; 0 = their defaults (all cores)
    precision: str | None = None  # the XDNA EP's precision policy (onnxruntime_ep_xdna._precision); None = bf16
    # Tests only: "SUBSTRING:DIR". The first time a worker starts an input whose path contains SUBSTRING it writes
    # its pid to DIR/held and waits (at most 60 s) so that a test can kill it mid-file.
    test_hold: str | None = None


# The files of a model directory whose content makes the transcript: the ONNX export's and the tokenizer/config
# files, or a CTranslate2 model's (converted on first use).
_MODEL_FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx", "model.bin",
                "config.json", "generation_config.json", "tokenizer.json", "preprocessor_config.json")


def _model_identity(model: str) -> dict:
    """A model as the completion records name it: a directory by its path and its files' sizes and mtimes (a
    model converted or copied into it again changes them; nothing is hashed), a registry name by the pinned
    packages it is built from."""
    from ..whisper.model import MODELS

    path = Path(model).expanduser()
    if model not in MODELS and path.is_dir():
        files = {}
        for name in _MODEL_FILES:
            try:
                st = (path / name).stat()
            except OSError:
                continue
            files[name] = [st.st_size, st.st_mtime_ns]
        return {"dir": str(path.resolve()), "files": files}
    if model in MODELS:
        return {"name": model, "packages": list(MODELS[model].packages)}
    return {"name": model}


def config_identity(config: "WorkerConfig") -> dict:
    """What makes an input's outputs besides the input itself: the model, the provider, the precision policy (as
    the EP would take it) and every decoding option. Threads, engine and test settings are not in it."""
    import dataclasses

    provider = config.provider.lower()
    precision = None
    if provider in ("xdna", "xdnaexecutionprovider"):
        precision = (config.precision or "").strip()
        if precision != "auto":  # "auto" is the machine's choice (auto_policy), named as such
            try:
                from .._precision import provider_options

                precision = provider_options(precision)  # a named policy by its rules
            except Exception:  # noqa: BLE001 - a bad policy fails in the worker, with its message
                pass
    return {"model": _model_identity(config.model), "provider": provider, "precision": precision,
            "options": dataclasses.asdict(config.options)}


def config_key(config: "WorkerConfig") -> str:
    import hashlib
    import json

    text = json.dumps(config_identity(config), sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ConfigError(Exception):
    """The model, provider or options cannot work for any input (the batch stops: nothing would succeed)."""


class Worker:
    def __init__(self, config: WorkerConfig):
        from ..whisper import OptionsError, TranscribeError, WhisperOnnx
        from ..whisper.onnx_model import resolve_model_dir

        self.config = config
        try:
            so = None
            if config.threads > 0 or config.provider.lower() in ("xdna", "xdnaexecutionprovider"):
                import onnxruntime as ort

                from .. import session_options

                so = session_options(ort.SessionOptions())
                if config.threads > 0:
                    so.intra_op_num_threads = config.threads
                    so.inter_op_num_threads = 1
                    so.add_session_config_entry("ep.xdnaexecutionprovider.threads", str(config.threads))
            self.model = WhisperOnnx(resolve_model_dir(config.model), config.provider, session_options=so,
                                     precision=config.precision)
            # The model-level checks of transcribe() (English-only model and --language/--task, unknown language)
            # on a second of silence: a configuration that fails every file fails here, once.
            import numpy as np

            from ..whisper import transcribe

            transcribe(np.zeros(16000, dtype=np.float32), self.model, config.options)
        except (TranscribeError, OptionsError) as e:
            raise ConfigError(str(e)) from None
        self.provider = self.model.provider

    def run(self, source: str) -> dict:
        """Transcribes one input: {"ok": True, "rendered": {fmt: text}, duration, language, time, provider} or
        {"ok": False, "error": one line} for a problem of this input (its audio, or anything else raised)."""
        from ..whisper import transcribe_all
        from ..whisper.formats import render

        self._maybe_hold(source)
        t = time.perf_counter()
        from .jobs import is_uri

        if is_uri(source):
            return {"ok": False, "time": 0.0, "error": f"{source}: URIs are not decoded by this version; mount the "
                    "storage (NFS, s3fs, gcsfuse, rclone mount) at the same path on every worker and give paths"}
        try:
            result = transcribe_all(source, self.model, self.config.options)
            rendered = {fmt: render(result, fmt) for fmt in self.config.formats}
        except Exception as e:  # this input fails; the worker and the batch go on
            lines = str(e).strip().splitlines()
            return {"ok": False, "error": (lines[-1].strip() if lines else type(e).__name__),
                    "time": round(time.perf_counter() - t, 3)}
        return {"ok": True, "rendered": rendered, "duration": round(result.duration, 3), "language": result.language,
                "time": round(time.perf_counter() - t, 3), "provider": self.provider, "host": os.uname().nodename,
                "pid": os.getpid()}

    def _maybe_hold(self, source: str) -> None:
        if not self.config.test_hold:
            return
        needle, _, d = self.config.test_hold.partition(":")
        if needle not in source:
            return
        try:
            fd = os.open(os.path.join(d, "held"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # held once already: this is the retry
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.05)
