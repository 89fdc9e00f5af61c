"""Compiled Whisper (issue 12): optimum's pipeline on EPContext models, the Whisper layer's cache of compiled
models (first run compiles, later runs load, a broken entry is logged and compiled again), `xdna compile`."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxruntime_ep_xdna as xdna

pytest.importorskip("optimum.onnxruntime", reason="the whisper extra is not installed")

from onnxruntime_ep_xdna import _compile  # noqa: E402
from onnxruntime_ep_xdna.cli import main as xdna_main  # noqa: E402
from onnxruntime_ep_xdna.whisper.model import make_tiny_random_whisper  # noqa: E402
from onnxruntime_ep_xdna.whisper.onnx_model import FILES, WhisperOnnx  # noqa: E402

EP = xdna.EP_NAME


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_random_whisper(tmp_path_factory.mktemp("tiny-compiled"), seed=1, multilingual=True)


def features(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 80, 3000)).astype(np.float32)


def context_ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def test_optimum_runs_on_compiled_files_with_the_same_tokens(tiny, tmp_path):
    """optimum's separate decoders (use_merged=False; the merged decoder's If branches read initializers of the
    outer graph, which ORT's EPContext model writer does not keep: see README, `xdna compile`)."""
    import torch
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq

    compiled = tmp_path / "compiled"
    shutil.copytree(tiny, compiled, ignore=shutil.ignore_patterns("*.onnx", "*.onnx_data"))
    for f in FILES:
        xdna.compile_model(tiny / f, compiled / f)
    assert "EPContext" in context_ops(compiled / "encoder_model.onnx")
    xdna.register()
    plain = ORTModelForSpeechSeq2Seq.from_pretrained(tiny, provider=EP, session_options=xdna.session_options(),
                                                     use_merged=False)
    fast = ORTModelForSpeechSeq2Seq.from_pretrained(compiled, provider=EP, session_options=xdna.session_options(),
                                                    use_merged=False)
    assert Path(fast.decoder.session._model_path).parent == compiled
    on_ep = xdna.placement(fast.encoder.session).on(EP)
    assert on_ep and {op for _, op in on_ep} == {"EPContext"}
    x = features()
    enc_plain = plain.encoder.session.run(None, {"input_features": x})[0]
    enc_fast = fast.encoder.session.run(None, {"input_features": x})[0]
    assert np.array_equal(enc_plain, enc_fast)
    kw = dict(max_new_tokens=8, language="en", task="transcribe")
    assert torch.equal(plain.generate(torch.from_numpy(x), **kw), fast.generate(torch.from_numpy(x), **kw))


def test_whisper_layer_compiles_once_then_loads_and_recompiles_a_broken_entry(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("XDNA_CACHE_DIR", str(tmp_path / "cache"))
    x = features(1)

    def run(w: WhisperOnnx) -> np.ndarray:
        return w.encoder.run(None, {"input_features": x})[0]

    reference = run(WhisperOnnx(tiny, "xdna", compiled=False))

    first: list[str] = []
    w1 = WhisperOnnx(tiny, "xdna", log=first.append)
    assert set(w1.compiled_paths) == set(FILES)
    assert sum("compiled" in m for m in first) == len(FILES), first
    assert np.array_equal(run(w1), reference)
    for path in w1.compiled_paths.values():
        assert path.is_relative_to(tmp_path / "cache" / "compiled") and "EPContext" in context_ops(path)

    second: list[str] = []
    w2 = WhisperOnnx(tiny, "xdna", log=second.append)
    assert second == [] and w2.compiled_paths == w1.compiled_paths  # loaded, not compiled again
    assert np.array_equal(run(w2), reference)

    encoder = w2.compiled_paths[FILES[0]]
    for side in encoder.parent.glob("*.xdnactx"):
        side.write_bytes(side.read_bytes()[:100])  # a corrupt cache entry (truncated by a crash, a full disk, ...)
    third: list[str] = []
    w3 = WhisperOnnx(tiny, "xdna", log=third.append)
    assert any("did not load" in m and "compiling it again" in m for m in third), third
    assert any("corrupt EPContext payload" in m for m in third), third
    assert FILES[0] in w3.compiled_paths and np.array_equal(run(w3), reference)

    optimised = tmp_path / "cache" / "optimised"  # the leaner decoder copies, derived from the models too
    assert optimised.is_dir() and any(optimised.iterdir())
    assert xdna_main(["compile", "--clear-cache"]) == 0
    assert not any((tmp_path / "cache" / "compiled").iterdir()) and not any(optimised.iterdir())


def test_concurrent_compiles_of_one_model_leave_one_complete_entry(tiny, tmp_path):
    model = tiny / FILES[0]
    results, errors = [], []

    def compile_it():
        try:
            results.append(_compile.cached_compile(model, "emulator", cache_dir=tmp_path))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=compile_it) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({path for path, _ in results}) == 1
    entries = [e for e in (tmp_path / "compiled").iterdir() if e.is_dir()]
    assert len(entries) == 1 and not entries[0].name.startswith(".tmp")
    path = results[0][0]
    xdna.register()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), xdna.session_options(), providers=[EP, "CPUExecutionProvider"])
    assert xdna.placement(sess).on(EP)


