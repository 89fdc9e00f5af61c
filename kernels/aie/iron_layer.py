"""The IRON names the GEMM designs use, from mlir-aie (`real()`) or from a recording stand-in (`Recorder`).

gemm_design.iron_program_f32 writes its program against a namespace with these members: Kernel, ObjectFifo,
Worker, Runtime, Program, Tile, NPU1Col4, SequentialPlacer, TensorAccessPattern, range_, bfloat16 and
tensor_type(n, dtype). With `real()` that is mlir-aie's `aie.iron` (the API of its whole_array_iron.py example)
and the result is the MLIR module. With `Recorder()` nothing needs mlir-aie: every object fifo, link, worker and
runtime transfer is recorded, and each worker's core function is traced once with recording handles, so tests can
check the program's structure (placements, depths, L1/memtile use, acquire/release order, the transfers) without
the toolchain. What the recorder cannot check is whether mlir-aie accepts and lowers the program: that needs a real
build (build_kernels.py).
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field

import numpy as np


def real():
    """mlir-aie's IRON; raises ImportError without it."""
    from ml_dtypes import bfloat16

    from aie.helpers.taplib import TensorAccessPattern
    from aie.iron import Kernel, ObjectFifo, Program, Runtime, Worker
    from aie.iron.device import NPU1Col4, Tile
    from aie.iron.placers import SequentialPlacer

    try:
        from aie.iron.controlflow import range_
    except ImportError:  # mlir-aie before the IRON controlflow module
        from aie.helpers.dialects.ext.scf import _for as range_

    return types.SimpleNamespace(
        Kernel=Kernel, ObjectFifo=ObjectFifo, Program=Program, Runtime=Runtime, Worker=Worker, Tile=Tile,
        NPU1Col4=NPU1Col4, SequentialPlacer=SequentialPlacer, TensorAccessPattern=TensorAccessPattern,
        range_=range_, bfloat16=bfloat16, tensor_type=lambda n, dtype: np.ndarray[(n,), np.dtype[dtype]])


# ---- the recording stand-in ----

@dataclass(frozen=True)
class TensorTy:
    n: int
    dtype: str  # "float32", "bfloat16" or "int8"

    @property
    def nbytes(self) -> int:
        return self.n * {"float32": 4, "bfloat16": 2, "int8": 1}[self.dtype]


@dataclass(frozen=True)
class Tile:
    col: int
    row: int


@dataclass
class Handle:
    fifo: "Fifo"
    is_prod: bool
    depth: int
    dims_from_stream: list | None = None
    endpoint: object = None  # a Worker, a Link (memtile), or "shim" (a runtime fill/drain)

    def forward(self, placement=None, obj_type=None, depth=None, name=None, dims_to_stream=None,
                dims_from_stream=None):
        return self.split([0], placement=placement, obj_types=[obj_type] if obj_type else None,
                          depths=[depth] if depth else None, names=[name] if name else None,
                          dims_to_stream=[dims_to_stream] if dims_to_stream else None)[0]

    def split(self, offsets, placement=None, depths=None, obj_types=None, names=None, dims_to_stream=None,
              dims_from_stream=None):
        assert not self.is_prod, "split/forward needs a consumer handle"
        rec = self.fifo.rec
        outs = [Fifo(rec, (obj_types or [self.fifo.obj_type] * len(offsets))[i],
                     (depths or [self.depth] * len(offsets))[i],
                     (names or [f"{self.fifo.name}_split{i}" for i in range(len(offsets))])[i],
                     (dims_to_stream or [None] * len(offsets))[i]) for i in range(len(offsets))]
        link = Link("split", placement, [self], [o.prod() for o in outs], list(offsets))
        self.endpoint = link
        for o in outs:
            o.prod().endpoint = link
        rec.links.append(link)
        return outs

    def join(self, offsets, placement=None, depths=None, obj_types=None, names=None, dims_to_stream=None,
             dims_from_stream=None):
        assert self.is_prod, "join needs a producer handle"
        rec = self.fifo.rec
        ins = [Fifo(rec, (obj_types or [self.fifo.obj_type] * len(offsets))[i],
                    (depths or [self.depth] * len(offsets))[i],
                    (names or [f"{self.fifo.name}_join{i}" for i in range(len(offsets))])[i], None)
               for i in range(len(offsets))]
        link = Link("join", placement, [f.cons() for f in ins], [self], list(offsets))
        self.endpoint = link
        for f in ins:
            f._cons[-1].endpoint = link
        rec.links.append(link)
        return ins

    # Used while tracing a core function.
    def acquire(self, n):
        assert 1 <= n <= self.depth, f"{self.fifo.name}: acquire {n} of depth {self.depth}"
        self.fifo.rec.trace.append(("acquire", self.fifo.name, n))
        return Obj(self.fifo.name, self.fifo.obj_type)

    def release(self, n):
        assert 1 <= n <= self.depth
        self.fifo.rec.trace.append(("release", self.fifo.name, n))


