"""Every ONNX case the EP claims (or must leave alone), through the whole EP, on every backend available and in
every precision (the `precision` option: bf16, int8, bf16x3), against ORT's CPU EP and float64 numpy. In the spirit
of ggml's test-backend-ops: one list of cases, each with its exact result and each precision's error bound
(tests/numerics.py); one loop over (case, backend, precision).

Backends: the emulator, and the xrt backend on the fake NPU device (kernels/xrt/fake_device.h) with kernels "built"
for the case's shapes and the cost model off, so that every product the EP sends to a device reaches it.

Placement is proven twice for every case: which nodes ORT assigned to the EP (its assignment info), and where
each product ran (the EP's run-time report: device calls, CPU calls by reason; never a fault, and on the fake
device never a shape it lacked), and in which precision (int8 keeps a run-time B in bf16; the fake device, like
the xrt backend, runs int8 where an i8_f32 kernel exists and declines bf16x3, whose products then run on the CPU
fallback in bf16x3).
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from cpu_isa import run_pytest_with_isa, unavailable
from ep_helpers import EP, cpu_session, ep_nodes, init, make_model, rng, tensor, use_fake_npu, xdna_session
from numerics import TINY, assert_within, int8_nan_rule, precision_bound
from test_xrt_int8 import write_kernel_dir as write_kernel_dir_int8

DISABLE_ALL = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
PRECISIONS = ["bf16", "int8", "bf16x3"]


@dataclass
class Run:
    feeds: dict
    exact: list  # float64 result per graph output (or the exact integers of a case left to the CPU EP)
    bound: object  # precision -> one bound per output (tests/numerics.py), or a list: the same in every precision
    int8_exact: list | None = None  # where int8's NaN rule makes the contract's result differ from `exact`

    def bounds(self, precision):
        return self.bound(precision) if callable(self.bound) else self.bound

    def exact_in(self, precision):
        return self.int8_exact if precision == "int8" and self.int8_exact is not None else self.exact


@dataclass
class Case:
    name: str
    model: bytes
    runs: list[Run]
    on_ep: list[str]  # op types ORT must assign to the EP
    gemms: list[tuple[int, int]] = field(default_factory=list)  # (K, N) of the products: kernels the fake NPU gets
    to_device: bool = True  # some product must reach the device (False: zero-size, or run-time B of few rows)
    level: object = None  # graph optimization level (None: ORT's default)
    runtime_b: bool = False  # B is given at run time (int8 then computes in bf16, bf16x3 packs it split)

    def __str__(self):
        return self.name


def exact_matmul(a, b):
    return np.matmul(np.asarray(a, np.float64), np.asarray(b, np.float64))


def matmul_run(feeds, a, b, runtime_b=False):
    return Run(feeds, [exact_matmul(a, b)], lambda p: [precision_bound(a, b, p, runtime_b)])


def kn(a_shape, b_shape):
    return (a_shape[-1], 1 if len(b_shape) == 1 else b_shape[-1])


# ---- the cases --------------------------------------------------------------------------------------------------

def matmul_constant_cases():
    shapes = [((7, 100), (100, 65)), ((300, 64), (64, 257)), ((2, 5, 33), (33, 17)), ((2, 3, 4, 9), (9, 5)),
              ((1, 1), (1, 1)), ((1, 512), (512, 3)), ((33,), (33, 17)), ((4, 33), (33,)),
              # batched constant B (matrices large enough that their padding stays within the packing bound)
              ((3, 4, 60), (3, 60, 50)), ((4, 60), (3, 60, 50))]
    for a_shape, b_shape in shapes:
        r = rng(sum(a_shape) + sum(b_shape))
        a = r.standard_normal(a_shape).astype(np.float32)
        b = r.standard_normal(b_shape).astype(np.float32)
        model = make_model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], [tensor("a", list(a_shape))],
                           [tensor("y", [None] * np.matmul(a, b).ndim)], [init("w", b)])
        yield Case(f"matmul_const_{a_shape}x{b_shape}", model, [matmul_run({"a": a}, a, b)], ["MatMul"],
                   [kn(a_shape, b_shape)])


def matmul_runtime_cases():
    shapes = [((1, 4, 30, 16), (1, 4, 16, 30)), ((1, 4, 30, 30), (1, 4, 30, 16)), ((2, 1, 5, 7), (1, 3, 7, 4)),
              ((9, 13), (13, 70)), ((6, 13), (2, 13, 5)), ((13,), (2, 13, 5)), ((2, 5, 13), (13,)), ((13,), (13,)),
              ((2, 40, 24), (2, 24, 33))]  # more rows than kUnpackedMaxM: packed per call, sent to the device
    for a_shape, b_shape in shapes:
        r = rng(len(a_shape) * 10 + len(b_shape) + sum(a_shape))
        a = r.standard_normal(a_shape).astype(np.float32)
        b = r.standard_normal(b_shape).astype(np.float32)
        model = make_model([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
                           [tensor("a", list(a_shape)), tensor("b", list(b_shape))],
                           [tensor("y", [None] * np.matmul(a, b).ndim)])
        rows = 1 if len(a_shape) == 1 else a_shape[-2]
        yield Case(f"matmul_runtime_{a_shape}x{b_shape}", model, [matmul_run({"a": a, "b": b}, a, b, True)],
                   ["MatMul"], [kn(a_shape, b_shape)], to_device=rows > 16, runtime_b=True)


GEMM_C = {"none": None, "const_n": "N", "const_mn": "MN", "const_scalar": "", "const_m1": "M1", "runtime_1n": "1N",
          "runtime_mn": "MN"}


def gemm_cases():
    M, K, N = 20, 70, 9  # M > kUnpackedMaxM: a run-time B is packed and reaches the device too
    alpha, beta = 0.75, -1.5
    for b_runtime in (False, True):
        for c_kind, c_dims in GEMM_C.items():
            for trans_a in (0, 1):
                for trans_b in (0, 1):
                    r = rng(trans_a * 100 + trans_b * 10 + list(GEMM_C).index(c_kind) + 1000 * b_runtime)
                    a = r.standard_normal((K, M) if trans_a else (M, K)).astype(np.float32)
                    b = r.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
                    c = None if c_dims is None else r.standard_normal(
                        tuple({"M": M, "N": N, "1": 1}[d] for d in c_dims)).astype(np.float32)
                    inputs, inits, feeds, names = [tensor("a", list(a.shape))], [], {"a": a}, ["a", "b"]
                    if b_runtime:
                        inputs.append(tensor("b", list(b.shape)))
                        feeds["b"] = b
                    else:
                        inits.append(init("b", b))
                    if c is not None:
                        names.append("c")
                        if c_kind.startswith("runtime"):
                            inputs.append(tensor("c", list(c.shape)))
                            feeds["c"] = c
                        else:
                            inits.append(init("c", c))
                    node = helper.make_node("Gemm", names, ["y"], name="gemm", transA=trans_a, transB=trans_b,
                                            alpha=alpha, beta=beta)
                    model = make_model([node], inputs, [tensor("y", [M, N])], inits)
                    a2, b2 = (a.T if trans_a else a), (b.T if trans_b else b)
                    exact = alpha * exact_matmul(a2, b2)
                    c_term = 0 if c is None else beta * c.astype(np.float64)
                    exact = exact + c_term
                    # alpha * C and + beta * C each round once in fp32
                    epilogue = 4 * 2.0**-24 * (np.abs(exact) + np.abs(c_term))

                    def bound(p, a2=a2, b2=b2, epilogue=epilogue, b_runtime=b_runtime):
                        return [abs(alpha) * precision_bound(a2, b2, p, b_runtime) + epilogue]

                    yield Case(f"gemm_tA{trans_a}_tB{trans_b}_C-{c_kind}_B-{'runtime' if b_runtime else 'const'}",
                               model, [Run(feeds, [exact], bound)], ["Gemm"], [(K, N)], runtime_b=b_runtime)


def matmul_add_cases():
    """ORT fuses MatMul+Add with a 2-D constant weight into Reshape->Gemm->Reshape before GetCapability; without
    optimizations the MatMul itself is claimed, with the Add as its epilogue's bias (kernels/gemm_contract.h)."""
    r = rng(1)
    a = r.standard_normal((2, 6, 48)).astype(np.float32)
    w = r.standard_normal((48, 40)).astype(np.float32)
    bias = r.standard_normal(40).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["a", "w"], ["h"], name="mm"),
                        helper.make_node("Add", ["h", "bias"], ["y"], name="add")],
                       [tensor("a", [2, 6, 48])], [tensor("y", [2, 6, 40])], [init("w", w), init("bias", bias)])
    exact = exact_matmul(a, w) + bias
    run = Run({"a": a}, [exact], lambda p: [precision_bound(a, w, p) + 2.0**-23 * np.abs(exact)])
    yield Case("matmul_add_as_gemm", model, [run], ["Gemm"], [(48, 40)])
    yield Case("matmul_add_unoptimized", model, [run], ["MatMul", "Add"], [(48, 40)], level=DISABLE_ALL)


