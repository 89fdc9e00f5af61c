"""int8 (A8W8) x int8 -> fp32 GEMM for the Phoenix (npu1) 4x4 AIE-ML array: manifest dtype "i8_f32" (issue 13
item 3), beside the bf16 designs of gemm_design.py, with the core kernels of gemm_int8.cc.

The contract's int8 section (kernels/gemm_contract.h): qa = A quantised per row (host, dynamic, the emulator's
code), qb = B quantised per output column once at Compile; acc = sum_k qa qb in int32 (exact); C = float(acc) *
(sa_m * sb_n) in fp32. A row's scale needs its whole row's max first, so the host quantises A in one pass over
fp32 A (which it must read anyway); it writes the result straight in the layout below, so no memtile re-layout is
needed for A or B (the host does the blocking as it quantises; B is laid out once at upload).

Device buffers (the shim's three arguments A, B, C; the scales travel inside the A and B objects, because a memtile
has no free S2MM channel for a scale stream: A, B and the four C tiles of the join take all six):
  * A: int8, M/64 slabs x K/64 objects. Object (slab s, k-tile kt) at byte ((s * K/64) + kt) * OBJ: the 64x64 qa
       tile blocked 4x8 (r x s blocks, each row-major, blocks row-major), then the 64 fp32 scales sa of the slab's
       rows (the same in every kt object of a slab; the core reads the last one's). OBJ = 4096 + 256 bytes.
  * B: int8, N/64 n-tiles x K/64 objects. Object (n-tile nt, kt) at byte ((nt * K/64) + kt) * OBJ: the 64x64 qb
       tile blocked 8x8 (s x t), then the 64 fp32 scales sb of the n-tile's columns. Padded columns: q 0, scale 0.
  * C: fp32 row-major [M, N], as the bf16 design.
  M a multiple of 256 (the host stages A anyway: it quantises it), K of 64, N of 256.

Array mapping as the bf16 design: core (row r, column c) computes for each 256-row block bm the 64x64 tiles
(rows bm*256 + r*64, n-tile nb*4 + c), accumulating int32 in its C tile buffer (acc and C have the same size: the
epilogue converts in place), K/64 steps per tile, the last one followed by the dequantising epilogue. A is
broadcast along core row r by memtile r, B down column c by memtile c, C joined in memtile c into 256x64 slabs and
un-blocked (4x8 blocks) to row-major. The core program depends only on K: one xclbin per K.
L1: 2 x 4352 A + 2 x 4352 B + 16 KiB C = 33 KiB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import gemm_design as g

MMUL_R, MMUL_S, MMUL_T = 4, 8, 8  # aie::mmul<4, 8, 8, int8, int8, acc32>: 256 MACs per instruction
TILE_BYTES = g.TILE_M * g.TILE_K  # one int8 64x64 tile
SCALE_BYTES = 64 * 4  # 64 fp32 scales
OBJ_BYTES = TILE_BYTES + SCALE_BYTES
CHUNK = 256  # shim d0 in bytes: an object is 17 chunks (a whole object, 1088 words, is over the 10-bit wrap)
KERNEL_OBJECT = "gemm_int8.o"  # built from gemm_int8.cc with Peano by build_kernels.py
L1_BYTES = g.FIFO_DEPTH * 2 * OBJ_BYTES + g.C_L1_DEPTH * g.TILE_M * g.TILE_N * 4
assert L1_BYTES <= g.L1_LIMIT and OBJ_BYTES % CHUNK == 0


def check_shape(M: int, K: int, N: int) -> None:
    g.check_shape(M, K, N)
    if K * 127 * 127 >= 2 ** 31:
        raise ValueError(f"K={K}: int32 sums are exact only for K <= 133143")


def a_len(M: int, K: int) -> int:
    return M // g.TILE_M * (K // g.TILE_K) * OBJ_BYTES


def b_len(K: int, N: int) -> int:
    return N // g.TILE_N * (K // g.TILE_K) * OBJ_BYTES


def a_tap(M: int, K: int, N: int, bm: int, row: int) -> g.Tap:
    """The K/64 objects of slab bm*4 + row, sent once per column block (repeat dimension, stride 0)."""
    kt = K // g.TILE_K
    return g.Tap((bm * g.ROWS + row) * kt * OBJ_BYTES, (N // g.BLOCK_N, kt, OBJ_BYTES // CHUNK, CHUNK),
                 (0, OBJ_BYTES, CHUNK, 1))


def b_tap(M: int, K: int, N: int, bm: int, col: int) -> g.Tap:
    """The objects of n-tiles nb*4 + col (K/64 contiguous objects each); re-sent for every block bm."""
    kt = K // g.TILE_K
    return g.Tap(col * kt * OBJ_BYTES, (N // g.BLOCK_N, kt, OBJ_BYTES // CHUNK, CHUNK),
                 (g.COLS * kt * OBJ_BYTES, OBJ_BYTES, CHUNK, 1))


c_tap = g.c_tap  # fp32 C row-major, as the bf16 design


def c_l2_dims():
    """The joined 256x64 slab of 4x8-blocked core tiles -> row-major (memtile MM2S)."""
    m, n, r, t = g.TILE_M * g.ROWS, g.TILE_N, MMUL_R, MMUL_T
    return [(m // r, r * n), (r, t), (n // t, r * t), (t, 1)]


def check_transfers(M: int, K: int, N: int) -> None:
    """Raises ValueError unless every shim transfer is encodable and inside its tensor, and the C re-layout fits."""
    check_shape(M, K, N)
    for bm in range(M // g.BLOCK_M):
        for i in range(g.COLS):
            g.check_shim_tap(a_tap(M, K, N, bm, i), 1, a_len(M, K))
            g.check_shim_tap(b_tap(M, K, N, bm, i), 1, b_len(K, N))
            g.check_shim_tap(c_tap(M, K, N, bm, i), 4, M * N)
    g.check_mem_dims(c_l2_dims(), 4, g.BLOCK_M * g.TILE_N)


def memtile_bytes() -> int:
    return g.FIFO_DEPTH * 2 * OBJ_BYTES + g.FIFO_DEPTH * g.BLOCK_M * g.TILE_N * 4


# ---- the host side of the layouts (what the xrt backend writes; tests check them against the emulator) ----

def _blocked(tile: np.ndarray, r: int, s: int) -> np.ndarray:
    m, k = tile.shape
    return tile.reshape(m // r, r, k // s, s).transpose(0, 2, 1, 3).reshape(-1)


def _padded(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, x.dtype)
    out[tuple(slice(0, n) for n in x.shape)] = x
    return out


def _objects(outer: int, K: int, tile_of, r: int, s: int) -> np.ndarray:
    """The device buffer of `outer` x K/TILE_K L1 objects: object (o, kt) is tile_of(o, k-slice) -> (int8 tile, its
    fp32 scales), the tile blocked r x s as the core reads it, the scales after it."""
    out = np.empty((outer, K // g.TILE_K, OBJ_BYTES), np.uint8)
    for o in range(outer):
        for kt in range(K // g.TILE_K):
            tile, scales = tile_of(o, slice(kt * g.TILE_K, (kt + 1) * g.TILE_K))
            out[o, kt, :TILE_BYTES] = _blocked(tile, r, s).view(np.uint8)
            out[o, kt, TILE_BYTES:] = scales.view(np.uint8)
    return out.reshape(-1).view(np.int8)


def pack_a(qa: np.ndarray, sa: np.ndarray, M: int, K: int) -> np.ndarray:
    """qa int8 [rows <= M, k <= K] and its fp32 row scales -> the device A buffer (zero rows/columns as padding):
    one object per (slab of TILE_M rows, k-tile)."""
    q, s = _padded(qa, (M, K)), _padded(sa.astype(np.float32), (M,))
    rows = lambda slab: slice(slab * g.TILE_M, (slab + 1) * g.TILE_M)  # noqa: E731
    return _objects(M // g.TILE_M, K, lambda slab, ks: (q[rows(slab), ks], s[rows(slab)]), MMUL_R, MMUL_S)


def pack_b(qb: np.ndarray, sb: np.ndarray, K: int, N: int) -> np.ndarray:
    """qb int8 [k <= K, n <= N] (B quantised per column) and its fp32 column scales -> the device B buffer: one
    object per (n-tile, k-tile)."""
    q, s = _padded(qb, (K, N)), _padded(sb.astype(np.float32), (N,))
    cols = lambda nt: slice(nt * g.TILE_N, (nt + 1) * g.TILE_N)  # noqa: E731
    return _objects(N // g.TILE_N, K, lambda nt, ks: (q[ks, cols(nt)], s[cols(nt)]), MMUL_S, MMUL_T)


@dataclass
class CoreKernels:
    """The three entry points of gemm_int8.cc a core calls, on its L1 objects (numpy stand-ins by default; tests pass
    the host-compiled C++ ones)."""

    zero: object
    matmul: object
    matmul_dequant: object


def numpy_core() -> CoreKernels:
    def unblock(x, r, t):
        return x.reshape(64 // r, 64 // t, r, t).transpose(0, 2, 1, 3).reshape(64, 64)

    def matmul(a_obj, b_obj, c):
        acc = c.view(np.int32)
        a = unblock(a_obj[:TILE_BYTES], MMUL_R, MMUL_S).astype(np.int64)
        b = unblock(b_obj[:TILE_BYTES], MMUL_S, MMUL_T).astype(np.int64)
        prod = _blocked((a @ b), MMUL_R, MMUL_T)
        acc += prod.astype(np.int32)

    def matmul_dequant(a_obj, b_obj, c):
        matmul(a_obj, b_obj, c)
        sa = a_obj[TILE_BYTES:].view(np.float32)
        sb = b_obj[TILE_BYTES:].view(np.float32)
        scale = _blocked(sa[:, None] * sb[None, :], MMUL_R, MMUL_T)  # fp32 products, as the core
        c[:] = c.view(np.int32).astype(np.float32) * scale

    return CoreKernels(zero=lambda c: c.view(np.int32).fill(0), matmul=matmul, matmul_dequant=matmul_dequant)


def simulate(a_dev: np.ndarray, b_dev: np.ndarray, M: int, K: int, N: int, core: CoreKernels | None = None
             ) -> np.ndarray:
    """Runs the design's data movement on the device buffers (int8 arrays of a_len / b_len bytes) with the core
    kernels `core`; returns C [M, N] fp32."""
    check_transfers(M, K, N)
    core = core or numpy_core()
    a8, b8 = a_dev.view(np.uint8), b_dev.view(np.uint8)
    assert a8.size == a_len(M, K) and b8.size == b_len(K, N)
    c = np.full(M * N, np.nan, np.float32)
    kt = K // g.TILE_K
    c_l2 = g._indices(0, c_l2_dims())
    for bm in range(M // g.BLOCK_M):
        a_objs = [a8[g.tap_indices(a_tap(M, K, N, bm, r))].reshape(-1, OBJ_BYTES) for r in range(g.ROWS)]
        b_objs = [b8[g.tap_indices(b_tap(M, K, N, bm, c_))].reshape(-1, OBJ_BYTES) for c_ in range(g.COLS)]
        for col in range(g.COLS):
            out = []
            for nb in range(N // g.BLOCK_N):
                slab = np.zeros(g.BLOCK_M * g.TILE_N, np.float32)
                for row in range(g.ROWS):
                    tile = np.ascontiguousarray(slab[row * 4096:(row + 1) * 4096])
                    core.zero(tile)
                    for i in range(nb * kt, (nb + 1) * kt):
                        a_obj = np.ascontiguousarray(a_objs[row][i]).view(np.int8)
                        b_obj = np.ascontiguousarray(b_objs[col][i]).view(np.int8)
                        (core.matmul_dequant if i == (nb + 1) * kt - 1 else core.matmul)(a_obj, b_obj, tile)
                    slab[row * 4096:(row + 1) * 4096] = tile
                out.append(slab[c_l2])
            c[g.tap_indices(c_tap(M, K, N, bm, col))] = np.concatenate(out)
    return c.reshape(M, N)


# ---- the IRON program ----

def iron_program(M: int, K: int, N: int, iron):
    """The i8_f32 design as IRON calls on `iron` (iron_layer.real(): returns the MLIR module; iron_layer.Recorder():
    records it for the host checks). Only the runtime sequence depends on M and N."""
    check_shape(M, K, N)
    i8, f32, ty, Tile = np.int8, np.float32, iron.tensor_type, iron.Tile
    a_ty, b_ty, c_ty = ty(a_len(M, K), i8), ty(b_len(K, N), i8), ty(M * N, f32)
    obj_ty, c_l1_ty, c_l2_ty = ty(OBJ_BYTES, i8), ty(g.TILE_M * g.TILE_N, f32), ty(g.BLOCK_M * g.TILE_N, f32)

    zero = iron.Kernel("zero_acc_i8", KERNEL_OBJECT, [c_l1_ty])
    matmul = iron.Kernel("matmul_obj_i8", KERNEL_OBJECT, [obj_ty, obj_ty, c_l1_ty])
    matmul_dequant = iron.Kernel("matmul_obj_i8_dequant", KERNEL_OBJECT, [obj_ty, obj_ty, c_l1_ty])

    a_l3l2, a_l2l1, b_l3l2, b_l2l1, c_l2l3, c_l1l2 = [], [], [], [], [], []
    for i in range(g.COLS):  # memtile i: A of core row i, B and C of core column i; A and B pass unchanged
        mem = Tile(i, 1)
        a_l3l2.append(iron.ObjectFifo(obj_ty, depth=g.FIFO_DEPTH, name=f"A_L3L2_{i}"))
        a_l2l1.append(a_l3l2[i].cons().forward(placement=mem, obj_type=obj_ty, depth=g.FIFO_DEPTH, name=f"A_L2L1_{i}"))
        b_l3l2.append(iron.ObjectFifo(obj_ty, depth=g.FIFO_DEPTH, name=f"B_L3L2_{i}"))
        b_l2l1.append(b_l3l2[i].cons().forward(placement=mem, obj_type=obj_ty, depth=g.FIFO_DEPTH, name=f"B_L2L1_{i}"))
        c_l2l3.append(iron.ObjectFifo(c_l2_ty, depth=g.FIFO_DEPTH, name=f"C_L2L3_{i}", dims_to_stream=c_l2_dims()))
        c_l1l2.append(c_l2l3[i].prod().join([g.TILE_M * g.TILE_N * r for r in range(g.ROWS)], placement=mem,
                                            obj_types=[c_l1_ty] * g.ROWS,
                                            names=[f"C_L1L2_{i}_{r}" for r in range(g.ROWS)],
                                            depths=[g.C_L1_DEPTH] * g.ROWS))

    steps = K // g.TILE_K

    def core_fn(in_a, in_b, out_c, zero_fn, matmul_fn, last_fn):  # one C tile; the Worker repeats it forever
        c = out_c.acquire(1)
        zero_fn(c)
        if steps > 1:
            for _ in iron.range_(steps - 1):
                a = in_a.acquire(1)
                b = in_b.acquire(1)
                matmul_fn(a, b, c)
                in_a.release(1)
                in_b.release(1)
        a = in_a.acquire(1)  # the last K step, then the epilogue with this step's scales
        b = in_b.acquire(1)
        last_fn(a, b, c)
        in_a.release(1)
        in_b.release(1)
        out_c.release(1)

    workers = [iron.Worker(core_fn, [a_l2l1[row].cons(), b_l2l1[col].cons(), c_l1l2[col][row].prod(), zero, matmul,
                                     matmul_dequant], placement=Tile(col, 2 + row), while_true=True)
               for row in range(g.ROWS) for col in range(g.COLS)]

    def pattern(tensor_len: int, tap: g.Tap):
        return iron.TensorAccessPattern((1, tensor_len), tap.offset, list(tap.sizes), list(tap.strides))

    rt = iron.Runtime()
    c_shim = [c.cons() for c in c_l2l3]
    with rt.sequence(a_ty, b_ty, c_ty) as (A, B, C):
        rt.start(*workers)
        for bm in range(M // g.BLOCK_M):
            tg = rt.task_group()
            for i in range(g.COLS):
                shim = Tile(i, 0)
                rt.fill(a_l3l2[i].prod(), A, tap=pattern(a_len(M, K), a_tap(M, K, N, bm, i)), task_group=tg,
                        placement=shim)
                rt.fill(b_l3l2[i].prod(), B, tap=pattern(b_len(K, N), b_tap(M, K, N, bm, i)), task_group=tg,
                        placement=shim)
                rt.drain(c_shim[i], C, tap=pattern(M * N, c_tap(M, K, N, bm, i)), wait=True, task_group=tg,
                         placement=shim)
            rt.finish_task_group(tg)

    return iron.Program(iron.NPU1Col4(), rt).resolve_program(iron.SequentialPlacer())


def iron_module(M: int, K: int, N: int):
    """The MLIR module of the i8_f32 design (needs mlir-aie)."""
    import iron_layer

    return iron_program(M, K, N, iron_layer.real())
