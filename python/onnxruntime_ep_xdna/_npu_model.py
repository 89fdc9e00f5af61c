"""`xdna partition --npu-model`: the modelled Phoenix NPU time of every claimed node (kernels/xrt/dataflow_model.h).

A MODEL, NOT A MEASUREMENT: no NPU has run these kernels. The per-node work (batches, M, K, N) is what the EP
executed on the dummy run of `partition(run=True)`; the model turns it into dispatch, host, DMA and compute time
on the redesigned (v2) dataflow, and compares it with the CPU. Attention the EP claims as one node (ops/attention.cc)
is modelled as the fused kernel; a MatMul -> [Mul/Div/Add] -> Softmax -> MatMul chain whose MatMuls the EP runs as
separate nodes (e.g. a masked Softmax) is modelled as fused too, as the design would run it.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import _native

_PASS_THROUGH = {"Mul", "Div", "Add", "Cast", "Where", "Sub"}  # between QK^T and Softmax (scale, mask)


@dataclass
class NodeModel:
    node: str
    op_type: str
    work: tuple | None  # (batches, M, K, N, runtime_b, a_gather, conv)
    cost: dict | None  # npu_model() result (v2), or the fused attention's
    before: dict | None  # v1
    npu: bool = False
    note: str = ""

    @property
    def time_us(self) -> float:
        if self.cost is None:
            return 0.0
        return self.cost["npu_us"] if self.npu else self.cost["cpu_us"]


def attention_pairs(model_path: str) -> dict[str, str]:
    """{QK^T MatMul name: PV MatMul name} for every MatMul -> [scale/mask] -> Softmax -> MatMul chain."""
    try:
        import onnx

        graph = onnx.load(str(model_path), load_external_data=False).graph
    except Exception:  # not loadable by onnx (ORT format, ...): no fusion modelled
        return {}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    pairs = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        out, seen = node.output[0], 0
        while seen < 4:  # a short chain of elementwise ops, each with one consumer
            users = consumers.get(out, [])
            if len(users) != 1:
                break
            user, _ = users[0]
            if user.op_type == "Softmax":
                pv = [u for u, i in consumers.get(user.output[0], []) if u.op_type == "MatMul" and i == 0]
                if len(pv) == 1:
                    pairs[node.name] = pv[0].name
                break
            if user.op_type not in _PASS_THROUGH:
                break
            out, seen = user.output[0], seen + 1
    return pairs


def ep_memory(executed: dict | None) -> tuple[bool, bool]:
    """(A, C) of every product of the node's run in the EP's own memory (kernels/ep_buffers.h), as the EP reported it:
    then the model charges no per-call pinning for them."""
    a, c, n = (executed or {}).get("ep_buffers", (0, 0, 0))
    return bool(n) and a == n, bool(n) and c == n


def _ort_copies_outputs() -> bool:
    """XDNA_EP_ALLOCATOR=device: the EP's memory is a device to ORT, which copies every fused-node output a CPU node
    reads (MemcpyToHost; docs/npu.md "NPU buffers owned by the EP"). Read as the EP's factory read it (same process)."""
    import os

    return os.environ.get("XDNA_EP_ALLOCATOR", "") == "device"


def _charge_ort_copy(cost: dict, nbytes: float, params: dict) -> dict:
    host_gbps = float(params.get("host_gbps", 10))
    us = nbytes / (host_gbps * 1e3)
    cost = dict(cost, host_us=cost["host_us"] + us, npu_us=cost["npu_us"] + us,
                dataflow=cost["dataflow"] + "; copy: ORT copies C to its CPU consumer (MemcpyToHost)")
    cost["npu"] = cost["npu"] and cost["npu_us"] < cost["cpu_us"]
    return cost