def dynamic_shape_cases():
    r = rng(5)
    w = r.standard_normal((24, 40)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], [tensor("a", ["batch", "seq", 24])],
                       [tensor("y", ["batch", "seq", 40])], [init("w", w)])
    runs = []
    for shape in [(1, 1, 24), (2, 3, 24), (5, 300, 24), (1, 1, 24)]:
        a = r.standard_normal(shape).astype(np.float32)
        runs.append(matmul_run({"a": a}, a, w))
    yield Case("matmul_dynamic_shapes_across_runs", model, runs, ["MatMul"], [(24, 40)])


def transpose_fusion_cases():
    def case(name, nodes, feeds, a, b, on_ep, to_device=True):
        model = make_model(nodes, [tensor(n, list(v.shape)) for n, v in feeds.items()],
                           [tensor("y", list(np.matmul(a, b).shape))])
        return Case(name, model, [matmul_run(feeds, a, b, True)], on_ep, [kn(a.shape, b.shape)], to_device,
                    runtime_b=True)

    for m in (1, 3, 40):  # decoder with past: scores = Q . K^T, K kept as [1, 8, T, 64]; unpacked and packed paths
        q = rng(1).standard_normal((1, 8, m, 64)).astype(np.float32)
        k = rng(2).standard_normal((1, 8, 37, 64)).astype(np.float32)
        yield case(f"transpose_k_cache_m{m}", [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2], name="tr"),
                                               helper.make_node("MatMul", ["q", "kt"], ["y"], name="mm")],
                   {"q": q, "k": k}, q, k.transpose(0, 1, 3, 2), ["MatMul", "Transpose"], to_device=m > 16)
    for m in (2, 50):  # encoder head split: Q [1,T,H,D] -> [1,H,T,D] as A; K [1,S,H,D] -> [1,H,D,S] as B
        q = rng(3).standard_normal((1, m, 4, 32)).astype(np.float32)
        k = rng(4).standard_normal((1, 70, 4, 32)).astype(np.float32)
        yield case(f"transpose_head_split_m{m}",
                   [helper.make_node("Transpose", ["q"], ["qh"], perm=[0, 2, 1, 3], name="tq"),
                    helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 3, 1], name="tk"),
                    helper.make_node("MatMul", ["qh", "kt"], ["y"], name="mm")],
                   {"q": q, "k": k}, q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1),
                   ["MatMul", "Transpose", "Transpose"], to_device=m > 16)
    # A's K dimension not innermost (gathered), and a Transpose without perm (reverse) on a 2-D B; 24 rows: packed
    a = rng(5).standard_normal((2, 24, 24)).astype(np.float32)
    b = rng(6).standard_normal((10, 24)).astype(np.float32)
    yield case("transpose_a_last_dim_and_default_perm",
               [helper.make_node("Transpose", ["a"], ["at"], perm=[0, 2, 1], name="ta"),
                helper.make_node("Transpose", ["b"], ["bt"], name="tb"),
                helper.make_node("MatMul", ["at", "bt"], ["y"], name="mm")],
               {"a": a, "b": b}, a.transpose(0, 2, 1), b.T, ["MatMul", "Transpose", "Transpose"])
    # The transposed copy is needed by another node anyway: only the MatMul is claimed.
    q = rng(7).standard_normal((1, 2, 20, 16)).astype(np.float32)
    k = rng(8).standard_normal((1, 2, 9, 16)).astype(np.float32)
    kt = k.transpose(0, 1, 3, 2)
    model = make_model([helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2], name="tr"),
                        helper.make_node("MatMul", ["q", "kt"], ["y"], name="mm"),
                        helper.make_node("Relu", ["kt"], ["r"], name="relu")],
                       [tensor("q", list(q.shape)), tensor("k", list(k.shape))],
                       [tensor("y", [1, 2, 20, 9]), tensor("r", [1, 2, 16, 9])])
    yield Case("transpose_shared_stays_on_cpu", model,
               [Run({"q": q, "k": k}, [exact_matmul(q, kt), np.maximum(kt, 0).astype(np.float64)],
                    lambda p: [precision_bound(q, kt, p, True), 0.0])], ["MatMul"], [(16, 9)], runtime_b=True)


