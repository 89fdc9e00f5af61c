"""Hostile and edge-case inputs (issue 14): every case gives the CPU EP's answer or a clear error, never a wrong
number, a hang, or memory corruption."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxruntime_ep_xdna as xdna
from ep_helpers import (EP, IR_VERSION, OPSET, assert_within, bf16_bound, bf16_round, cpu_session, ep_nodes, init,
                        make_model, rng, tensor, xdna_session)


# ---- 1. an initializer that is also a graph input may be fed: never a constant, in the main graph or an If branch

def overridable_weight_model(in_if_branch: bool) -> bytes:
    w = np.full((4, 3), 0.5, np.float32)
    inputs = [tensor("a", [2, 4]), tensor("w", [4, 3])]  # "w" is an input AND an initializer: overridable
    if not in_if_branch:
        nodes = [helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")]
    else:
        then_g = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["t"], name="mm_then")], "then", [],
                                   [tensor("t", [2, 3])])
        else_g = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["e"], name="mm_else")], "else", [],
                                   [tensor("e", [2, 3])])
        nodes = [helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
        inputs.append(tensor("c", [], TensorProto.BOOL))
    graph = helper.make_graph(nodes, "g", inputs, [tensor("y", [2, 3])], [init("w", w)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                             ir_version=IR_VERSION).SerializeToString()


@pytest.mark.parametrize("in_if_branch", [False, True])
def test_fed_overridable_initializer_is_used(in_if_branch):
    model = overridable_weight_model(in_if_branch)
    sess, ref = xdna_session(model), cpu_session(model)
    a = rng(1).standard_normal((2, 4)).astype(np.float32)
    fed = rng(2).standard_normal((4, 3)).astype(np.float32) * 10
    for feeds, w in (({"a": a}, np.full((4, 3), 0.5, np.float32)), ({"a": a, "w": fed}, fed)):
        if in_if_branch:
            feeds = dict(feeds, c=np.array(True))
        y = sess.run(None, feeds)[0]
        np.testing.assert_allclose(ref.run(None, feeds)[0], a.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)
        assert_within(y, a.astype(np.float64) @ w, bf16_bound(a, w, 4), f"w fed: {'w' in feeds}")
    on_ep = {name for name, _ in ep_nodes(sess)}
    assert on_ep >= ({"mm_then", "mm_else"} if in_if_branch else {"mm"}), "claimed as a run-time B"


def test_fed_overridable_initializer_in_nested_if_is_used():
    inner = [helper.make_graph([helper.make_node("MatMul", ["a", "w"], [o], name=f"mm_{o}")], o, [],
                               [tensor(o, [2, 3])]) for o in ("it", "ie")]
    then_g = helper.make_graph([helper.make_node("If", ["c"], ["t"], name="if_inner", then_branch=inner[0],
                                                 else_branch=inner[1])], "then", [], [tensor("t", [2, 3])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["e"], name="mm_e")], "else", [],
                               [tensor("e", [2, 3])])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g,
                                                else_branch=else_g)], "g",
                              [tensor("a", [2, 4]), tensor("w", [4, 3]), tensor("c", [], TensorProto.BOOL)],
                              [tensor("y", [2, 3])], [init("w", np.full((4, 3), 0.5, np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION).SerializeToString()
    sess = xdna_session(model)
    a = rng(1).standard_normal((2, 4)).astype(np.float32)
    fed = rng(2).standard_normal((4, 3)).astype(np.float32) * 10
    y = sess.run(None, {"a": a, "w": fed, "c": np.array(True)})[0]  # through both If levels
    assert_within(y, a.astype(np.float64) @ fed, bf16_bound(a, fed, 4))
    assert ("mm_it", "MatMul") in ep_nodes(sess)


# ---- 2. fork(): the child computes correctly and exits normally (it used to hang in exit())

# The emulator's pool alone (no ORT in the process): ORT's own threads also hang a fork()ed child's normal exit
# (seen with the CPU EP alone, in ORT's code), so the normal exit is tested without ORT, and the EP in a child
# that leaves with os._exit.
FORK_EMULATOR = textwrap.dedent("""
    import os, sys
    import numpy as np
    from onnxruntime_ep_xdna import _native as nat
    a = np.random.default_rng(1).standard_normal((512, 256)).astype(np.float32)
    b = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    packed = nat.pack_b(b)
    ref = nat.reference_gemm(a, packed)
    def ok():  # same contract, other summation order: 2 K 2^-23 |A|.|B|
        bound = 2 * 256 * 2.0**-23 * (np.abs(a).astype(np.float64) @ np.abs(b)) + 1e-30
        return bool(np.all(np.abs(nat.emulator_gemm(a, packed, threads=2) - ref) <= bound))
    assert ok()  # the pool's helper thread now exists in the parent
    pid = os.fork()
    if pid == 0:
        sys.exit(0 if ok() else 3)  # a normal exit: static destructors run
    _, status = os.waitpid(pid, 0)
    print("child status", os.waitstatus_to_exitcode(status))
    assert ok()
