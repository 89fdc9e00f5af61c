"""1-D Conv (Whisper's encoder front end) claimed and run as a GEMM: im2col rows against the packed weights.
Checked against a float64 numpy convolution of the bf16-rounded operands within the contract's bound."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from ep_helpers import assert_within, bf16_bound, ep_nodes, init, make_model, rng, tensor, xdna_session


def conv1d_reference(x, w, bias, stride, dilation, pads):
    """(exact float64 result, the contract's bound) computed as the GEMM of im2col rows and the weights."""
    n, cin, t = x.shape
    cout, _, k = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[1])))
    span = dilation * (k - 1) + 1
    t_out = (t + pads[0] + pads[1] - span) // stride + 1
    cols = np.stack([xp[:, :, i * stride: i * stride + span: dilation] for i in range(t_out)], axis=1)
    cols = cols.reshape(n, t_out, cin * k)  # [n, t_out, Cin*k]
    wt = w.astype(np.float64).reshape(cout, -1).T  # [Cin*k, Cout]
    exact = (cols @ wt).transpose(0, 2, 1) + (0 if bias is None else bias[None, :, None])
    return exact, bf16_bound(cols, wt, cin * k).transpose(0, 2, 1)


@pytest.mark.parametrize("stride,dilation,pads,bias", [(1, 1, (1, 1), True), (2, 1, (1, 1), True),
                                                       (1, 2, (0, 3), False), (3, 1, (0, 0), True)])
def test_conv1d_runs_on_the_ep(stride, dilation, pads, bias):
    x = rng(1).standard_normal((2, 12, 50)).astype(np.float32)
    w = rng(2).standard_normal((20, 12, 3)).astype(np.float32)
    b = rng(3).standard_normal(20).astype(np.float32) if bias else None
    attrs = dict(strides=[stride], dilations=[dilation], pads=list(pads), kernel_shape=[3])
    inputs = ["x", "w"] + (["b"] if bias else [])
    inits = [init("w", w)] + ([init("b", b)] if bias else [])
    exact, bound = conv1d_reference(x, w, b, stride, dilation, pads)
    model = make_model([helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)],
                       [tensor("x", ["n", 12, "t"])], [tensor("y", ["n", 20, "u"])], inits)
    sess = xdna_session(model)
    assert ep_nodes(sess) == [("conv", "Conv")]
    y = sess.run(None, {"x": x})[0]
    assert_within(y, exact, bound)
    # A different length in the same session (symbolic T).
    x2 = x[:1, :, :17].copy()
    exact2, bound2 = conv1d_reference(x2, w, b, stride, dilation, pads)
    assert_within(sess.run(None, {"x": x2})[0], exact2, bound2)


@pytest.mark.parametrize("case", ["2d", "grouped", "runtime_weight"])
def test_other_convolutions_stay_on_the_cpu(case):
    if case == "2d":
        x_shape, w = [1, 4, 8, 8], rng(4).standard_normal((6, 4, 3, 3)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
        inits, inputs = [init("w", w)], [tensor("x", x_shape)]
    elif case == "grouped":
        x_shape, w = [1, 4, 10], rng(4).standard_normal((4, 2, 3)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=2)
        inits, inputs = [init("w", w)], [tensor("x", x_shape)]
    else:
        x_shape, w = [1, 4, 10], rng(4).standard_normal((6, 4, 3)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
        inits, inputs = [], [tensor("x", x_shape), tensor("w", list(w.shape))]
    model = make_model([node], inputs, [tensor("y", ["a", "b", "c"] + (["d"] if case == "2d" else []))],
                       inits)
    sess = xdna_session(model)
    assert ep_nodes(sess) == []
    feeds = {"x": rng(5).standard_normal(x_shape).astype(np.float32)}
    if case == "runtime_weight":
        feeds["w"] = w
    sess.run(None, feeds)  # the CPU EP runs it