def conv_reference(x, w, bias, stride, dilation, pads):
    """(exact float64 result, precision -> [the contract's bound]) of a 1-D Conv, as the GEMM of im2col rows and
    the weights."""
    n, cin, t = x.shape
    cout, _, k = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[1])))
    span = dilation * (k - 1) + 1
    t_out = (t + pads[0] + pads[1] - span) // stride + 1
    cols = np.stack([xp[:, :, i * stride: i * stride + span: dilation] for i in range(t_out)], axis=1)
    cols = cols.reshape(n, t_out, cin * k)
    wt = w.astype(np.float64).reshape(cout, -1).T
    exact = (cols @ wt).transpose(0, 2, 1) + (0 if bias is None else bias[None, :, None])
    return exact, lambda p: [precision_bound(cols, wt, p).transpose(0, 2, 1) + 2.0**-23 * np.abs(exact)]


def conv_cases():
    for stride, dilation, pads, bias in [(1, 1, (1, 1), True), (2, 1, (1, 1), True), (1, 2, (0, 3), False),
                                         (3, 1, (0, 0), True), (4, 1, (2, 1), True), (1, 1, (2, 5), False)]:
        x = rng(1).standard_normal((2, 12, 50)).astype(np.float32)
        w = rng(2).standard_normal((20, 12, 3)).astype(np.float32)
        b = rng(3).standard_normal(20).astype(np.float32) if bias else None
        inputs = ["x", "w"] + (["b"] if bias else [])
        inits = [init("w", w)] + ([init("b", b)] if bias else [])
        model = make_model([helper.make_node("Conv", inputs, ["y"], name="conv", strides=[stride],
                                             dilations=[dilation], pads=list(pads), kernel_shape=[3])],
                           [tensor("x", ["n", 12, "t"])], [tensor("y", ["n", 20, "u"])], inits)
        runs = []
        for xr in (x, x[:1, :, :17].copy()):  # a second length in the same session (symbolic T)
            exact, bound = conv_reference(xr, w, b, stride, dilation, pads)
            runs.append(Run({"x": xr}, [exact], bound))
        yield Case(f"conv1d_s{stride}_d{dilation}_p{pads[0]}{pads[1]}_bias{int(bias)}", model, runs, ["Conv"],
                   [(36, 20)])


