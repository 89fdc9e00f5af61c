"""Fused attention for the Phoenix (npu1) 4x4 AIE-ML array: O = softmax(scale * Q K^T) V for all heads of a layer in
one command, the scores never leaving a core's L1 (issue 15). Core kernel: attention_bf16.cc (numerics:
kernels/attention_contract.h). This file plans the data movement (`plan`), runs it on the host with a core
implementation (`simulate`: the g++-compiled attention_bf16.cc in the tests, or `NumpyCore`), and writes the IRON
program (`iron_program`, recorded for the host checks by iron_layer.Recorder; built by build_kernels.py
--attention). No xclbin has been built here (no mlir-aie / Peano) and nothing has run on an NPU.

Operands: ORT's fp32 tensors read and written in place through the shim DMA's strides (no head split copies):
  Q, K, V: [T rows, ld] with head h in columns h*D .. h*D + D - 1 (ld = H * D for the q/k/v projections' outputs);
  O:       head h's row t at h * o_head + t * ldo (default [H, T, D], o_head = T * D, ldo = D: the output of the
  EP's fused attention node, the PV MatMul's [B, H, T, D]; o_head = D, ldo = H * D writes [T, H * D]).
  D = 64; T >= 32 keys and query rows, fixed per xclbin (as are H, ld, ldo, o_head and the scale).

Array mapping (npu1: 4 columns x 4 core rows, one memtile per column):
  * A work item is (head h, 32 query rows). All 16 cores work on one head at a time: a pass deals 16 query tiles
    (core (col c, row r) takes tile 16 p + 4 c + r), so a head takes ceil(ceil(T/32) / 16) passes (1500: 3).
    The last tile of a T that is not a multiple of 32 is moved back to end at row T; spare slots of the last pass
    recompute that tile and write the same bits again (a row's result depends only on its Q row, K and V).
  * K and V of the head stream from DDR once per pass, 32 key rows (8 KiB fp32) at a time, straight from the shim
    to all 16 cores (one broadcast each: shim 0 for K, shim 1 for V); the last tile of a T that is not a multiple of
    32 is moved back to end at row T and its first `skip` keys are ignored by the core.
  * Q: per column, shim c fills the memtile with its four cores' 32-row tiles (4 transfers into one 128-row
    object), split to the cores. O: the four cores' blocked 32x64 outputs join in the memtile, whose MM2S
    un-blocks them (o_l2_dims), and shim c writes each tile's rows into the head's columns.
  * Channels: shim c MM2S Q_c (+ K on shim 0, V on shim 1), S2MM O_c; memtile S2MM Q_c + 4 O, MM2S 4 Q + O_c.
  * Per key tile (the core, flash-attention's online softmax, fp32 except where noted):
        S^T = scale * K_j Q^T           (bf16 x bf16 products, fp32 sums: aie::mmul<4,8,4>)
        m' = max(m, colmax S^T);  c = exp(m - m')
        P = bf16(exp(S - m'))           (fp32 exp, rounded to nearest even)
        l = c * l + rowsum(P);  O = c * O + P V_j;  m = m'
    and O / l at the end of the item. S and P live only in L1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import gemm_design as g

D = 64  # head dim: one 64-deep K step of gemm_design.py
QROWS = 32  # query rows per work item
KEYS = 32  # keys per streamed K/V tile
ROWS = COLS = 4
CORES = ROWS * COLS
L1_LIMIT = 56 * 1024  # of 64 KiB: the rest for stack and the program's locals
KERNEL_OBJECT = "attention_bf16.o"  # built from attention_bf16.cc with Peano by build_kernels.py
TILE = QROWS * D  # elements of one Q / K / V / O object in L1 (32 x 64 fp32)


def l1_bytes() -> dict[str, int]:
    """L1 use of one core: the objects (K double-buffered; V single: its next tile streams in while the core
    computes the next scores) and attention_bf16.cc's static state."""
    return {
        "Q tile (fp32, in)": TILE * 4,
        "K tiles (fp32, x2)": 2 * KEYS * D * 4,
        "V tile (fp32)": KEYS * D * 4,
        "O accumulator / output (fp32)": QROWS * D * 4,
        "Q^T (bf16, static)": QROWS * D * 2,
        "K or V blocked (bf16, static)": KEYS * D * 2,
        "S^T (fp32, static)": QROWS * KEYS * 4,
        "P (bf16, static)": QROWS * KEYS * 2,
        "m, l, c (fp32, static)": 3 * QROWS * 4,
    }


