"""What ran where: ORT's own node assignment, and the EP's claim decisions with their reasons and FLOPs."""

from __future__ import annotations

import gc
import json
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field

SPINNING_KEY = "session.intra_op.allow_spinning"
ASSIGNMENT_KEY = "session.record_ep_graph_assignment_info"


def session_options(base=None, *, record_placement: bool = True, spinning: bool = False):
    """SessionOptions for sessions with the XDNA EP: placement recorded (needed by `placement()`) and ORT's
    intra-op spinning off.

    Why spinning off: ORT's CPU-EP worker threads busy-wait between the nodes they run. Where the EP computes on the
    CPU (the emulator), its own worker threads then wait for cores that ORT's spinners hold; on a 2-core machine a
    Whisper decoder step measured 3-10x slower with spinning on. It costs the CPU EP's nodes next to nothing.
    """
    import onnxruntime as ort

    so = base if base is not None else ort.SessionOptions()
    if record_placement:
        so.add_session_config_entry(ASSIGNMENT_KEY, "1")
    if not spinning:
        so.add_session_config_entry(SPINNING_KEY, "0")
    return so


@dataclass
class Placement:
    """ORT's assignment of graph nodes to execution providers (the ground truth of what ran where)."""

    nodes: list[tuple[str, str, str]]  # (ep_name, node_name, op_type)

    def on(self, ep: str) -> list[tuple[str, str]]:
        return [(name, op) for e, name, op in self.nodes if e == ep]

    def count(self, ep: str, op_types: tuple[str, ...] | None = None) -> int:
        return sum(1 for e, _, op in self.nodes if e == ep and (op_types is None or op in op_types))

    def summary(self) -> str:
        by_ep: dict[str, Counter] = {}
        for ep, _, op in self.nodes:
            by_ep.setdefault(ep, Counter())[op] += 1
        lines = []
        for ep, ops in sorted(by_ep.items()):
            detail = ", ".join(f"{op} x{n}" for op, n in ops.most_common())
            lines.append(f"{ep}: {sum(ops.values())} nodes ({detail})")
        return "\n".join(lines)


def placement(session) -> Placement:
    """Node placement of a session created with `session_options()` (or the assignment config entry set)."""
    try:
        info = session.get_provider_graph_assignment_info()
    except Exception:  # ORT raises when the entry was not set at session creation
        info = []
    nodes = [(sub.ep_name, n.name, n.op_type) for sub in info for n in sub.get_nodes()]
    if not nodes:
        raise RuntimeError(
            f"no placement recorded: create the session with onnxruntime_ep_xdna.session_options() "
            f"(sets '{ASSIGNMENT_KEY}=1')"
        )
    return Placement(nodes)


@dataclass
class NodeDecision:
    graph: str
    node: str
    op_type: str
    claimed: bool
    reason: str
    mflop: float
    mflop_lower_bound: bool
    pass_: int = 0  # which GetCapability call of the session decided (the report keeps each graph's last)
    index: int = -1  # the node's position in its graph: tells unnamed nodes apart
    # claimed nodes: the precision its products run in (bf16, int8, bf16x3) and why (the rule or option that chose
    # it; int8 asked for a run-time B says it stays bf16, as the int8 contract keeps run-time B operands in bf16)
    precision: str = ""
    precision_note: str = ""
    placed_on: str = "?"
    executed: dict | None = None  # after a run: backend, precision, device_calls, cpu_calls, device_mflop, cpu_mflop


@dataclass
class PartitionReport:
    model: str
    decisions: list[NodeDecision]
    placement: Placement
    providers: list[str] = field(default_factory=list)

    @property
    def total_mflop(self) -> float:
        return sum(d.mflop for d in self.decisions)

    @property
    def ep_mflop(self) -> float:
        from . import EP_NAME

        return sum(d.mflop for d in self.decisions if d.placed_on == EP_NAME)

    @property
    def ep_share(self) -> float:
        """Share of MatMul/Gemm/Conv FLOPs placed on the EP (symbolic dims counted as 1)."""
        return self.ep_mflop / self.total_mflop if self.total_mflop else 0.0

    def table(self) -> str:
        from . import EP_NAME

        rows = [f"{'node':48} {'op':7} {'MFLOP':>10}  {'prec':6} placed on / why not"]
        for d in sorted(self.decisions, key=lambda d: -d.mflop):
            mflop = f"{d.mflop:10.2f}" + ("*" if d.mflop_lower_bound else " ")
            where = "XDNA" if d.placed_on == EP_NAME else f"CPU: {d.reason}"
            if d.placed_on == EP_NAME and d.executed is not None:
                e = d.executed
                where += f" ({e['backend']} x{e['device_calls']}" + (
                    f", CPU path x{e['cpu_calls']})" if e["cpu_calls"] else ")")
            precision = d.precision if d.placed_on == EP_NAME else "-"
            if d.placed_on == EP_NAME and d.precision_note and "run time" in d.precision_note:
                where += " (int8 asked: run-time B stays bf16)"
            name = d.node or f"<unnamed {d.op_type} #{d.index}>"
            rows.append(f"{name[:48]:48} {d.op_type:7} {mflop} {precision:6} {where}")
        on_ep = sum(1 for d in self.decisions if d.placed_on == EP_NAME)
        rows.append(
            f"{on_ep}/{len(self.decisions)} MatMul/Gemm/Conv nodes on {EP_NAME}: "
            f"{self.ep_mflop:.1f} of {self.total_mflop:.1f} MFLOP ({100 * self.ep_share:.1f}%)"
            + ("  (* symbolic dims counted as 1)" if any(d.mflop_lower_bound for d in self.decisions) else "")
        )
        by_precision: dict[str, int] = {}
        for d in self.decisions:
            if d.placed_on == EP_NAME:
                by_precision[d.precision or "bf16"] = by_precision.get(d.precision or "bf16", 0) + 1
        if by_precision:
            rows.append("precision of the EP's nodes: " + ", ".join(f"{n} {p}" for p, n in sorted(by_precision.items())))
        rows.append(self.placement.summary())
        return "\n".join(rows)