def cases_left_to_the_cpu_ep():
    """Claim rules that must say no: the CPU EP runs these, with its own (exact) numbers."""
    for dtype, np_dtype in [(TensorProto.DOUBLE, np.float64), (TensorProto.INT32, np.int32),
                            (TensorProto.FLOAT16, np.float16), (TensorProto.INT64, np.int64)]:
        a = np.arange(12).reshape(3, 4).astype(np_dtype)
        w = np.arange(8).reshape(4, 2).astype(np_dtype)
        model = make_model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], [tensor("a", [3, 4], dtype)],
                           [tensor("y", [3, 2], dtype)], [init("w", w)])
        yield Case(f"matmul_{np.dtype(np_dtype).name}_stays_on_cpu", model,
                   [Run({"a": a}, [np.matmul(a, w).astype(np.float64)], [0.0])], [], to_device=False)
    x4 = rng(5).standard_normal((1, 4, 10)).astype(np.float32)
    for name, node, inits, inputs, feeds, exact in [
        ("conv_2d", helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
         [init("w", np.ones((6, 4, 3, 3), np.float32))], [tensor("x", [1, 4, 8, 8])],
         {"x": np.ones((1, 4, 8, 8), np.float32)}, None),
        ("conv_grouped", helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=2),
         [init("w", np.ones((4, 2, 3), np.float32))], [tensor("x", [1, 4, 10])], {"x": x4}, None),
        ("conv_runtime_weight", helper.make_node("Conv", ["x", "w"], ["y"], name="conv"), [],
         [tensor("x", [1, 4, 10]), tensor("w", [6, 4, 3])], {"x": x4, "w": np.ones((6, 4, 3), np.float32)}, None),
        # a bias whose length is not the channel count: the CPU EP refuses it at run time, so the EP never claims it
        ("conv_bias_of_wrong_length", helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv"),
         [init("w", np.ones((6, 4, 3), np.float32)), init("b", np.ones(5, np.float32))], [tensor("x", [1, 4, 10])],
         {"x": x4}, None),
    ]:
        out_rank = 4 if name == "conv_2d" else 3
        model = make_model([node], inputs, [tensor("y", [None] * out_rank)], inits)
        yield Case(name, model, [Run(feeds, [exact], [0.0])], [], to_device=False)


