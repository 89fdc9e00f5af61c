"""The decoders' optimised copies (whisper/decoder_graph.py): fewer nodes, the same numbers bit for bit, the same
MatMuls on the XDNA EP, and a cache that is built once, rebuilt when broken and can be switched off."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxruntime_ep_xdna as xdna
from onnxruntime_ep_xdna._precision import provider_options

pytest.importorskip("optimum.onnxruntime", reason="the whisper extra is not installed")

from onnxruntime_ep_xdna.whisper import decoder_graph  # noqa: E402
from onnxruntime_ep_xdna.whisper.model import make_tiny_random_whisper  # noqa: E402
from onnxruntime_ep_xdna.whisper.onnx_model import FILES, WhisperOnnx  # noqa: E402
from onnxruntime_ep_xdna.whisper.transcribe import transcribe_all  # noqa: E402

EP = xdna.EP_NAME
SR = 16_000
SHAPE_OPS = ("Shape", "Gather", "Unsqueeze", "Concat", "Slice")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_random_whisper(tmp_path_factory.mktemp("tiny-graph"), seed=2, multilingual=True)


@pytest.fixture(scope="module")
def copies(tiny, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("optimised")
    paths = {}
    for f in decoder_graph.DECODER_FILES:
        paths[f] = out / f
        decoder_graph.optimise(tiny / f, paths[f])
    return paths


def op_counts(path: Path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def feeds(session, batch: int, tokens: int, past: int, seed: int) -> dict:
    """Inputs as WhisperOnnx feeds them: `batch` sequences, the cross-attention K/V (and encoder output) at batch 1."""
    rng = np.random.default_rng(seed)
    feed = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feed[i.name] = rng.integers(0, 200, (batch, tokens)).astype(np.int64)
        elif i.name == "encoder_hidden_states":
            feed[i.name] = rng.standard_normal((1, 1500, i.shape[2])).astype(np.float32)
        elif ".encoder." in i.name:
            feed[i.name] = rng.standard_normal((1, i.shape[1], 1500, i.shape[3])).astype(np.float32)
        else:
            feed[i.name] = rng.standard_normal((batch, i.shape[1], past, i.shape[3])).astype(np.float32)
    return feed


def sessions(paths, provider_list):
    import onnxruntime as ort

    xdna.register()
    return [ort.InferenceSession(str(p), xdna.session_options(), providers=provider_list) for p in paths]


@pytest.mark.parametrize("provider", ["cpu", "xdna-bf16", "xdna-int8"])
def test_optimised_decoders_compute_the_same_bits_with_fewer_nodes(tiny, copies, provider):
    """Bit for bit on the CPU EP and on the XDNA EP in both precisions: the passes change no arithmetic. Cases:
    greedy (1 row) and beams (3 rows over batch-1 cross K/V), one token or a prompt, an empty or a filled cache."""
    providers = ["CPUExecutionProvider"] if provider == "cpu" else [
        (EP, {"precision": provider.split("-")[1]}), "CPUExecutionProvider"]
    for f, copy in copies.items():
        before, after = op_counts(tiny / f), op_counts(copy)
        assert after["MatMul"] == before["MatMul"]
        assert sum(after[o] for o in SHAPE_OPS) < sum(before[o] for o in SHAPE_OPS) - 20, (before, after)
        original, optimised = sessions([tiny / f, copy], providers)
        with_past = f == FILES[2]
        for batch, tokens, past in ([(1, 1, 7), (3, 1, 12), (1, 5, 0), (2, 3, 4)] if with_past else [(1, 4, 0)]):
            feed = feeds(original, batch, tokens, past, seed=batch * 100 + past)
            a = original.run(None, feed)
            if with_past:
                b = optimised.run(None, feed)
            else:  # pass 3: the logits of the rows asked for; all of them, then two
                b = optimised.run(None, feed | {decoder_graph.LOGITS_ROWS: np.arange(tokens, dtype=np.int64)})
                rows = np.array([0, tokens - 1], np.int64)
                two = optimised.run(None, feed | {decoder_graph.LOGITS_ROWS: rows})
                assert np.array_equal(two[0], a[0][:, rows]) and all(np.array_equal(x, y) for x, y in zip(two[1:], a[1:]))
            assert len(a) == len(b)
            for x, y in zip(a, b):
                assert x.shape == y.shape and np.array_equal(x, y), (f, batch, tokens, past)


def test_every_matmul_stays_on_the_xdna_ep(tiny, copies):
    for f, copy in copies.items():
        original, optimised = sessions([tiny / f, copy], [EP, "CPUExecutionProvider"])
        on_ep = [sorted(n for n, op in xdna.placement(s).on(EP) if op == "MatMul") for s in (original, optimised)]
        assert on_ep[0] and on_ep[0] == on_ep[1]


@pytest.fixture(scope="module")
def encoder_copy(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("optimised-encoder") / decoder_graph.ENCODER_FILE
    decoder_graph.optimise_encoder(tiny / decoder_graph.ENCODER_FILE, path)
    return path


@pytest.mark.parametrize("policy", ["bf16", "int8", "mixed"])
def test_optimised_encoder_same_bits_and_three_nodes_left_to_the_cpu_ep(tiny, encoder_copy, policy):
    """Pass 9: the encoder's shape work folded away, its output unchanged bit for bit on the XDNA EP under every
    policy that keeps its attention fused. The nodes the shape work kept from the EP's claims are taken: each
    self-attention LayerNormalization as its projections' A prologue, Q's scale into the attention's, the head
    splits and merges read through; the CPU EP keeps the final LayerNormalization (a graph output) only (the conv
    output's Transpose and the positional Add: the conv's, ops/conv.cc)."""
    source = tiny / decoder_graph.ENCODER_FILE
    before, after = op_counts(source), op_counts(encoder_copy)
    assert after["MatMul"] == before["MatMul"] and after["Shape"] == 0 < before["Shape"], (before, after)
    original, optimised = sessions([source, encoder_copy], [(EP, provider_options(policy)), "CPUExecutionProvider"])
    mels = original.get_inputs()[0].shape[1]
    for batch in (1, 2):
        features = np.random.default_rng(batch).standard_normal((batch, mels, 3000)).astype(np.float32)
        a, b = (s.run(None, {"input_features": features})[0] for s in (original, optimised))
        assert a.shape == b.shape and np.array_equal(a, b), batch
    placed = [xdna.placement(s) for s in (original, optimised)]
    left = [collections.Counter(op for _, op in p.on("CPUExecutionProvider")) for p in placed]
    assert left[1] == {"LayerNormalization": 1}, left[1]
    assert left[0]["LayerNormalization"] > 1 and left[0]["Shape"] > 0  # what the pass took from the CPU EP
    assert sorted(n for n, op in placed[0].on(EP) if op == "MatMul") == \
        sorted(n for n, op in placed[1].on(EP) if op == "MatMul")


def test_encoder_copy_only_where_it_keeps_the_bits(tiny, tmp_path, monkeypatch):
    """The CPU EP's own fusions of the copy (and the bf16x3 policy, which unfuses the EP's attention) round its
    output differently from the original's: those keep optimum's encoder."""
    monkeypatch.setenv("XDNA_CACHE_DIR", str(tmp_path / "cache"))
    assert decoder_graph.ENCODER_FILE in WhisperOnnx(tiny, "xdna", compiled=False).optimised_paths
    for provider, precision in (("cpu", None), ("xdna", "bf16x3")):
        w = WhisperOnnx(tiny, provider, precision=precision, compiled=False)
        assert set(w.optimised_paths) == set(decoder_graph.DECODER_FILES), (provider, precision)


def test_position_work_folded(tiny, copies):
    """Pass 10: no Shape of a Range (its length is the dimension it was made from) and no Unsqueeze of an
    Unsqueeze left in the copies (the bits: test_optimised_decoders_compute_the_same_bits_with_fewer_nodes)."""
    for f, copy in copies.items():
        g = onnx.load(str(copy), load_external_data=False).graph
        made_by = {o: n.op_type for n in g.node for o in n.output}
        before = op_counts(tiny / f)
        assert not [n.name for n in g.node if n.op_type == "Shape" and made_by.get(n.input[0]) == "Range"], f
        assert not [n.name for n in g.node if n.op_type == "Unsqueeze" and made_by.get(n.input[0]) == "Unsqueeze"], f
        assert op_counts(copy)["Unsqueeze"] < before["Unsqueeze"]


@pytest.mark.parametrize("inner, outer, expected", [
    ([0], [1], [0, 1]), ([0], [1, 3], [0, 1, 3]), ([1], [0], [0, 2]), ([0, 1], [2], [0, 1, 2]), ([2], [0], [0, 3]),
    ([0], [-1], None)])
def test_merged_unsqueeze_axes(inner, outer, expected):
    assert decoder_graph._merged_unsqueeze_axes(inner, outer) == expected
    if expected is not None:  # as numpy's expand_dims does it, on a [5, 6] tensor
        x = np.zeros((5, 6))
        assert np.expand_dims(np.expand_dims(x, inner), outer).shape == np.expand_dims(x, expected).shape


@pytest.mark.parametrize("source, target, expected", [
    (["b", "t", 512], ["b", "t", 8, 64], [0, 0, 8, 64]),
    (["b", "t", 8, 64], ["b", "t", 512], [0, 0, 512]),
    (["b", 512], ["b", "t2", 64], [0, -1, 64]),  # one dim neither known nor copied: -1
    (["b", "t"], [8, "b*t"], [8, -1]),
    (["a", "b"], ["x", "y"], None),  # two such dims: left alone
    (["b", None], ["b", 4], None),  # an unknown dim proves nothing
])
def test_constant_reshape_target(source, target, expected):
    assert decoder_graph.constant_reshape_target(source, target) == expected


def broadcast_model(op: str, reader: str):
    """x [1, s] int64 positions broadcast to y's [b, s] by `op` (Tile by y's shape, or Expand to it), then
    Gather(table, .) -> Cast -> `reader` with h [b, s, 4]; the table [10, 4] is a constant."""
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4) / 7, "table")
    nodes = [helper.make_node("Shape", ["y"], ["y_shape"])]
    if op == "Tile":  # repeats [b, 1]: y's shape with its last dim replaced by 1
        nodes += [helper.make_node("Constant", [], ["idx0"], value=helper.make_tensor("i0", TensorProto.INT64, [1], [0])),
                  helper.make_node("Gather", ["y_shape", "idx0"], ["b"], axis=0),
                  helper.make_node("Constant", [], ["one"], value=helper.make_tensor("o", TensorProto.INT64, [1], [1])),
                  helper.make_node("Concat", ["b", "one"], ["repeats"], axis=0),
                  helper.make_node("Tile", ["x", "repeats"], ["wide"])]
    else:
        nodes += [helper.make_node("Expand", ["x", "y_shape"], ["wide"])]
    nodes += [helper.make_node("Gather", ["table", "wide"], ["emb"], axis=0),
              helper.make_node("Cast", ["emb"], ["emb32"], to=TensorProto.FLOAT)]
    if reader == "Add":
        nodes.append(helper.make_node("Add", ["h", "emb32"], ["out"]))
    else:  # a reader that does not broadcast: the Tile/Expand must stay
        nodes.append(helper.make_node("Identity", ["emb32"], ["out"]))
    graph = helper.make_graph(
        nodes, "broadcast", [helper.make_tensor_value_info("x", TensorProto.INT64, [1, "s"]),
                             helper.make_tensor_value_info("y", TensorProto.INT64, ["b", "s"]),
                             helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", "s", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [table])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op", ["Tile", "Expand"])
@pytest.mark.parametrize("reader", ["Add", "Identity"])
def test_broadcasts_the_reader_makes_anyway_are_dropped(op, reader):
    """Pass 6: a Tile/Expand whose uses reach a broadcasting Add through Gather and Cast is dropped with the shape
    work that fed it, same numbers; where a reader needs the full shape (Identity: a graph output) it stays."""
    import onnxruntime as ort

    model = broadcast_model(op, reader)
    before = model.SerializeToString()
    dropped = decoder_graph.drop_absorbed_broadcasts(model)
    ops = [n.op_type for n in model.graph.node]
    assert (dropped, op in ops) == ((1, False) if reader == "Add" else (0, True)), ops
    if reader == "Add" and op == "Tile":
        assert "Concat" not in ops and "Shape" not in ops  # its repeats' shape work went with it
    rng = np.random.default_rng(3)
    feed = {"x": rng.integers(0, 10, (1, 5)).astype(np.int64), "y": np.zeros((3, 5), np.int64),
            "h": rng.standard_normal((3, 5, 4)).astype(np.float32)}
    run = [ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, feed)[0]
           for m in (before, model.SerializeToString())]
    assert run[0].shape == run[1].shape == (3, 5, 4) and np.array_equal(run[0], run[1])


def chirp(seconds: float, seed: int = 0) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def test_whisper_layer_builds_the_copies_once_and_falls_back_when_they_break(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("XDNA_CACHE_DIR", str(tmp_path / "cache"))
    audio = chirp(6.0, seed=4)

    def tokens(w):
        r = transcribe_all(audio, w, beam_size=2, sample_len=12, temperature=0)
        return [t for s in r.segments for t in s.tokens]

    plain = WhisperOnnx(tiny, "xdna", optimised=False, compiled=False)
    assert plain.optimised_paths == {}
    expected = tokens(plain)

    first: list[str] = []
    w1 = WhisperOnnx(tiny, "xdna", compiled=False, log=first.append)
    assert set(w1.optimised_paths) == set(decoder_graph.OPTIMISED_FILES) == set(FILES)
    assert sum(m.startswith("optimised") for m in first) == 3, first
    for path in w1.optimised_paths.values():
        assert path.is_relative_to(tmp_path / "cache" / "optimised")
    assert tokens(w1) == expected

    second: list[str] = []
    w2 = WhisperOnnx(tiny, "xdna", log=second.append)  # compiled from the copies: same tokens
    assert not any(m.startswith("optimised") for m in second) and w2.optimised_paths == w1.optimised_paths
    assert all("_ctx" in str(p) for p in w2.compiled_paths.values())
    assert tokens(w2) == expected

    broken = w1.optimised_paths[FILES[2]]
    broken.write_bytes(broken.read_bytes()[:1000])  # truncated by a crash or a full disk
    third: list[str] = []
    w3 = WhisperOnnx(tiny, "xdna", compiled=False, log=third.append)
    assert any("did not load" in m and "using the original" in m for m in third), third
    assert FILES[2] not in w3.optimised_paths and not broken.parent.exists()  # discarded: rebuilt next time
    assert tokens(w3) == expected
    fourth: list[str] = []
    w4 = WhisperOnnx(tiny, "xdna", compiled=False, log=fourth.append)
    assert FILES[2] in w4.optimised_paths and any(m.startswith("optimised decoder_with_past") for m in fourth)

    monkeypatch.setenv("XDNA_OPTIMISED_DECODERS", "0")
    assert WhisperOnnx(tiny, "cpu").optimised_paths == {}


def test_a_copy_that_cannot_be_built_leaves_the_original(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("XDNA_CACHE_DIR", str(tmp_path / "cache"))

    def fail(source, output, *pass_options):
        raise RuntimeError("symbolic shape inference gave up")

    monkeypatch.setattr(decoder_graph, "optimise", fail)
    log: list[str] = []
    w = WhisperOnnx(tiny, "cpu", log=log.append)
    assert w.optimised_paths == {}
    assert sum("building its optimised copy failed (symbolic shape inference gave up)" in m for m in log) == 2
    assert not [p for p in (tmp_path / "cache" / "optimised").iterdir() if p.name.startswith(".tmp")]


def test_bf16_cross_kv_on_the_xdna_ep_same_tokens_half_the_bytes(tiny, tmp_path, monkeypatch):
    """Pass 3 (XDNA EP only): decoder_model gives the cross-attention K/V in bf16, decoder_with_past takes them so
    and its Casts back to float run inside the EP's fused attentions; the tokens are those of the fp32 copies
    (the attention rounds K/V to bf16 as it reads them either way). The CPU EP and the bf16x3 policy keep fp32."""
    monkeypatch.setenv("XDNA_CACHE_DIR", str(tmp_path / "cache"))
    audio = chirp(6.0, seed=5)

    def tokens(w):
        r = transcribe_all(audio, w, beam_size=2, sample_len=12, temperature=0)
        return [t for s in r.segments for t in s.tokens]

    def cross_types(w):
        made = {o.type for o in w.decoder.get_outputs() if ".encoder." in o.name}
        taken = {i.type for i in w.decoder_with_past.get_inputs() if ".encoder." in i.name}
        return made, taken

    monkeypatch.setenv("XDNA_BF16_CROSS_KV", "0")
    fp32 = WhisperOnnx(tiny, "xdna", compiled=False)
    assert not fp32.bf16_cross_kv and cross_types(fp32) == ({"tensor(float)"}, {"tensor(float)"})
    expected = tokens(fp32)
    monkeypatch.delenv("XDNA_BF16_CROSS_KV")
    for compiled in (False, True):
        w = WhisperOnnx(tiny, "xdna", compiled=compiled)
        assert w.bf16_cross_kv and cross_types(w) == ({"tensor(bfloat16)"}, {"tensor(bfloat16)"})
        assert all("-bf16kv" in str(w.optimised_paths[f]) for f in decoder_graph.DECODER_FILES)
        assert w._logits_rows == decoder_graph.LOGITS_ROWS  # pass 3: start() asks for the rows it reads
        assert tokens(w) == expected
    w = WhisperOnnx(tiny, "xdna", compiled=False)
    on_ep = xdna.placement(w.decoder_with_past).on(EP)
    layers = sum(".encoder.key" in i.name for i in w.decoder_with_past.get_inputs())
    cross_casts = [n for n, op in on_ep if op == "Cast" and ".encoder." in n]  # (the self-attention's: pass 7)
    # every layer's two attentions fused: the cross- and the masked self-attention (its Softmax and NaN rule)
    assert len(cross_casts) == 2 * layers and [op for _, op in on_ep].count("Softmax") == 2 * layers, on_ep
    for provider, precision in (("cpu", None), ("xdna", "bf16x3")):
        other = WhisperOnnx(tiny, provider, precision=precision, compiled=False)
        assert not other.bf16_cross_kv and cross_types(other) == ({"tensor(float)"}, {"tensor(float)"})


def bf16_bits(value) -> np.ndarray:
    """A bfloat16 OrtValue's bits as uint16 (numpy has no bfloat16)."""
    import ctypes

    shape = value.shape()
    data = (ctypes.c_uint16 * int(np.prod(shape))).from_address(value.data_ptr())
    return np.frombuffer(data, np.uint16).copy().reshape(shape)