""")

FORK_EP = textwrap.dedent("""
    import os, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from ep_helpers import make_model, tensor, init, xdna_session, bf16_bound
    from onnx import helper
    w = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], [tensor("a", ["m", 256])],
                       [tensor("y", ["m", 256])], [init("w", w)])
    sess = xdna_session(model, {{"threads": "2"}})
    a = np.random.default_rng(1).standard_normal((512, 256)).astype(np.float32)
    exact = a.astype(np.float64) @ w
    def ok():
        return bool(np.all(np.abs(sess.run(None, {{"a": a}})[0] - exact) <= bf16_bound(a, w, 256)))
    assert ok()
    pid = os.fork()
    if pid == 0:
        os._exit(0 if ok() else 3)
    _, status = os.waitpid(pid, 0)
    print("child status", os.waitstatus_to_exitcode(status))
    assert ok()
""")


@pytest.mark.parametrize("code", [FORK_EMULATOR, FORK_EP], ids=["emulator-normal-exit", "ep-session"])
def test_forked_child_computes_and_exits(code):
    import pathlib

    code = code.format(tests=str(pathlib.Path(__file__).parent)) if code is FORK_EP else code
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the fork()ed child (or its parent) hung")
    assert out.returncode == 0, out.stderr
    assert "child status 0" in out.stdout, out.stdout + out.stderr


# ---- 7. the partition report is valid JSON whatever the node names and dims

def test_partition_report_with_control_characters_and_huge_dims(tmp_path):
    name = 'mm "quoted"\x01\n\ttab\\'
    w = rng(3).standard_normal((4, 4)).astype(np.float32)
    huge = [2**62] * 17  # declared, never run: 2*M*K*N*batch overflows a double
    model = make_model([helper.make_node("MatMul", ["a", "w"], ["y"], name=name),
                        helper.make_node("MatMul", ["b", "w"], ["z"], name="huge")],
                       [tensor("a", ["m", 4]), tensor("b", huge + [1, 4])],
                       [tensor("y", ["m", 4]), tensor("z", huge + [1, 4])], [init("w", w)])
    path = tmp_path / "model.onnx"
    path.write_bytes(model)
    report = xdna.partition(path, run=False)
    by_name = {d.node: d for d in report.decisions}
    assert by_name[name].claimed and by_name["huge"].claimed
    assert by_name["huge"].mflop == float("inf")  # written as null, read back as "too large"
    # run-time statistics path (written when the kernels are released)
    (tmp_path / "small.onnx").write_bytes(make_model([helper.make_node("MatMul", ["a", "w"], ["y"], name=name)],
                                                     [tensor("a", ["m", 4])], [tensor("y", ["m", 4])],
                                                     [init("w", w)]))
    report = xdna.partition(tmp_path / "small.onnx", run=True, dims={"m": 3})
    (d,) = report.decisions
    assert d.node == name and d.executed is not None and d.executed["cpu_calls"] + d.executed["device_calls"] == 1


def test_partition_with_a_refused_option_is_an_error_not_a_cpu_session(tmp_path, capsys):
    # onnxruntime's Python API would retry on the CPU EP alone and only print the reason (enable_fallback)
    w = rng(4).standard_normal((4, 4)).astype(np.float32)
    path = tmp_path / "model.onnx"
    path.write_bytes(make_model([helper.make_node("MatMul", ["a", "w"], ["y"])], [tensor("a", [2, 4])],
                                [tensor("y", [2, 4])], [init("w", w)]))
    with pytest.raises(Exception, match="bad value 'int9' for option 'precision'"):
        xdna.partition(path, provider_options={"precision": "int9"})
    assert "Falling back" not in capsys.readouterr().out


# ---- 8. CreateEpFactories when GetApi fails: no factory, *num_factories set, and the reason as a status when the
# runtime offers any API table at all (CreateStatus is in every version's)

@pytest.mark.parametrize("oldest_table", [False, True])
def test_create_ep_factories_without_api_reports_no_factory(oldest_table):
    lib = ctypes.CDLL(xdna.get_library_path())
    messages = []
    sentinel = 0x5A5A0
    create_status = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p)(
        lambda code, msg: messages.append((code, msg.decode())) or sentinel)

    class OldestApi(ctypes.Structure):  # OrtApi version 1 starts with CreateStatus
        _fields_ = [("CreateStatus", ctypes.c_void_p)]

    oldest = OldestApi(ctypes.cast(create_status, ctypes.c_void_p))
    get_api = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)(
        lambda version: ctypes.addressof(oldest) if oldest_table and version == 1 else None)
    get_version = ctypes.CFUNCTYPE(ctypes.c_char_p)(lambda: b"0.0.0")

    class ApiBase(ctypes.Structure):
        _fields_ = [("GetApi", ctypes.c_void_p), ("GetVersionString", ctypes.c_void_p)]

    base = ApiBase(ctypes.cast(get_api, ctypes.c_void_p), ctypes.cast(get_version, ctypes.c_void_p))
    factories = (ctypes.c_void_p * 4)()
    num = ctypes.c_size_t(99)
    create = lib.CreateEpFactories
    create.restype = ctypes.c_void_p
    create.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                       ctypes.POINTER(ctypes.c_size_t)]
    status = create(b"xdna", ctypes.addressof(base), None, factories, 4, ctypes.byref(num))
    assert num.value == 0
    if not oldest_table:
        assert status is None and messages == []  # no API table at all: nothing can carry an error
    else:
        assert status == sentinel
        ((code, msg),) = messages
        assert code == 9 and "ONNX Runtime >= 1.23" in msg  # ORT_NOT_IMPLEMENTED


# ---- 5. claimed nodes are fused in groups (one fused node per claimed node made session creation quadratic)

def info_so():
    so = ort.SessionOptions()
    so.log_severity_level = 1
    return so


def test_chain_is_fused_with_intermediates_inside_and_out(capfd):
    # x -> mm0 -> mm1 -> mm2 -> Relu (CPU) -> mm3 -> mm4 -> y; mm2's output is also a graph output
    ws = [rng(i).standard_normal((8, 8)).astype(np.float32) / 3 for i in range(5)]
    names = ["x", "h0", "h1", "h2", "r", "h3", "y"]
    nodes = [helper.make_node("MatMul", [names[i], f"w{i}"], [names[i + 1]], name=f"mm{i}") for i in range(3)]
    nodes.append(helper.make_node("Relu", ["h2"], ["r"], name="relu"))
    nodes += [helper.make_node("MatMul", [names[i + 1], f"w{i}"], [names[i + 2]], name=f"mm{i}") for i in (3, 4)]
    model = make_model(nodes, [tensor("x", [8, 8])], [tensor("y", [8, 8]), tensor("h2", [8, 8])],
                       [init(f"w{i}", w) for i, w in enumerate(ws)])
    sess = xdna_session(model, {"log_level": "info"}, so=info_so())
    x = rng(9).standard_normal((8, 8)).astype(np.float32)
    y, h2 = sess.run(None, {"x": x})
    # the same chain in numpy, every product rounded as the contract does (bf16 operands, exact products)
    h = x
    for i in range(5):
        h = (bf16_round(h).astype(np.float64) @ bf16_round(ws[i]).astype(np.float64)).astype(np.float32)
        if i == 2:
            np.testing.assert_allclose(h2, h, rtol=1e-5, atol=1e-5)
            h = np.maximum(h, 0)
    np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-5)
    assert {n for n, _ in ep_nodes(sess)} == {f"mm{i}" for i in range(5)}
    # mm0-mm2 have no CPU node before them, mm3-mm4 one: two fused nodes
    assert "claimed 5 of 5 MatMul/Gemm/Conv nodes, in 2 fused node(s)" in capfd.readouterr().err


def test_groups_never_make_a_cycle_through_a_cpu_node():
    # c = MatMul(Relu(a_out), a_out): mm_a and mm_c are connected directly AND through Relu. One fused node for both
    # would be a cycle (its output feeds Relu, which feeds it); they must stay in separate fused nodes.
    w = rng(1).standard_normal((6, 6)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["a"], name="mm_a"),
                        helper.make_node("Relu", ["a"], ["r"], name="relu"),
                        helper.make_node("MatMul", ["r", "a"], ["y"], name="mm_c")],
                       [tensor("x", [6, 6])], [tensor("y", [6, 6])], [init("w", w)])
    sess = xdna_session(model)
    x = rng(2).standard_normal((6, 6)).astype(np.float32)
    a = x.astype(np.float64) @ w
    r = np.maximum(a, 0)
    y = sess.run(None, {"x": x})[0]
    # bound: r and a carry mm_a's bf16 error (relative 2^-7 of |x|.|w|), then mm_c's own
    a_err = bf16_bound(x, w, 6)
    bound = bf16_bound(r, a, 6) + np.abs(r) @ a_err + a_err @ np.abs(a) + a_err @ a_err
    assert_within(y, r @ a, bound)
    assert {n for n, _ in ep_nodes(sess)} == {"mm_a", "mm_c"}


# ---- 3. hostile kernel directories, against the fake NPU device

def hostile_dir(tmp_path, name, edit, text_edit=None):
    """A valid one-kernel directory whose single manifest entry is edited by `edit(entry)`."""
    from test_xrt_backend import write_kernel_dir

    d = write_kernel_dir(tmp_path / name, [(64, 256, 256)])
    manifest = json.loads((d / "manifest.json").read_text())
    edit(manifest["kernels"][0])
    text = json.dumps(manifest)
    (d / "manifest.json").write_text(text_edit(text) if text_edit else text)
    return d


@pytest.mark.parametrize("field,value,text_edit", [
    ("m_rows", 2**58 + 256, None),  # m_rows x Kpad wrapped, stage_a wrote past a 32 KiB buffer
    ("K", 1e30, None),
    ("N", 2**40, None),
    ("K", "INF", lambda t: t.replace('"INF"', "inf")),  # the reader takes strtod's inf/nan: never cast them
    ("m_rows", "NAN", lambda t: t.replace('"NAN"', "nan")),
    ("m_rows", -256, None),
])
def test_manifest_sizes_out_of_range_are_refused(tmp_path, field, value, text_edit):
    from onnxruntime_ep_xdna import _native as nat

    d = hostile_dir(tmp_path, "k", lambda e: e.update({field: value}), text_edit)
    with pytest.raises(RuntimeError, match=r"no usable kernels.*m_rows in \[1, 65536\]"):
        nat.npu_fake_backend(str(d))


@pytest.mark.parametrize("target", ["../../../../etc/passwd", "/etc/passwd", "link", "sub/../../outside.bin"])
def test_manifest_paths_stay_inside_the_kernel_dir(tmp_path, target):
    from onnxruntime_ep_xdna import _native as nat

    (tmp_path / "outside.bin").write_bytes(b"\0" * 16)
    d = hostile_dir(tmp_path, "k", lambda e: e.update({"insts": target}))
    (d / "sub").mkdir()
    (d / "link").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(RuntimeError, match="no usable kernels.*(not a path relative|leaves the kernel directory|"
                                           "outside the kernel directory)"):
        nat.npu_fake_backend(str(d))


def test_oversized_kernel_files_are_refused(tmp_path):
    from onnxruntime_ep_xdna import _native as nat

    d = hostile_dir(tmp_path, "insts", lambda e: None)
    with open(d / "gemm_k64_n256_m256.insts.bin", "r+b") as f:
        f.truncate(65 << 20)  # sparse: 65 MiB of instructions
    with pytest.raises(RuntimeError, match="no usable kernels.*larger than"):
        nat.npu_fake_backend(str(d))
    d = hostile_dir(tmp_path, "manifest", lambda e: None)
    with open(d / "manifest.json", "a") as f:
        f.truncate(2 << 20)  # valid JSON followed by NULs: refused for its size before any parsing
    with pytest.raises(RuntimeError, match="larger than"):
        nat.npu_fake_backend(str(d))


def test_fifo_manifest_is_refused_without_blocking(tmp_path):
    import os

    d = tmp_path / "k"
    d.mkdir()
    os.mkfifo(d / "manifest.json")  # nobody writes: a blocking open() would wait for ever
    (d / "x.xclbin").write_bytes(b"x")
    code = ("from onnxruntime_ep_xdna import _native as nat\n"
            f"try:\n    nat.npu_fake_backend({str(d)!r})\nexcept RuntimeError as e:\n    print(e)\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("a FIFO named manifest.json blocked the manifest loader")
    assert "not a regular file" in out.stdout, out.stdout + out.stderr


def test_ep_session_with_hostile_manifest_is_a_clear_error(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("XDNA_XRT_SHIM", "fake")
    monkeypatch.delenv("XDNA_XRT_FAKE_FAULT", raising=False)
    d = hostile_dir(tmp_path, "k", lambda e: e.update({"m_rows": 2**58 + 256}))
    w = rng(4).standard_normal((64, 256)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], [tensor("a", ["m", 64])],
                       [tensor("y", ["m", 256])], [init("w", w)])
    sess = xdna_session(model, {"backend": "xrt", "kernel_dir": str(d)})
    assert "backend=xrt requested but unavailable" in capfd.readouterr().out
    assert EP not in sess.get_providers()
    sess = xdna_session(model, {"backend": "auto", "kernel_dir": str(d)})  # auto: the emulator, same numbers
    a = rng(5).standard_normal((300, 64)).astype(np.float32)
    assert_within(sess.run(None, {"a": a})[0], a.astype(np.float64) @ w, bf16_bound(a, w, 64))


# ---- 4. constant B with many tiny matrices: packing would pad each to a 64 x 256 block

def test_many_tiny_weight_matrices_stay_on_cpu_with_reason(tmp_path):
    w = rng(6).standard_normal((20000, 1, 1)).astype(np.float32)  # 80 KB; packed per matrix: 630 MB
    model = make_model([helper.make_node("MatMul", ["a", "w"], ["y"], name="tiny")], [tensor("a", [20000, 2, 1])],
                       [tensor("y", [20000, 2, 1])], [init("w", w)])
    (tmp_path / "m.onnx").write_bytes(model)
    (d,) = xdna.partition(tmp_path / "m.onnx").decisions
    assert not d.claimed and "packing pads its 20000 matrices" in d.reason
    sess = xdna_session(model)
    assert ep_nodes(sess) == []
    a = rng(7).standard_normal((20000, 2, 1)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"a": a})[0], a * w, rtol=1e-6)


def test_batched_weights_are_claimed_when_their_packing_is_bounded():
    w = rng(8).standard_normal((3, 64, 64)).astype(np.float32)  # 48 KB, packed 96 KB: within the bound
    model = make_model([helper.make_node("MatMul", ["a", "w"], ["y"], name="heads")], [tensor("a", [3, 4, 64])],
                       [tensor("y", [3, 4, 64])], [init("w", w)])
    sess = xdna_session(model)
    assert ep_nodes(sess) == [("heads", "MatMul")]
    a = rng(9).standard_normal((3, 4, 64)).astype(np.float32)
    assert_within(sess.run(None, {"a": a})[0], a.astype(np.float64) @ w, bf16_bound(a, w, 64))
    tiny = rng(8).standard_normal((8, 16, 16)).astype(np.float32)  # 8 KB, packed 256 KB: left to the CPU EP
    model = make_model([helper.make_node("MatMul", ["a", "w"], ["y"], name="heads")], [tensor("a", [8, 4, 16])],
                       [tensor("y", [8, 4, 16])], [init("w", tiny)])
    assert ep_nodes(xdna_session(model)) == []


# ---- 6. Conv: what ORT's CPU EP refuses, the EP refuses too (never some output)

def conv_model(attrs, x_dims, k=3):
    w = rng(10).standard_normal((2, 1, k)).astype(np.float32)
    return make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)], [tensor("x", x_dims)],
                      [tensor("y", ["n", 2, "u"])], [init("w", w)])


@pytest.mark.parametrize("attrs,x_dims,t", [
    (dict(strides=[2]), [1, 1, 2], 2),          # input shorter than the kernel: (2-3)/2 truncated to 0 -> length 1
    (dict(strides=[3]), ["n", 1, "t"], 2),      # the same with the length known only at run time
    (dict(), ["n", 1, "t"], 2),
    (dict(kernel_shape=[2]), [1, 1, 8], 8),     # kernel_shape contradicts W
])
def test_conv_inputs_the_cpu_ep_refuses_are_refused(attrs, x_dims, t):
    model = conv_model(attrs, x_dims)
    x = np.ones((1, 1, t), np.float32)
    with pytest.raises(Exception) as cpu_error:
        cpu_session(model).run(None, {"x": x})
    sess = xdna_session(model)
    with pytest.raises(Exception) as ep_error:
        sess.run(None, {"x": x})
    assert type(ep_error.value) is type(cpu_error.value)


def test_conv_valid_with_pads_fails_like_the_cpu_ep():
    model = conv_model(dict(auto_pad="VALID", pads=[1, 1]), [1, 1, 8])
    with pytest.raises(Exception, match="both 'auto_pad' and 'pads'"):
        cpu_session(model)
    with pytest.raises(Exception, match="both 'auto_pad' and 'pads'"):
        xdna_session(model)


def test_conv_valid_without_pads_runs_on_the_ep():
    model = conv_model(dict(auto_pad="VALID", kernel_shape=[3]), ["n", 1, "t"])
    sess = xdna_session(model)
    assert ep_nodes(sess) == [("conv", "Conv")]
    x = rng(11).standard_normal((2, 1, 9)).astype(np.float32)
    ref = cpu_session(model).run(None, {"x": x})[0]
    y = sess.run(None, {"x": x})[0]
    assert y.shape == ref.shape == (2, 2, 7)
    np.testing.assert_allclose(y, ref, rtol=0.02, atol=0.02 * np.abs(ref).max())