@dataclass
class Obj:
    """An acquired object inside a traced core function."""
    fifo: str
    ty: TensorTy


@dataclass
class Link:
    kind: str  # "split" (forward = split with one output) or "join"
    placement: Tile
    srcs: list
    dsts: list
    offsets: list


class Fifo:
    def __init__(self, rec, obj_type, depth=2, name=None, dims_to_stream=None, dims_from_stream_per_cons=None):
        self.rec, self.obj_type, self.depth, self.name = rec, obj_type, depth, name
        self.dims_to_stream = dims_to_stream
        self.dims_from_stream_per_cons = dims_from_stream_per_cons
        self.repeat_count = None
        self._prod = None
        self._cons: list[Handle] = []
        rec.fifos[name] = self

    def prod(self, depth=None):
        if self._prod is None:
            self._prod = Handle(self, True, depth or self.depth)
        return self._prod

    def cons(self, depth=None, dims_from_stream=None):
        self._cons.append(Handle(self, False, depth or self.depth,
                                 dims_from_stream or self.dims_from_stream_per_cons))
        return self._cons[-1]

    @property
    def consumers(self) -> list[Handle]:
        return list(self._cons)

    def set_repeat_count(self, n):
        self.repeat_count = n


@dataclass
class KernelRec:
    name: str
    bin_name: str
    arg_types: list

    def __call__(self, *args):
        assert len(args) == len(self.arg_types), f"{self.name}: {len(args)} args, declared {len(self.arg_types)}"
        for got, want in zip(args, self.arg_types):
            if isinstance(got, Obj):
                assert got.ty == want, f"{self.name}: object of {got.fifo} is {got.ty}, declared {want}"
        self.rec.trace.append(("call", self.name, tuple(a.fifo if isinstance(a, Obj) else a for a in args)))

    rec: object = field(default=None, repr=False)


@dataclass
class WorkerRec:
    core_fn: object
    fn_args: list
    placement: Tile
    while_true: bool
    trace: list = field(default_factory=list)  # what one pass of core_fn does, with loops as ("loop", n, body)


@dataclass
class Transfer:
    kind: str  # "fill" or "drain"
    fifo: str
    tensor: str  # "A", "B", "C" (the runtime sequence's arguments, in order)
    tap: object
    task_group: int
    placement: Tile
    wait: bool