def test_cross_kv_cast_at_the_projection_same_bits_bf16_transposes(tiny, copies, tmp_path):
    """Passes 5 and 8: decoder_model's bf16 cross K/V are cast at their projection, before the head split's Reshape
    and Transpose (which then move bf16), and the EP's MatMul takes that Cast (writes its product in bf16); the
    attention reads the bf16 tensors through a Cast back to float. The outputs are the fp32 copy's K/V rounded to
    bf16, bit for bit, and the logits are unchanged; no Cast to bf16 is left to the CPU EP, which runs as many
    Transposes as before less the head splits its projections take."""
    import onnxruntime as ort

    from numerics import bf16_round

    source = tiny / FILES[1]
    bf16 = tmp_path / FILES[1]
    done = decoder_graph.optimise(source, bf16, bf16_kv=True)
    layers = sum(o.name.endswith(".encoder.key") for o in onnx.load(str(source), load_external_data=False).graph.output)
    assert done["cast_first"] == layers
    original, fp32, cast_first = sessions([source, copies[FILES[1]], bf16], [EP, "CPUExecutionProvider"])
    feed = feeds(original, 1, 5, 0, seed=7) | {decoder_graph.LOGITS_ROWS: np.array([0, 4], np.int64)}
    names = [o.name for o in fp32.get_outputs()]
    values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()}
    a = fp32.run_with_ort_values(names, values)
    b = cast_first.run_with_ort_values(names, values)
    for name, x, y in zip(names, a, b):
        if ".encoder." in name:
            expected = (bf16_round(x.numpy()).view(np.uint32) >> 16).astype(np.uint16)
            assert np.array_equal(bf16_bits(y), expected), name
        else:
            assert np.array_equal(x.numpy(), y.numpy()), name
    graph = onnx.load(str(bf16), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    split = [n for n in graph.node if n.name.endswith("/xdna_head_split")]
    assert len(split) == layers and all(n.output[0].endswith(".encoder.key") for n in split)
    at_projection = [n for n in graph.node if n.name.endswith("/xdna_cast_at_projection")]
    assert done["cast_at_projection"] == len(at_projection) == 2 * layers
    assert all(producer[n.input[0]].op_type in ("MatMul", "Add") for n in at_projection)
    on_cpu = xdna.placement(cast_first).on("CPUExecutionProvider")
    assert not [n for n, op in on_cpu if op == "Cast"], on_cpu  # each taken by its MatMul or attention
    assert {n.name for n in at_projection} <= {n for n, _ in xdna.placement(cast_first).on(EP)}
    # Each bf16 head split (Reshape, Transpose) taken by its projection too (ops/matmul.cc, claim_head_split_output):
    # the CPU EP runs one Transpose fewer per cross K/V than with the fp32 copy.
    cpu = [[n for n, op in xdna.placement(s).on("CPUExecutionProvider") if op == "Transpose"] for s in (fp32, cast_first)]
    assert len(cpu[1]) == len(cpu[0]) - 2 * layers and not {n.name for n in split} & set(cpu[1]), cpu
    assert {n.name for n in split} <= {n for n, _ in xdna.placement(cast_first).on(EP)}


def test_decoders_that_disagree_on_the_cross_kv_type_are_made_to_agree(tiny, tmp_path, monkeypatch):
    """A bf16 decoder_model copy next to an fp32 decoder_with_past (its bf16 copy failed to build): decoder_model is
    loaded again without the bf16 pass, logged, and decoding gives the fp32 tokens."""
    monkeypatch.setenv("XDNA_CACHE_DIR", str(tmp_path / "cache"))
    real = decoder_graph.optimise

    def with_past_fails(source, output, bf16_kv=False, *rest):
        if bf16_kv and Path(source).name == FILES[2]:
            raise RuntimeError("no space left")
        return real(source, output, bf16_kv, *rest)

    monkeypatch.setattr(decoder_graph, "optimise", with_past_fails)
    log: list[str] = []
    w = WhisperOnnx(tiny, "xdna", compiled=False, log=log.append)
    assert any("disagree on the attention K/V types" in m for m in log), log
    assert not w.bf16_cross_kv and not w.bf16_self_kv
    made = {o.type for o in w.decoder.get_outputs() if ".encoder." in o.name or ".decoder." in o.name}
    assert made == {"tensor(float)"}
    r = transcribe_all(chirp(3.0, seed=1), w, beam_size=2, sample_len=8, temperature=0)
    assert r.segments is not None


@pytest.fixture(scope="module")
def bf16_copies(tiny, tmp_path_factory) -> dict[bool, dict[str, Path]]:
    """Copies with the bf16 cross K/V (passes 4, 5), without and with the bf16 self-attention cache (pass 7)."""
    out = tmp_path_factory.mktemp("bf16-copies")
    paths: dict[bool, dict[str, Path]] = {}
    for self_kv in (False, True):
        paths[self_kv] = {}
        for f in decoder_graph.DECODER_FILES:
            paths[self_kv][f] = out / f"{'self' if self_kv else 'cross'}-{f}"
            done = decoder_graph.optimise(tiny / f, paths[self_kv][f], True, self_kv)
            assert (done["bf16_self_nodes"] > 0) == self_kv
    return paths


def decode_steps(decoder, with_past, seed: int, steps: int = 6) -> tuple[list, list]:
    """A prompt through decoder_model, then `steps` beam steps of 3 rows through decoder_with_past, the cache
    reordered between steps (onnx_model.reorder_rows, as the search does): (logits of every run, the last caches)."""
    import onnxruntime as ort

    from onnxruntime_ep_xdna.whisper.onnx_model import reorder_rows

    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, 200, (1, 5)).astype(np.int64)
    hidden = rng.standard_normal((1, 1500, decoder.get_inputs()[1].shape[2])).astype(np.float32)
    outs = [o.name for o in decoder.get_outputs()]
    past_outs = [o.name for o in with_past.get_outputs()]
    as_past = lambda n: n.replace("present.", "past_key_values.", 1)  # noqa: E731
    run = decoder.run_with_ort_values(outs, {"input_ids": ort.OrtValue.ortvalue_from_numpy(prompt),
                                             "encoder_hidden_states": ort.OrtValue.ortvalue_from_numpy(hidden),
                                             decoder_graph.LOGITS_ROWS: ort.OrtValue.ortvalue_from_numpy(
                                                 np.array([0, 4], np.int64))})
    logits = [run[0].numpy().copy()]
    past = {as_past(n): v for n, v in zip(outs[1:], run[1:])}
    cross = {k: v for k, v in past.items() if ".encoder." in k}
    cache = reorder_rows({k: v for k, v in past.items() if ".decoder." in k}, np.zeros(3, np.int64))
    for step in range(steps):
        feed = dict(cross, **cache)
        feed["input_ids"] = ort.OrtValue.ortvalue_from_numpy(rng.integers(0, 200, (3, 1)).astype(np.int64))
        run = with_past.run_with_ort_values(past_outs, feed)
        logits.append(run[0].numpy().copy())
        cache = {as_past(n): v for n, v in zip(past_outs[1:], run[1:])}
        cache = reorder_rows(cache, np.array([[0, 0, 1], [2, 1, 0], [1, 2, 2]][step % 3]))
    return logits, cache


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_bf16_self_kv_same_logits_bit_for_bit(tiny, bf16_copies, precision):
    """Pass 7 on the XDNA EP: the caches are bf16 (decoder_model's outputs, decoder_with_past's inputs and outputs),
    the Casts back to float run inside the EP's MatMuls, and the logits of a prompt and beam steps with reorders are
    those of the fp32-cache copy bit for bit; the cache holds the fp32 copy's keys times the K^T scale and values,
    rounded to bf16."""
    from numerics import bf16_round
    from onnxruntime_ep_xdna.whisper.onnx_model import host_view

    providers = [(EP, {"precision": precision}), "CPUExecutionProvider"]
    runs = {}
    for self_kv, paths in bf16_copies.items():
        decoder, with_past = sessions([paths[f] for f in decoder_graph.DECODER_FILES], providers)
        runs[self_kv] = decode_steps(decoder, with_past, seed=3)
        kinds = {i.type for i in with_past.get_inputs() if ".decoder." in i.name}
        kinds |= {o.type for s in (decoder, with_past) for o in s.get_outputs() if ".decoder." in o.name}
        assert kinds == ({"tensor(bfloat16)"} if self_kv else {"tensor(float)"})
        if self_kv:
            layers = sum(".decoder.key" in i.name for i in with_past.get_inputs())
            on_ep = xdna.placement(with_past).on(EP)
            casts = [n for n, op in on_ep if op == "Cast" and "decoder" in n]
            # per layer, K and V: the Cast back to float (read through by the attention) and the new rows' Cast to
            # bf16 with their Concat (the cache append, written by the projection's node)
            assert len(casts) == 4 * layers, casts
            assert sum(op == "Concat" for _, op in on_ep) == 2 * layers, on_ep
    for a, b in zip(runs[False][0], runs[True][0]):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    from onnx import numpy_helper

    graph = onnx.load(str(bf16_copies[True][FILES[2]]), load_external_data=False).graph
    scales = {i.name.split("/")[0].replace("present.", "past_key_values.", 1): numpy_helper.to_array(i)
              for i in graph.initializer if i.name.endswith("/xdna_key_scale")}
    for name, fp32 in runs[False][1].items():
        got = host_view(runs[True][1][name])
        want = host_view(fp32)
        if name.endswith(".key"):  # bf16(s * K), s the scale the graph's K^T was multiplied by
            want = want * scales[name]
        assert np.array_equal(got, (bf16_round(want).view(np.uint32) >> 16).astype(np.uint16)), name