def memtile_bytes() -> int:
    """Per memtile: Q in (4 tiles, double-buffered) and O out (4 tiles, double-buffered)."""
    return 2 * ROWS * TILE * 4 * 2


def check_shape(T: int, H: int, ld: int = 0) -> None:
    if T < KEYS or H < 1:
        raise ValueError(f"T={T}, H={H}: the design needs T >= {KEYS} and at least one head")
    if ld and ld < H * D:
        raise ValueError(f"ld={ld} < H * D = {H * D}")


def q_tile_starts(T: int) -> list[int]:
    """First row of each 32-row query tile; the last moved back to end at T."""
    return [min(QROWS * i, T - QROWS) for i in range(math.ceil(T / QROWS))]


def passes(T: int) -> int:
    return math.ceil(len(q_tile_starts(T)) / CORES)


def slot_start(T: int, p: int, col: int, row: int) -> int:
    """The query tile core (col, row) computes in pass p; spare slots recompute the last tile."""
    starts = q_tile_starts(T)
    return starts[min(p * CORES + col * ROWS + row, len(starts) - 1)]


def key_tiles(T: int) -> list[tuple[int, int]]:
    """(first key row, keys the core skips) of each streamed K/V tile."""
    tiles = [(KEYS * j, 0) for j in range(T // KEYS)]
    if T % KEYS:
        tiles.append((T - KEYS, KEYS - T % KEYS))
    return tiles


def work_items(H: int, T: int) -> list[list[tuple[int, int]]]:
    """(head, first query row) per core, in processing order."""
    return [[(h, slot_start(T, p, c, r)) for h in range(H) for p in range(passes(T))]
            for c in range(COLS) for r in range(ROWS)]


@dataclass(frozen=True)
class Plan:
    T: int
    H: int
    ld: int  # row stride of Q, K and V in elements
    ldo: int  # row stride of O
    o_head: int  # offset of head h + 1's output from head h's

    @property
    def tensor_len(self) -> int:  # Q, K, V
        return (self.T - 1) * self.ld + self.H * D

    @property
    def o_len(self) -> int:
        return (self.H - 1) * self.o_head + (self.T - 1) * self.ldo + D

    def rows_tap(self, h: int, start: int) -> g.Tap:
        """32 rows of head h from `start` in Q, K or V: a Q tile or an overlapped last K/V tile."""
        return g.Tap(start * self.ld + h * D, (1, 1, QROWS, D), (0, 0, self.ld, 1))

    def o_tap(self, h: int, start: int) -> g.Tap:
        return g.Tap(h * self.o_head + start * self.ldo, (1, 1, QROWS, D), (0, 0, self.ldo, 1))

    def kv_taps(self, h: int) -> list[g.Tap]:
        """Head h's keys (or values) in 32-row tiles, as one transfer plus one for an overlapped last tile."""
        full = self.T // KEYS
        taps = [g.Tap(h * D, (1, full, KEYS, D), (0, KEYS * self.ld, self.ld, 1))] if full else []
        if self.T % KEYS:
            taps.append(self.rows_tap(h, self.T - KEYS))
        return taps


def plan(T: int, H: int, ld: int = 0, ldo: int = 0, o_head: int = -1) -> Plan:
    """ld default H * D; O default [H, T, D] (ldo = D, o_head = T * D)."""
    check_shape(T, H, ld)
    ldo = ldo or D
    o_head = T * ldo if o_head < 0 else o_head
    if ldo < D or (H > 1 and o_head < D):
        raise ValueError(f"ldo={ldo}, o_head={o_head}: heads' outputs would overlap")
    return Plan(T, H, ld or H * D, ldo, o_head)


def o_l2_dims():
    """The memtile MM2S of the joined O (4 core tiles of 8 x 16 blocks of 4x4, stacked): row-major 128 x 64."""
    r, t = g.MMUL_R, g.MMUL_T
    return [(ROWS * QROWS // r, r * D), (r, t), (D // t, r * t), (t, 1)]


def check_plan(p: Plan) -> None:
    """Raises ValueError unless every shim transfer and memtile pattern of the plan is encodable."""
    for h in range(p.H):
        for tap in p.kv_taps(h):
            g.check_shim_tap(tap, 4, p.tensor_len)
        for start in q_tile_starts(p.T):
            g.check_shim_tap(p.rows_tap(h, start), 4, p.tensor_len)
            g.check_shim_tap(p.o_tap(h, start), 4, p.o_len)
    g.check_mem_dims(o_l2_dims(), 4, ROWS * TILE)
    if sum(l1_bytes().values()) > L1_LIMIT:
        raise ValueError("L1 over budget")


# ---- running the plan on the host ----

def _rne_bf16(x: np.ndarray) -> np.ndarray:
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32)).view(np.float32).astype(np.float64)


def block_o(o: np.ndarray) -> np.ndarray:
    """32 x 64 row-major -> the core's 8 x 16 blocks of 4x4."""
    return np.ascontiguousarray(o.reshape(8, 4, 16, 4).transpose(0, 2, 1, 3)).reshape(-1)


class NumpyCore:
    """attention_bf16.cc's numerics in numpy (float64 sums and an exact exp stand in for the fp32 ones; the
    contract's bound covers both). Same entry points and state as the core kernel."""

    def q_tile(self, q: np.ndarray, o: np.ndarray) -> None:
        self.q = _rne_bf16(q.reshape(QROWS, D))
        self.acc = np.zeros((QROWS, D))
        self.m = np.full(QROWS, -np.inf)
        self.l = np.zeros(QROWS)
        o[:] = 0

    def scores(self, k: np.ndarray, scale: float, skip: int) -> None:
        s = scale * (self.q @ _rne_bf16(k.reshape(KEYS, D)).T)
        s[:, :skip] = -np.inf
        m_new = np.maximum(self.m, s.max(axis=1))
        self.c = np.exp(self.m - m_new)
        self.p = _rne_bf16(np.exp(s - m_new[:, None]))
        self.l = self.c * self.l + self.p.sum(axis=1)
        self.m = m_new

    def values(self, v: np.ndarray, o: np.ndarray) -> None:
        self.acc = self.c[:, None] * self.acc + self.p @ _rne_bf16(v.reshape(KEYS, D))

    def finish(self, o: np.ndarray) -> None:
        o[:] = block_o(self.acc / self.l[:, None])


def simulate(q: np.ndarray, k: np.ndarray, v: np.ndarray, T: int, H: int, scale: float, core=None,
             ld: int = 0, ldo: int = 0, o_head: int = -1) -> np.ndarray:
    """The plan's transfers with `core` (default NumpyCore) doing each work item, on flat fp32 tensors of
    Plan.tensor_len elements; returns O (flat, Plan.o_len elements, NaN where nothing was written). Cores run
    their items one after another (the core kernel keeps its state in static data)."""
    pl = plan(T, H, ld, ldo, o_head)
    core = core or NumpyCore()
    out = np.full(pl.o_len, np.nan, np.float32)
    o_obj = np.zeros(TILE, np.float32)
    for h in range(H):
        kt = [k[g.tap_indices(t)].reshape(-1, KEYS * D) for t in pl.kv_taps(h)]
        vt = [v[g.tap_indices(t)].reshape(-1, KEYS * D) for t in pl.kv_taps(h)]
        k_tiles, v_tiles = np.concatenate(kt), np.concatenate(vt)
        skips = [skip for _, skip in key_tiles(T)]
        for p in range(passes(T)):
            for c in range(COLS):
                joined = []
                for r in range(ROWS):
                    start = slot_start(T, p, c, r)
                    core.q_tile(np.ascontiguousarray(q[g.tap_indices(pl.rows_tap(h, start))]), o_obj)
                    for kj, vj, skip in zip(k_tiles, v_tiles, skips):
                        core.scores(np.ascontiguousarray(kj), scale, skip)
                        core.values(np.ascontiguousarray(vj), o_obj)
                    core.finish(o_obj)
                    joined.append(o_obj.copy())
                stream = np.concatenate(joined)[g._indices(0, o_l2_dims())]
                for r in range(ROWS):
                    out[g.tap_indices(pl.o_tap(h, slot_start(T, p, c, r)))] = stream[r * TILE:(r + 1) * TILE]
    return out


# ---- the IRON program ----

def iron_program(T: int, H: int, scale: float, iron, ld: int = 0, ldo: int = 0, o_head: int = -1):
    """The design as IRON calls on `iron` (iron_layer.real(): returns the MLIR module; iron_layer.Recorder():
    records it for the host checks). T, H, the strides and the scale are constants of the xclbin."""
    pl = plan(T, H, ld, ldo, o_head)
    f32, ty, Tile = np.float32, iron.tensor_type, iron.Tile
    io_ty, o_ty = ty(pl.tensor_len, f32), ty(pl.o_len, f32)
    tile_ty, l2_ty = ty(TILE, f32), ty(ROWS * TILE, f32)

    q_fn = iron.Kernel("attention_q_tile", KERNEL_OBJECT, [tile_ty, tile_ty])
    scores_fn = iron.Kernel("attention_scores", KERNEL_OBJECT, [tile_ty, np.float32, np.int32])
    values_fn = iron.Kernel("attention_values", KERNEL_OBJECT, [tile_ty, tile_ty])
    finish_fn = iron.Kernel("attention_finish", KERNEL_OBJECT, [tile_ty])

    k_fifo = iron.ObjectFifo(tile_ty, depth=2, name="K")  # shim 0 -> all 16 cores (broadcast)
    v_fifo = iron.ObjectFifo(tile_ty, depth=1, name="V")  # shim 1 -> all 16 cores
    q_l3l2, q_l2l1, o_l2l3, o_l1l2 = [], [], [], []
    for c in range(COLS):
        mem = Tile(c, 1)
        q_l3l2.append(iron.ObjectFifo(l2_ty, depth=2, name=f"Q_L3L2_{c}"))
        q_l2l1.append(q_l3l2[c].cons().split([TILE * r for r in range(ROWS)], placement=mem,
                                             obj_types=[tile_ty] * ROWS, depths=[1] * ROWS,
                                             names=[f"Q_L2L1_{c}_{r}" for r in range(ROWS)]))
        o_l2l3.append(iron.ObjectFifo(l2_ty, depth=2, name=f"O_L2L3_{c}", dims_to_stream=o_l2_dims()))
        o_l1l2.append(o_l2l3[c].prod().join([TILE * r for r in range(ROWS)], placement=mem,
                                            obj_types=[tile_ty] * ROWS, depths=[1] * ROWS,
                                            names=[f"O_L1L2_{c}_{r}" for r in range(ROWS)]))

    items = H * passes(T)
    tiles = key_tiles(T)
    full = sum(1 for _, skip in tiles if skip == 0)
    tail = [skip for _, skip in tiles if skip]

    def core_fn(in_q, in_k, in_v, out_o, q_tile, scores, values, finish):  # one command's work items
        for _ in iron.range_(items):
            o = out_o.acquire(1)
            q = in_q.acquire(1)
            q_tile(q, o)
            in_q.release(1)
            for _ in iron.range_(full):
                k = in_k.acquire(1)
                scores(k, scale, 0)
                in_k.release(1)
                v = in_v.acquire(1)
                values(v, o)
                in_v.release(1)
            for skip in tail:  # the overlapped last key tile
                k = in_k.acquire(1)
                scores(k, scale, skip)
                in_k.release(1)
                v = in_v.acquire(1)
                values(v, o)
                in_v.release(1)
            finish(o)
            out_o.release(1)

    workers = [iron.Worker(core_fn, [q_l2l1[c][r].cons(), k_fifo.cons(), v_fifo.cons(), o_l1l2[c][r].prod(),
                                     q_fn, scores_fn, values_fn, finish_fn],
                           placement=Tile(c, 2 + r), while_true=True)
               for c in range(COLS) for r in range(ROWS)]

    def pattern(tap: g.Tap, n: int = pl.tensor_len):
        return iron.TensorAccessPattern((1, n), tap.offset, list(tap.sizes), list(tap.strides))

    rt = iron.Runtime()
    o_shim = [f.cons() for f in o_l2l3]
    with rt.sequence(io_ty, io_ty, io_ty, o_ty) as (Q, K, V, O):
        rt.start(*workers)
        for h in range(H):
            for p in range(passes(T)):
                tg = rt.task_group()
                for c in range(COLS):
                    for r in range(ROWS):
                        rt.fill(q_l3l2[c].prod(), Q, tap=pattern(pl.rows_tap(h, slot_start(T, p, c, r))),
                                task_group=tg, placement=Tile(c, 0))
                for tap in pl.kv_taps(h):
                    rt.fill(k_fifo.prod(), K, tap=pattern(tap), task_group=tg, placement=Tile(0, 0))
                    rt.fill(v_fifo.prod(), V, tap=pattern(tap), task_group=tg, placement=Tile(1, 0))
                for c in range(COLS):
                    for r in range(ROWS):
                        rt.drain(o_shim[c], O, tap=pattern(pl.o_tap(h, slot_start(T, p, c, r)), pl.o_len), wait=True,
                                 task_group=tg, placement=Tile(c, 0))
                rt.finish_task_group(tg)

    return iron.Program(iron.NPU1Col4(), rt).resolve_program(iron.SequentialPlacer())


def iron_module(T: int, H: int, scale: float, ld: int = 0, ldo: int = 0, o_head: int = -1):
    """The MLIR module of the attention design (needs mlir-aie)."""
    import iron_layer

    return iron_program(T, H, scale, iron_layer.real(), ld, ldo, o_head)