class RuntimeRec:
    def __init__(self, rec):
        self.rec = rec
        self.arg_types = None
        self.started: list = []
        self.transfers: list[Transfer] = []
        self.groups_open: list[int] = []
        self.groups_finished: list[int] = []
        self._next_group = 0

    @contextlib.contextmanager
    def sequence(self, *arg_types):
        self.arg_types = list(arg_types)
        yield tuple("ABCDEFGH"[i] for i in range(len(arg_types)))

    def start(self, *workers):
        self.started.extend(workers)

    def task_group(self):
        g = self._next_group
        self._next_group += 1
        self.groups_open.append(g)
        return g

    def finish_task_group(self, g):
        assert g in self.groups_open, f"task group {g} finished twice or never opened"
        self.groups_open.remove(g)
        self.groups_finished.append(g)

    def _transfer(self, kind, handle, tensor, tap, task_group, placement, wait):
        assert task_group in self.groups_open, "transfer outside an open task group"
        handle.endpoint = "shim"
        self.transfers.append(Transfer(kind, handle.fifo.name, tensor, tap, task_group, placement, wait))

    def fill(self, handle, tensor, tap=None, task_group=None, placement=None, wait=False):
        assert handle.is_prod, "fill needs the producer handle"
        self._transfer("fill", handle, tensor, tap, task_group, placement, wait)

    def drain(self, handle, tensor, tap=None, task_group=None, placement=None, wait=False):
        assert not handle.is_prod, "drain needs a consumer handle"
        self._transfer("drain", handle, tensor, tap, task_group, placement, wait)


@dataclass(frozen=True)
class TapRec:
    tensor_dims: tuple
    offset: int
    sizes: tuple
    strides: tuple


class Recorder:
    """A namespace with the members of real(), recording instead of building MLIR."""

    bfloat16 = "bfloat16"

    def __init__(self):
        self.fifos: dict[str, Fifo] = {}
        self.links: list[Link] = []
        self.kernels: list[KernelRec] = []
        self.workers: list[WorkerRec] = []
        self.runtimes: list[RuntimeRec] = []
        self.trace: list = []
        self.device = None
        self.resolved = False

    # members used by the design
    def tensor_type(self, n, dtype):
        return TensorTy(int(n), "bfloat16" if dtype == "bfloat16" else np.dtype(dtype).name)

    def Kernel(self, name, bin_name, arg_types):  # noqa: N802 (IRON's names)
        k = KernelRec(name, bin_name, list(arg_types), rec=self)
        self.kernels.append(k)
        return k

    def ObjectFifo(self, obj_type, depth=2, name=None, dims_to_stream=None,  # noqa: N802
                   dims_from_stream_per_cons=None):
        assert name not in self.fifos, f"duplicate fifo name {name}"
        return Fifo(self, obj_type, depth, name, dims_to_stream, dims_from_stream_per_cons)

    def Worker(self, core_fn, fn_args=(), placement=None, while_true=True):  # noqa: N802
        w = WorkerRec(core_fn, list(fn_args), placement, while_true)
        for a in w.fn_args:
            if isinstance(a, Handle):
                assert a.endpoint is None or a.endpoint is w, f"{a.fifo.name}: handle used by two endpoints"
                a.endpoint = w
        self.workers.append(w)
        return w

    def Runtime(self):  # noqa: N802
        rt = RuntimeRec(self)
        self.runtimes.append(rt)
        return rt

    def Program(self, device, rt):  # noqa: N802
        rec = self

        class _Program:
            def resolve_program(self, placer):
                rec.device = device
                for w in rec.workers:
                    rec.trace = []
                    w.core_fn(*w.fn_args)
                    w.trace = rec.trace
                rec.trace = []
                rec.resolved = True
                return rec

        return _Program()

    Tile = Tile

    @staticmethod
    def NPU1Col4():  # noqa: N802
        return "npu1_4col"

    @staticmethod
    def SequentialPlacer():  # noqa: N802
        return "sequential"

    @staticmethod
    def TensorAccessPattern(tensor_dims, offset, sizes, strides):  # noqa: N802
        return TapRec(tuple(tensor_dims), int(offset), tuple(sizes), tuple(strides))

    def range_(self, n):
        """Like IRON's range_ (an scf.for): the body is traced once; the trip count is recorded around it."""
        outer = self.trace
        self.trace = []
        try:
            yield 0
        finally:
            body, self.trace = self.trace, outer
            self.trace.append(("loop", n, body))