def test_bf16_self_kv_copy_runs_without_the_ep(tiny, bf16_copies):
    """Where no EP reads through the Casts (the CPU EP alone: an old EP build or a refusal would leave them there
    too), the copy still runs, slower: its logits are those of K and V rounded to bf16, close to the fp32 cache's."""
    runs = {}
    for self_kv, paths in bf16_copies.items():
        decoder, with_past = sessions([paths[f] for f in decoder_graph.DECODER_FILES], ["CPUExecutionProvider"])
        runs[self_kv] = decode_steps(decoder, with_past, seed=4)[0]
    for a, b in zip(runs[False], runs[True]):
        assert np.all(np.isfinite(b)) and np.abs(a - b).max() <= 0.05 * np.abs(a).max(), np.abs(a - b).max()


def test_bf16_self_kv_refuses_a_graph_it_does_not_know(tiny, tmp_path):
    """All or nothing: a decoder_with_past whose keys are not read as a scaled K^T is refused (NotThisForm), so that
    the copy falls back as a whole and both decoders agree on the cache."""
    m = onnx.load(str(tiny / FILES[2]))
    decoder_graph.fold_shape_work(m)
    key = next(o.name for o in m.graph.output if o.name.endswith(".decoder.key"))
    m.graph.node.append(onnx.helper.make_node("Identity", [key], ["extra_reader"]))
    m.graph.output.append(onnx.helper.make_tensor_value_info("extra_reader", onnx.TensorProto.FLOAT, None))
    with pytest.raises(decoder_graph.NotThisForm, match="not read as Transpose"):
        decoder_graph.bf16_self_kv(m)