def edge_cases():
    r = rng(6)
    a = r.standard_normal((6, 20)).astype(np.float32)
    w = r.standard_normal((20, 7)).astype(np.float32)
    a[1, 3], a[2, 5], a[3, 0] = np.nan, np.inf, -np.inf
    w[4, 2] = np.inf  # row 0 of A times inf in column 2; A[2,5]*W[5,:] adds inf too
    w[:, 6] = 0.0  # inf * 0 = nan in column 6 for rows 2, 3
    with np.errstate(invalid="ignore"):
        exact = (a.astype(np.float64)[:, :, None] * w.astype(np.float64)[None, :, :]).sum(axis=1)
    assert np.isnan(exact).any() and np.isinf(exact).any()
    finite_a, finite_w = np.nan_to_num(a, posinf=0, neginf=0, nan=0), np.nan_to_num(w, posinf=0)
    model = make_model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], [tensor("a", [6, 20])],
                       [tensor("y", [6, 7])], [init("w", w)])
    yield Case("nan_and_inf_propagate", model,
               [Run({"a": a}, [exact], lambda p: [precision_bound(finite_a, finite_w, p)],
                    int8_exact=[int8_nan_rule(exact, a, w)])], ["MatMul"], [(20, 7)])

    a = np.full((2, 3), 1e30, np.float32)
    w = np.full((3, 2), 1e5, np.float32)
    model = make_model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], [tensor("a", [2, 3])],
                       [tensor("y", [2, 2])], [init("w", w)])
    yield Case("large_values_within_bf16_range", model, [matmul_run({"a": a}, a, w)], ["MatMul"], [(3, 2)])

    for a_shape, b_shape in [((0, 8), (8, 5)), ((4, 0), (0, 5)), ((4, 8), (8, 0)), ((2, 0, 8), (8, 3))]:
        a, b = np.ones(a_shape, np.float32), np.ones(b_shape, np.float32)
        model = make_model([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
                           [tensor("a", [None] * len(a_shape)), tensor("b", [None] * len(b_shape))],
                           [tensor("y", [None] * len(a_shape))])
        yield Case(f"zero_size_{a_shape}x{b_shape}", model,
                   [Run({"a": a, "b": b}, [exact_matmul(a, b)], [TINY])], ["MatMul"], to_device=False, runtime_b=True)

    # huge K: the fp32 accumulation term of the bound (K * 2^-23) dominates
    a = rng(9).standard_normal((20, 20000)).astype(np.float32)
    w = rng(10).standard_normal((20000, 3)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], [tensor("a", [20, 20000])],
                       [tensor("y", [20, 3])], [init("w", w)])
    yield Case("huge_k", model, [matmul_run({"a": a}, a, w)], ["MatMul"], [(20000, 3)])


def all_cases():
    for group in (matmul_constant_cases, matmul_runtime_cases, gemm_cases, matmul_add_cases, dynamic_shape_cases,
                  transpose_fusion_cases, conv_cases, cases_left_to_the_cpu_ep, edge_cases):
        yield from group()


CASES = list(all_cases())


# ---- the backends -----------------------------------------------------------------------------------------------

def round_up(v, m):
    return (v + m - 1) // m * m


@pytest.fixture(scope="module")
def fake_kernel_dir(tmp_path_factory):
    """Kernels "built" for every (K, N) of the cases, bf16 and int8 (i8_f32): one manifest, so one fake NPU backend
    serves them all."""
    shapes = sorted({(round_up(k, 64), round_up(n, 256)) for case in CASES for k, n in case.gemms if k > 0 and n > 0})
    kernels = [(k, n, 256) for k, n in shapes]
    return write_kernel_dir_int8(tmp_path_factory.mktemp("kernels"), bf16=kernels, int8=kernels)


@pytest.fixture(params=["emulator", "npu-fake"])
def backend_options(request, monkeypatch):
    if request.param == "emulator":
        return {"backend": "emulator"}
    use_fake_npu(monkeypatch)
    # one xclbin per (dtype, K) over all cases: more than Phoenix's 6 contexts, which test_xrt_backend covers
    monkeypatch.setenv("XDNA_XRT_MAX_CONTEXTS", "64")
    return {"backend": "xrt", "kernel_dir": str(request.getfixturevalue("fake_kernel_dir"))}