def test_xdna_compile_command(tiny, tmp_path, capsys):
    out = tmp_path / "enc.onnx"
    assert xdna_main(["compile", str(tiny / FILES[0]), "-o", str(out)]) == 0
    assert "compiled for the XDNA EP" in capsys.readouterr().out
    assert "EPContext" in context_ops(out) and list(tmp_path.glob("enc_*.xdnactx"))
    assert xdna_main(["compile", str(tiny / FILES[0]), "-o", str(tmp_path / "emb.onnx"), "--embed"]) == 0
    assert not list(tmp_path.glob("emb_*.xdnactx"))
    assert xdna_main(["compile", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "x.onnx")]) == 1


def test_whisper_layer_caches_one_compiled_model_per_precision_policy(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("XDNA_CACHE_DIR", str(tmp_path / "cache"))
    x = features(1)

    def run(w: WhisperOnnx) -> np.ndarray:
        return w.encoder.run(None, {"input_features": x})[0]

    reference = run(WhisperOnnx(tiny, "xdna", precision="int8", compiled=False))
    int8 = WhisperOnnx(tiny, "xdna", precision="int8", log=lambda m: None)
    assert np.array_equal(run(int8), reference)  # the int8 weights as stored: bit-identical
    bf16 = WhisperOnnx(tiny, "xdna", log=lambda m: None)
    assert not np.array_equal(run(bf16), reference)  # another policy, another cache entry, other numbers
    for f in FILES:
        a, b = int8.compiled_paths[f], bf16.compiled_paths[f]
        assert a.parent != b.parent and a.parent.name.endswith("-int8") and b.parent.name.endswith("-bf16")
    with pytest.raises(Exception) as e:  # an int8 compiled model in a bf16 session: refused, naming both
        xdna.register()
        import onnxruntime as ort

        ort.InferenceSession(str(int8.compiled_paths[FILES[0]]), xdna.session_options(),
                             providers=[EP, "CPUExecutionProvider"])
    assert "precision 'int8'" in str(e.value) and "this session: 'bf16'" in str(e.value)


def test_xdna_compile_precision_option(tiny, tmp_path, capsys):
    out = tmp_path / "enc8.onnx"
    assert xdna_main(["compile", str(tiny / FILES[0]), "-o", str(out), "--precision", "int8"]) == 0
    xdna.register()
    import onnxruntime as ort

    providers = [(EP, {"precision": "int8"}), "CPUExecutionProvider"]
    sess = ort.InferenceSession(str(out), xdna.session_options(), providers=providers)
    assert "EPContext" in {op for _, op in xdna.placement(sess).on(EP)}
    assert xdna_main(["compile", str(tiny / FILES[0]), "-o", str(out), "--precision", "int9"]) == 2
    assert "--precision" in capsys.readouterr().err