def test_whisper_onnx_decodes_the_same_tokens_with_the_bf16_self_kv(tiny, tmp_path, monkeypatch):
    """WhisperOnnx end to end (beam 2 and greedy, a second prompt on the window when a segment is cut: the empty bf16
    past): the same tokens and log-probabilities as with XDNA_BF16_SELF_KV=0, compiled or not."""
    monkeypatch.setenv("XDNA_CACHE_DIR", str(tmp_path / "cache"))
    audio = chirp(6.0, seed=5)

    def result(w, beams):
        r = transcribe_all(audio, w, beam_size=beams, sample_len=12, temperature=0)
        return [(s.tokens, s.avg_logprob, s.start, s.end) for s in r.segments]

    def prompts(w):
        """The window's first prompt (decoder_model) and a second one (decoder_with_past from an empty cache)."""
        window = w.encode(np.random.default_rng(1).standard_normal((1, w.n_mels, 3000)).astype(np.float32))
        prompt = [w.tokens.sot, w.tokens.transcribe, 300, 301]
        return [w.start(window, prompt, rows=[0, -1])[0] for _ in range(2)]

    monkeypatch.setenv("XDNA_BF16_SELF_KV", "0")
    fp32 = WhisperOnnx(tiny, "xdna", compiled=False)
    assert fp32.bf16_cross_kv and not fp32.bf16_self_kv and fp32._self_kv_type == "tensor(float)"
    expected = {beams: result(fp32, beams) for beams in (2, 1)}
    expected_prompts = prompts(fp32)
    monkeypatch.delenv("XDNA_BF16_SELF_KV")
    for compiled in (False, True):
        w = WhisperOnnx(tiny, "xdna", compiled=compiled)
        assert w.bf16_self_kv and w._self_kv_type == "tensor(bfloat16)"
        assert all("-bf16kv-self" in str(w.optimised_paths[f]) for f in decoder_graph.DECODER_FILES)
        for beams in (2, 1):
            assert result(w, beams) == expected[beams]
        for a, b in zip(prompts(w), expected_prompts):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert not WhisperOnnx(tiny, "cpu", compiled=False).bf16_self_kv


