"""Compiled models: ORT's compile API with the XDNA EP selected, and a cache of compiled models.

A compiled model replaces each group of nodes the EP claims by one `EPContext` node holding the group's plans and
packed weights, each in its node's precision (ep_plugin/ep_context.h), so that a session starts without reading or
packing the fp32 weights.
The payload lies in a side file next to the compiled model (memory-mapped at load), or inside it with `embed=True`.
A compiled model is tied to the EP version, its GEMM contract, the backend and the precision policy it was compiled
under (the `precision` / `precision_policy` options): the EP refuses any other, naming what differs. Load it with
the options it was compiled with.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def _xdna_session_options(options: dict | None, so=None):
    import onnxruntime as ort

    from . import EP_NAME, register, session_options

    register()
    so = session_options(so)
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise RuntimeError(f"{EP_NAME} offers no device to compile for")
    so.add_provider_for_devices(devices, {k: str(v) for k, v in (options or {}).items()})
    return so


def compile_model(model: str | os.PathLike | bytes, output: str | os.PathLike, *, embed: bool = False,
                  options: dict | None = None, so=None) -> Path:
    """Compiles `model` (a path or ONNX bytes) for the XDNA EP into `output` with ORT's compile API.

    `embed=False` (ORT's default) writes each EPContext payload to a side file next to `output`
    (`<output stem>_<partition>.xdnactx`); `embed=True` puts it inside the model (one file, read into memory at
    load). `options`: the EP's provider options (e.g. {"backend": "emulator"}). Returns `output`.

    ORT's basic graph optimizations run first (constant folding, identity elimination: portable, unlike the
    extended/layout ones), so that the EP claims what a session with optimizations would (a Conv whose bias comes
    through an Identity, as in optimum's Whisper encoder, is claimable only then).
    """
    import onnxruntime as ort

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    so = _xdna_session_options(options, so)  # ORT sets ep.context_file_path (side files are named from it)
    source = model if isinstance(model, bytes) else str(model)
    compiler = ort.ModelCompiler(so, source, embed_compiled_data_into_model=embed,
                                 graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    compiler.compile_to_file(str(output))
    return output


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:24]


def _model_files(path: Path) -> list[Path]:
    """The model file and its external-data files (named by the ONNX convention <model>.onnx_data / .data)."""
    extra = [p for p in (path.with_name(path.name + "_data"), path.with_name(path.name + ".data"),
                         path.with_suffix(".onnx_data")) if p.is_file()]
    return [path] + sorted(set(extra))


def _model_hash(path: Path, cache: Path) -> str:
    """Content hash of the model and its data files (see files_hash)."""
    return files_hash(_model_files(path), cache)


def files_hash(files: list[Path], cache: Path) -> str:
    """Content hash of `files`, remembered per (path, size, mtime) in `cache`/hashes.json so that a later start does
    not read hundreds of MB to find its cache entry (a rewritten file has a new mtime, so it is hashed again)."""
    import json

    files = [Path(f) for f in files]
    stamp = ";".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    index = cache / "hashes.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if stamp in known:
        return known[stamp]
    h = hashlib.sha256()
    for f in files:
        h.update(_file_hash(f).encode())
    digest = h.hexdigest()[:24]
    known[stamp] = digest
    try:  # best effort, atomic: a lost update only costs a later process one more hash
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=cache)
        with os.fdopen(fd, "w") as out:
            json.dump(known, out)
        os.replace(tmp, index)
    except OSError:
        pass
    return digest


_SOURCE_DIGESTS: dict[tuple, str] = {}


def source_digest(files) -> str:
    """A hash of the bytes of the source files of the code that builds a cache entry (e.g. whisper/decoder_graph.py),
    so that an entry made by other code (a pass changed without a version bump, another package version) is not
    found. A few hundred KB at most, read once per process per file version."""
    files = tuple(Path(f) for f in files)
    key = tuple((str(f), *((f.stat().st_size, f.stat().st_mtime_ns) if f.is_file() else ())) for f in files)
    if key not in _SOURCE_DIGESTS:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0")
            try:
                h.update(f.read_bytes())
            except OSError:  # no source installed (a sourceless build): the package version stands in for it
                from . import __version__

                h.update(f"missing:{__version__}".encode())
            h.update(b"\0")
        _SOURCE_DIGESTS[key] = h.hexdigest()[:12]
    return _SOURCE_DIGESTS[key]


def backend_name(options: dict | None = None) -> str:
    """The backend the XDNA EP uses with `options` (its "backend" option, else what the EP's device reports)."""
    import onnxruntime as ort

    from . import EP_NAME, register

    chosen = (options or {}).get("backend", "auto")
    if chosen != "auto":
        return chosen
    register()
    for d in ort.get_ep_devices():
        if d.ep_name == EP_NAME:
            return d.ep_metadata.get("backend", "auto")
    return "auto"


def compiled_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where compiled models are cached: <the project's cache (XDNA_CACHE_DIR ...)>/compiled."""
    from .whisper.model import cache_root

    return cache_root(cache_dir) / "compiled"


def precision_key(options: dict | None) -> str:
    """The precision policy of `options` as a file-name-safe key: the mode, and a hash of the rules if any."""
    options = options or {}
    mode = str(options.get("precision", "bf16"))
    rules = str(options.get("precision_policy", "")).strip()
    return mode + (f"-rules{hashlib.sha256(rules.encode()).hexdigest()[:12]}" if rules else "")


_BUILD_ID: str | None = None


def ep_build_id() -> str:
    """A hash of the EP library itself: two builds with one version number (a development install, a rebuilt
    wheel) may plan the same model differently, so a cached compiled model names the build that made it."""
    global _BUILD_ID
    if _BUILD_ID is None:
        from . import get_library_path

        _BUILD_ID = _file_hash(Path(get_library_path()))[:12]
    return _BUILD_ID


def cache_key(model: Path, backend: str, cache: Path, options: dict | None = None) -> str:
    """Model content, EP version and build, onnxruntime's version (its compile API runs ORT's basic graph
    optimizations first, which may change between versions), this module's own code (compile_model), backend and
    precision policy: what a cached compiled model is valid for."""
    import onnxruntime as ort

    from . import __version__

    return (f"{_model_hash(model, cache)}-ep{__version__}-{ep_build_id()}-ort{ort.__version__}-"
            f"{source_digest([Path(__file__)])}-{backend}-{precision_key(options)}")


def cached_compile(model: str | os.PathLike, backend: str, *, cache_dir: str | os.PathLike | None = None,
                   options: dict | None = None, log=lambda m: None) -> tuple[Path, bool]:
    """The compiled form of `model` from the cache, compiled into it first if absent. Returns (path, compiled now).

    Concurrent processes (xdna batch workers, the server) may compile the same model at once: each compiles into
    its own temporary directory and renames it into place; the first rename wins, the others discard their copy.
    """
    model = Path(model)
    root = compiled_cache_root(cache_dir)
    entry = root / cache_key(model, backend, root, options)
    target = entry / (model.stem + "_ctx.onnx")
    if target.is_file():
        return target, False
    t0 = time.perf_counter()
    build_cache_entry(target, lambda path: compile_model(model, path, options={**(options or {}), "backend": backend}))
    log(f"compiled {model.name} for the XDNA EP ({backend}) in {time.perf_counter() - t0:.1f} s: {entry}")
    return target, True


def build_cache_entry(target: Path, build: Callable[[Path], T]) -> T:
    """Builds the cache entry (the directory target.parent) by `build(path)` into a temporary directory beside it,
    then renames that into place, so no reader ever sees half an entry. Concurrent builders (xdna batch workers,
    the server) each build their own; the first rename wins, the others drop theirs. Returns build's result."""
    entry = target.parent
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    try:
        result = build(tmp / target.name)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not target.is_file():  # not another process's finished entry: a stale or broken one
                shutil.rmtree(entry, ignore_errors=True)
                os.rename(tmp, entry)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def discard_cached(compiled: Path) -> None:
    """Removes one cache entry (e.g. after it failed to load)."""
    shutil.rmtree(Path(compiled).parent, ignore_errors=True)


CACHE_DIRS = ("compiled", "optimised", "attention")  # derived from the models; `xdna compile --clear-cache` empties them


def clear_cache(cache_dir: str | os.PathLike | None = None) -> tuple[int, int]:
    """Removes every cached compiled model, every optimised decoder copy (whisper/decoder_graph.py, under
    <cache>/optimised) and every word-timing decoder (whisper/onnx_model.py `attention_decoder`, <cache>/attention):
    all are derived from the models and rebuilt on demand. Returns (entries, bytes) removed."""
    root = compiled_cache_root(cache_dir)
    entries = size = 0
    for directory in (root.parent / name for name in CACHE_DIRS):
        if not directory.is_dir():
            continue
        for entry in directory.iterdir():
            if entry.is_dir():
                size += sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
                entries += not entry.name.startswith(".tmp")
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)  # hashes.json
    return entries, size