def runtime_report(path):
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [line for line in lines if line.get("runtime")]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_case_on_backend(case, backend_options, precision, tmp_path):
    report = tmp_path / "report.jsonl"
    options = {**backend_options, "partition_report": str(report)}
    if precision != "bf16":
        options["precision"] = precision
    sess = xdna_session(case.model, options, case.level)
    on_ep = sorted(op for _, op in ep_nodes(sess))
    assert on_ep == sorted(case.on_ep), f"placement: {ep_nodes(sess)}"
    ref_sess = cpu_session(case.model, case.level)
    for i, run in enumerate(case.runs):
        if run.exact[0] is None:
            # left to the CPU EP, which gives its own result or its own error: the EP behaves the same
            try:
                expected = ref_sess.run(None, run.feeds)
            except Exception as e:  # noqa: BLE001 - any ORT error; the EP must give the same kind
                with pytest.raises(type(e)):
                    sess.run(None, run.feeds)
                continue
            for out, ref in zip(sess.run(None, run.feeds), expected):
                np.testing.assert_array_equal(out, ref)
            continue
        outs = sess.run(None, run.feeds)
        refs = ref_sess.run(None, run.feeds)
        for j, (out, ref, exact, contract, bound) in enumerate(
                zip(outs, refs, run.exact, run.exact_in(precision), run.bounds(precision))):
            what = f"{case.name} {precision} run {i} output {j}"
            assert_within(out, contract, bound, what + ": EP vs exact")
            assert_within(ref, exact, bound, what + ": CPU EP vs exact (sanity of the bound)")
            # the CPU EP's result with the precision's NaN rule applied (int8: rows/columns of NaN or Inf)
            ref = np.where(np.isnan(contract) & ~np.isnan(exact), np.nan, ref)
            assert_within(out, ref, 2 * np.asarray(bound), what + ": EP vs CPU EP")
    del sess
    gc.collect()
    claims = {line["node"]: line for line in map(json.loads, report.read_text().splitlines())
              if not line.get("runtime") and line["claimed"]}
    executed = runtime_report(report)  # one line per claimed node, written when the session is released
    # a Transpose read through, or an Add run in a product's epilogue, is part of that product's node
    assert len(executed) == sum(op not in ("Transpose", "Add") for op in case.on_ep)
    # the precision each node computed in: the one asked for, except int8 with a run-time B (bf16, and says so)
    effective = "bf16" if precision == "int8" and case.runtime_b else precision
    for e in executed:
        assert e["precision"] == claims[e["node"]]["precision"] == effective, (e, claims)
        if effective != precision:
            assert "run time" in claims[e["node"]]["precision_note"]
    device_calls = sum(e["device_calls"] for e in executed)
    by_reason = {k: sum(e["cpu_calls_by_reason"][k] for e in executed) for k in ("not_for_device", "unpacked", "fault")}
    assert by_reason["fault"] == 0, executed
    declined = options["backend"] == "xrt" and effective == "bf16x3"  # the device has no bf16x3 kernels
    if declined:
        assert device_calls == 0 and by_reason["unpacked"] == 0, executed
        if case.to_device or (case.runtime_b and case.gemms):  # (zero-size cases compute no product)
            assert by_reason["not_for_device"] > 0, executed
        return
    assert by_reason["not_for_device"] == 0, executed
    if effective == "bf16x3":
        assert by_reason["unpacked"] == 0, executed  # a run-time B is split like a constant one
    if options["backend"] == "xrt" and case.to_device:
        assert device_calls > 0, f"no product reached the fake NPU: {executed}"
    if options["backend"] == "xrt" and not case.to_device and case.on_ep:
        assert device_calls == 0, executed  # run-time B of few rows: unpacked on the CPU on purpose


# The loop above runs on the kernel set the emulator chose for this CPU (amx where the CPU has AMX and Linux grants
# it). Forcing the AMX set runs the emulator half of it once more in a subprocess (the set is chosen once per
# process), so that the AMX kernels are proven to have run through the whole EP, or says why they cannot here.
def test_emulator_cases_on_the_amx_kernels():
    proc = run_pytest_with_isa("amx", "-q", "-x", "-s", "-k", "test_case_on_backend and emulator", "test_backend_ops.py")
    if unavailable("amx", proc):
        pytest.skip("no AMX on this CPU (or Linux did not grant the tile state): the amx kernels cannot run here")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kernels 'amx' (forced by XDNA_EMULATOR_ISA)" in proc.stdout + proc.stderr
    assert " passed" in proc.stdout and " failed" not in proc.stdout