def _dummy_feeds(session, dims: dict[str, int]):
    import numpy as np

    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) and d >= 0 else dims.get(str(d), 1) for d in i.shape]
        if "float" in i.type:
            dtype = np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = np.random.default_rng(0).standard_normal(shape).astype(dtype)
        elif "bool" in i.type:
            feeds[i.name] = np.ones(shape, dtype=bool)
        else:
            feeds[i.name] = np.zeros(shape, dtype=np.int64 if "int64" in i.type else np.int32)
    return feeds


def partition(model, provider_options: dict | None = None, graph_optimization_level=None, run: bool = False,
              dims: dict[str, int] | None = None) -> PartitionReport:
    """Creates a session of `model` with the EP and reports every MatMul/Gemm/Conv: placed where, why, FLOPs.

    With `run=True` the model is run once on dummy inputs (symbolic dims from `dims`, else 1) and the FLOPs of the
    EP's nodes are the executed ones, so symbolic dimensions no longer count as 1.
    """
    import onnxruntime as ort

    from . import EP_NAME, register

    register()
    fd, report_path = tempfile.mkstemp(prefix="xdna-partition-", suffix=".jsonl")
    os.close(fd)
    try:
        so = session_options()
        if graph_optimization_level is not None:
            so.graph_optimization_level = graph_optimization_level
        opts = dict(provider_options or {})
        opts["partition_report"] = report_path
        # enable_fallback=0: a refused option is an error here, not a session silently on the CPU EP alone
        session = ort.InferenceSession(str(model), so, providers=[(EP_NAME, opts), "CPUExecutionProvider"],
                                       enable_fallback=0)
        place = placement(session)
        providers = session.get_providers()
        if run:
            session.run(None, _dummy_feeds(session, dims or {}))
        del session  # the EP's kernels append their run-time statistics when released
        gc.collect()
        by_graph: dict[str, list[NodeDecision]] = {}
        executed: dict[str, dict] = {}
        with open(report_path) as f:
            for line in f:
                # null numbers: too large for a double (huge declared dims)
                d = {k: math.inf if v is None and "mflop" in k else v for k, v in json.loads(line).items()}
                if d.pop("runtime", False):
                    executed[d.pop("node")] = d
                    continue
                d["pass_"] = d.pop("pass", 0)
                decision = NodeDecision(**d)
                kept = by_graph.setdefault(decision.graph, [])
                # GetCapability may run more than once per graph; the last pass is the one ORT used.
                if kept and kept[0].pass_ != decision.pass_:
                    kept.clear()
                kept.append(decision)
    finally:
        os.unlink(report_path)
    decisions = [d for kept in by_graph.values() for d in kept]
    where = {name: ep for ep, name, _ in place.nodes if name}
    # ORT names no unnamed node either: such nodes are placed by count (all claimed ones of an op type on the EP
    # when ORT put as many unnamed nodes of that type there), else left "?".
    unnamed_on_ep = Counter(op for ep, name, op in place.nodes if not name and ep == EP_NAME)
    unnamed_claimed = Counter(d.op_type for d in decisions if not d.node and d.claimed)
    for d in decisions:
        if d.node:
            d.placed_on = where.get(d.node, "?")
        elif unnamed_on_ep[d.op_type] == unnamed_claimed[d.op_type]:
            d.placed_on = EP_NAME if d.claimed else "CPUExecutionProvider"
        else:
            d.placed_on = "?"
        if run and d.node and d.node in executed and d.placed_on == EP_NAME:
            d.executed = executed[d.node]
            d.mflop = d.executed["device_mflop"] + d.executed["cpu_mflop"]
            d.mflop_lower_bound = False
    return PartitionReport(str(model), decisions, place, providers)