def model_nodes(report, params: dict | None = None, fuse_attention: bool = True,
                precision: str = "bf16") -> list[NodeModel]:
    """`precision` "int8": every constant-weight GEMM (MatMul, Gemm, Conv) modelled on the int8 kernels
    (kernels/aie/gemm_int8.cc); products with a run-time B (attention) stay bf16, as the contract says."""
    from . import EP_NAME

    params = dict(params or {})
    if precision not in ("bf16", "int8"):
        raise ValueError("precision must be bf16 or int8")
    on_ep = {d.node: d for d in report.decisions if d.placed_on == EP_NAME}
    pairs = attention_pairs(report.model) if fuse_attention else {}
    rows: list[NodeModel] = []
    fused_into: dict[str, str] = {}
    for qk, pv in pairs.items():
        a, b = on_ep.get(qk), on_ep.get(pv)
        wa = a.executed.get("work") if a and a.executed else None
        wb = b.executed.get("work") if b and b.executed else None
        # QK^T: heads x [Tq, d] x [d, Tk]; PV: heads x [Tq, Tk] x [Tk, d]
        if wa and wb and wa[0] == wb[0] and wa[1] == wb[1] and wa[3] == wb[2] and wa[2] == wb[3]:
            fused_into[pv] = qk
    for d in sorted(on_ep.values(), key=lambda d: -d.mflop):
        attention = d.executed.get("attention") if d.executed else None
        a_ep, c_ep = ep_memory(d.executed)
        if attention:  # one EP node (ops/attention.cc): heads x softmax(Q K^T) V
            h, tq, tk, dh = attention
            parts = [("QK^T", (h, tq, dh, tk, 1, 0, 0)), ("PV", (h, tq, tk, dh, 1, 0, 0))]
            if fuse_attention:
                cost = _native.npu_model_attention(h, tq, tk, dh, params=params, io_ep_memory=a_ep and c_ep)
                rows.append(NodeModel(d.node, "Attn", parts[0][1], cost, None, npu=cost["npu"],
                                      note="fused attention (one EP node)"))
                continue
            for what, w in parts:  # as two batched products, the scores through DDR
                kw = dict(batches=h, runtime_b=True, params=params)
                cost = _native.npu_model(w[1], w[2], w[3], dataflow="v2", **kw)
                before = _native.npu_model(w[1], w[2], w[3], dataflow="v1", **kw)
                rows.append(NodeModel(f"{d.node} ({what})", "MatMul", w, cost, before, npu=cost["npu"]))
            continue
        work = tuple(d.executed["work"]) if d.executed and "work" in d.executed else None
        if work is None:
            note = d.reason if "fused attention" in d.reason else "not executed on the dummy run"
            rows.append(NodeModel(d.node, d.op_type, None, None, None, note=note))
            continue
        b, M, K, N, rb, ag, conv = work
        kw = dict(batches=b, runtime_b=bool(rb), a_gather=bool(ag), conv=bool(conv), params=params)
        before = _native.npu_model(M, K, N, dataflow="v1", **kw)
        if d.node in fused_into:
            rows.append(NodeModel(d.node, d.op_type, work, None, before,
                                  note=f"in the fused attention of {fused_into[d.node]}"))
            continue
        if d.node in pairs and pairs[d.node] in fused_into:
            cost = _native.npu_model_attention(b, M, N, K, params=params)
            rows.append(NodeModel(d.node, d.op_type, work, cost, before, npu=cost["npu"], note="fused attention"))
            continue
        # chained: the node's products rode in an earlier node's runlist (one fused node, one weight shape)
        n = (d.executed or {}).get("ep_buffers", (0, 0, 0))[2]
        chained = bool(n) and (d.executed or {}).get("chained_calls", 0) >= n
        a_shared = chained and (d.executed or {}).get("a_shared_calls", 0) >= n  # q/k/v: one A import per list
        cost = _native.npu_model(M, K, N, dataflow="v2", int8=precision == "int8" and not rb, a_ep_memory=a_ep,
                                 c_ep_memory=c_ep, chained=chained, a_shared=a_shared, **kw)
        if c_ep and _ort_copies_outputs():
            cost = _charge_ort_copy(cost, b * M * N * 4, params)
        rows.append(NodeModel(d.node, d.op_type, work, cost, before, npu=cost["npu"]))
    return rows


def totals(rows: list[NodeModel], which: str = "after") -> tuple[float, float]:
    """(NPU us, CPU us) over the rows: `after` = v2 (this table), `before` = the v1 dataflow and its own model
    (use rows made with fuse_attention=False for it)."""
    npu = cpu = 0.0
    for r in rows:
        c = r.cost if which == "after" else r.before
        if c is None:
            continue
        on_npu = r.npu if which == "after" else c["npu"]
        if on_npu:
            npu += c["npu_us"]
        else:
            cpu += c["cpu_us"]
    return npu, cpu


def assumptions_text(params: dict | None = None) -> str:
    lines = ["model assumptions (a model, not a measurement; sources in docs/npu.md):"]
    for name, value, source in _native.npu_model_assumptions(params=dict(params or {})):
        lines.append(f"  {name}: {value}  [{source}]")
    return "\n".join(lines)


def table(report, params: dict | None = None, precision: str = "bf16") -> str:
    rows = model_nodes(report, params, precision=precision)
    ms = lambda us: f"{us / 1e3:8.3f}"  # noqa: E731
    out = [assumptions_text(params), "",
           f"{'node':44} {'op':6} {'work (b x M x K x N)':22} {'dispatch':>8} {'host':>8} {'DMA':>8} {'compute':>8}"
           f" {'NPU':>8} {'CPU':>8}  runs on  dataflow   (times in ms, modelled)"]
    for r in rows:
        w = "-" if r.work is None else f"{r.work[0]}x{r.work[1]}x{r.work[2]}x{r.work[3]}"
        if r.cost is None:
            out.append(f"{r.node[:44]:44} {r.op_type:6} {w:22} {'':>8} {'':>8} {'':>8} {'':>8} {'':>8} {'':>8}  "
                       f"{'-':7}  {r.note}")
            continue
        c = r.cost
        out.append(f"{r.node[:44]:44} {r.op_type:6} {w:22} {ms(c['dispatch_us'])} {ms(c['host_us'])} "
                   f"{ms(c['dma_us'])} {ms(c['compute_us'])} {ms(c['npu_us'])} {ms(c['cpu_us'])}  "
                   f"{'NPU' if r.npu else 'CPU':7}  {c['dataflow']}")
    unfused = model_nodes(report, params, fuse_attention=False)
    bn, bc = totals(unfused, "before")  # v1 had no fusion: every node on its own
    un, uc = totals(unfused, "after")
    an, ac = totals(rows, "after")
    out.append("")
    out.append(f"before (v1 dataflow, the model as it stood before issue 15): {(bn + bc) / 1e3:.1f} ms "
               f"(NPU {bn / 1e3:.1f} ms, CPU {bc / 1e3:.1f} ms)")
    out.append(f"v2 without fused attention (QK^T and PV as separate batched nodes, scores through DDR): "
               f"{(un + uc) / 1e3:.1f} ms (NPU {un / 1e3:.1f} ms, CPU {uc / 1e3:.1f} ms)")
    if precision != "bf16":
        out.append(f"precision: {precision} for constant-weight GEMMs (attention stays bf16); the lines above are bf16")
    out.append(f"modelled Phoenix time: {(an + ac) / 1e3:.1f} ms (NPU {an / 1e3:.1f} ms, CPU {ac / 1e3:.1f} ms)")
    return "\n".join(out)