class _OriginalOutputs:
    """A session of a copy with extra graph outputs, seen with the original ones only (decode_steps maps outputs to
    the cache by position)."""

    def __init__(self, session, extra):
        self.session, self.extra = session, set(extra)

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return [o for o in self.session.get_outputs() if o.name not in self.extra]

    def run_with_ort_values(self, names, feed):
        return self.session.run_with_ort_values(names, feed)


def test_masked_self_attention_fused_logits_as_close_as_the_unfused(tiny, bf16_copies, tmp_path):
    """The decoders' masked self-attention (MatMul, Add(mask), Softmax, Where(IsNaN(P), 0, P), MatMul; the prompt
    with its causal mask, then beam steps) as one fused node on the XDNA EP: the logits stay as close to the CPU
    EP's fp32 ones as those of the same graph with the self-attention unfused (its Softmax also a graph output, which
    the claim refuses: bf16 QK^T and PV products, the softmax and mask on the CPU EP) - within twice the unfused
    copy's largest deviation, each run."""
    from onnx import helper

    paths = bf16_copies[True]
    unfused, extra = {}, {}
    for f in decoder_graph.DECODER_FILES:
        m = onnx.load(str(paths[f]))
        readers = collections.Counter(i for n in m.graph.node for i in n.input)
        softmaxes = [n.output[0] for n in m.graph.node
                     if n.op_type == "Softmax" and any(r.op_type == "IsNaN" and r.input[0] == n.output[0]
                                                       for r in m.graph.node)]
        assert softmaxes and all(readers[s] == 2 for s in softmaxes)
        m.graph.output.extend(helper.make_tensor_value_info(s, onnx.TensorProto.FLOAT, None) for s in softmaxes)
        unfused[f], extra[f] = tmp_path / f, softmaxes
        onnx.save(m, str(unfused[f]))
    providers = [(EP, {"precision": "bf16"}), "CPUExecutionProvider"]
    fused = sessions([paths[f] for f in decoder_graph.DECODER_FILES], providers)
    plain = [_OriginalOutputs(s, extra[f])
             for s, f in zip(sessions([unfused[f] for f in decoder_graph.DECODER_FILES], providers),
                             decoder_graph.DECODER_FILES)]
    cpu = sessions([paths[f] for f in decoder_graph.DECODER_FILES], ["CPUExecutionProvider"])
    layers = sum(".encoder.key" in i.name for i in fused[1].get_inputs())
    for a, b, f in zip(fused, plain, decoder_graph.DECODER_FILES):
        on_ep = [op for _, op in xdna.placement(a).on(EP)]
        assert on_ep.count("Softmax") == 2 * layers and on_ep.count("IsNaN") == layers, f
        assert [op for _, op in xdna.placement(b.session).on(EP)].count("Softmax") == layers, f  # cross only
    logits = {name: decode_steps(*s, seed=8)[0] for name, s in (("fused", fused), ("plain", plain), ("cpu", cpu))}
    for i, (a, b, c) in enumerate(zip(logits["fused"], logits["plain"], logits["cpu"])):
        fused_err, plain_err = np.abs(a - c).max(), np.abs(b - c).max()
        assert 0 < plain_err and fused_err <= 2 * plain_err, (i, fused_err, plain_err)
        assert not np.array_equal(a, b)  # the fused node really ran (other arithmetic, other bits)
