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
from ep_helpers import (EP, IR_VERSION, OPSET, assert_within, bf16_bound, cpu_session, ep_nodes, init, make_model,
                        rng, tensor, xdna_session)


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


# ---- 8. CreateEpFactories when GetApi fails: no factory, *num_factories set

def test_create_ep_factories_without_api_reports_no_factory():
    lib = ctypes.CDLL(xdna.get_library_path())
    get_api = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)(lambda version: None)
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
    assert status is None  # no API table: no way to make a status
    assert num.value == 0
