"""bf16 x bf16 -> fp32 GEMM for the Phoenix (npu1) 4x4 AIE-ML array, in IRON (mlir-aie's `aie.iron` API).

Implements the GEMM contract of kernels/gemm_contract.h for one padded shape: C[M, N] = A[M, K] . B[K, N] with
  * A: bf16 row-major [M, K]                       (host converts fp32 -> bf16, round to nearest even)
  * B: bf16 packed: 64x64 tiles, each row-major, tiles n-tile major then k-tile: tile (kt, nt) starts at
       ((nt * K/64) + kt) * 64 * 64                (the layout xdna::kernels::pack_b writes)
  * C: fp32 row-major [M, N]
  M a multiple of 256 (4 core rows x 64), K of 64, N of 256 (4 columns x 64).

Array mapping (core (row r, column c), r, c in 0..3):
  * Core (r, c) computes, for each 256-row block bm, the 64x64 C tiles (rows bm*256 + r*64, n-tile nt) for every
    nt = nb*4 + c, looping over K in 64-steps: acquire A tile, acquire B tile, 4x8x4 bf16 MACs, fp32 accumulate.
  * A: shim DMA of column r streams the 64-row slab of core row r (K/64 tiles, repeated for every nb) to memtile
    r, which broadcasts it to the 4 cores of row r, re-laid into 4x8 (r x s) blocks for the mmul.
  * B: shim DMA of column c streams the packed tiles of n-tiles nb*4 + c (contiguous K/64 tiles each) to memtile
    c, which broadcasts them down column c, re-laid into 8x4 (s x t) blocks.
  * C: each core's 64x64 tile (4x4 blocks) is joined in memtile c into a 256x64 slab, un-blocked to row-major,
    and written by the shim of column c into C.
  The core program depends only on K (it loops forever over output tiles), so every (M, N) of one K shares one
  xclbin (hence one hardware context); M and N live in the runtime sequence (insts.bin) only.

Issue 15 (dataflow v2, see docs/npu.md): kernels of manifest dtype f32_f32 read A as fp32 from ORT's own buffer
(imported in place) in 64x32 halves of a K-tile and round it in the core (gemm_bf16.cc matmul_f32a_bf16_f32,
round-to-nearest-even set explicitly); an exact height such as 1500 replicates row M-1 into the last block's
padding on read and writes those rows back onto row M-1 (identical values). The core kernel and the host protocol
(fake device) exist and are tested; this IRON program still builds the bf16-A, 256-multiple kernels only: the
f32 A fifos (64x32 objects, two acquires per B tile) and the tail taps are the next step here.

The pure-Python parts (transfer plans, layouts, `simulate`) run without mlir-aie; tests use `simulate` to check
that the planned data movement and the core kernel's blocked indexing compute A . B exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TILE_M = TILE_K = TILE_N = 64  # gemm_contract.h kTileM/K/N
ROWS = COLS = 4  # gemm_contract.h kArrayRows/kArrayCols (npu1: 4 usable columns x 4 core rows)
BLOCK_M, BLOCK_N = TILE_M * ROWS, TILE_N * COLS
MMUL_R, MMUL_S, MMUL_T = 4, 8, 4  # aie::mmul<4, 8, 4, bfloat16, bfloat16, accfloat>
# Shim DMA buffer descriptor limits on AIE2: 3 wrapped dimensions of <= 1023 plus a repeat count <= 64 (for the
# outermost dimension; ours is the n-block loop).
MAX_DIM, MAX_REPEAT = 1023, 64
FIFO_DEPTH = 2  # A and B double-buffered in L1 and the memtiles
C_L1_DEPTH = 1  # one C tile per core: the 64 KiB data memory holds 2 x (8 KiB A + 8 KiB B) + 16 KiB C = 48 KiB
L1_BYTES = FIFO_DEPTH * (TILE_M * TILE_K * 2 + TILE_K * TILE_N * 2) + C_L1_DEPTH * TILE_M * TILE_N * 4
assert L1_BYTES <= 48 * 1024  # leaves room for stack and the kernel's locals


@dataclass(frozen=True)
class Tap:
    """One shim DMA transfer: element offset, sizes and strides (outermost first) into a flat host buffer."""

    offset: int
    sizes: tuple[int, int, int, int]
    strides: tuple[int, int, int, int]


def check_shape(M: int, K: int, N: int) -> None:
    if M <= 0 or M % BLOCK_M or K <= 0 or K % TILE_K or N <= 0 or N % BLOCK_N:
        raise ValueError(f"padded shape {M}x{K}x{N}: M must be a multiple of {BLOCK_M}, K of {TILE_K}, N of {BLOCK_N}")
    if N // BLOCK_N > MAX_REPEAT:
        raise ValueError(f"N={N}: more than {MAX_REPEAT} column blocks per shim transfer (N <= {MAX_REPEAT * BLOCK_N})")
    if K // TILE_K > MAX_DIM:
        raise ValueError(f"K={K} too large for one shim transfer")


def a_tap(M: int, K: int, N: int, bm: int, row: int) -> Tap:
    """A slab of core row `row` in block bm: K/64 tiles of 64x64, sent tile by tile, repeated for every nb."""
    return Tap((bm * BLOCK_M + row * TILE_M) * K, (N // BLOCK_N, K // TILE_K, TILE_M, TILE_K), (0, TILE_K, K, 1))


def b_tap(M: int, K: int, N: int, bm: int, col: int) -> Tap:
    """Packed B tiles of n-tiles nb*4 + col (each K/64 contiguous 64x64 tiles); re-sent for every block bm."""
    kt = K // TILE_K
    tile = TILE_K * TILE_N
    return Tap(col * kt * tile, (N // BLOCK_N, kt, TILE_K, TILE_N), (COLS * kt * tile, tile, TILE_N, 1))


def c_tap(M: int, K: int, N: int, bm: int, col: int) -> Tap:
    """256x64 C slabs of n-tiles nb*4 + col in block bm, into row-major C."""
    return Tap(bm * BLOCK_M * N + col * TILE_N, (1, N // BLOCK_N, BLOCK_M, TILE_N), (0, COLS * TILE_N, N, 1))


# Memtile -> core (A, B) and memtile -> shim (C) re-layouts, as IRON dims_to_stream lists of (size, stride).
def a_l1_dims():
    m, k, r, s = TILE_M, TILE_K, MMUL_R, MMUL_S
    return [(m // r, r * k), (k // s, s), (r, k), (s, 1)]


def b_l1_dims():
    k, n, s, t = TILE_K, TILE_N, MMUL_S, MMUL_T
    return [(k // s, s * n), (n // t, t), (s, n), (t, 1)]


def c_l2_dims():
    m, n, r, t = TILE_M * ROWS, TILE_N, MMUL_R, MMUL_T  # the joined 256x64 slab: 4 core tiles stacked
    return [(m // r, r * n), (r, t), (n // t, r * t), (t, 1)]


def _indices(offset: int, dims) -> np.ndarray:
    """Element indices a DMA with these (size, stride) dims visits, in order."""
    idx = np.array([offset], dtype=np.int64)
    for size, stride in dims:
        idx = (idx[:, None] + np.arange(size, dtype=np.int64)[None, :] * stride).reshape(-1)
    return idx


def tap_indices(tap: Tap) -> np.ndarray:
    return _indices(tap.offset, zip(tap.sizes, tap.strides))


def core_matmul_blocked(a_blk: np.ndarray, b_blk: np.ndarray, c_blk: np.ndarray) -> None:
    """What gemm_bf16.cc's matmul_bf16_f32 computes, on the same blocked layouts (float64 here)."""
    m, k, n, r, s, t = TILE_M, TILE_K, TILE_N, MMUL_R, MMUL_S, MMUL_T
    a = a_blk.reshape(m // r, k // s, r, s).transpose(0, 2, 1, 3).reshape(m, k)
    b = b_blk.reshape(k // s, n // t, s, t).transpose(0, 2, 1, 3).reshape(k, n)
    c = c_blk.reshape(m // r, n // t, r, t)
    c += (a @ b).reshape(m // r, r, n // t, t).transpose(0, 2, 1, 3)


def simulate(a: np.ndarray, b_packed: np.ndarray, M: int, K: int, N: int) -> np.ndarray:
    """Runs the design's data movement on numpy arrays: a = flat A [M*K], b_packed = flat packed B [K*N]."""
    check_shape(M, K, N)
    c = np.full(M * N, np.nan)
    tile_a, tile_b = TILE_M * TILE_K, TILE_K * TILE_N
    for bm in range(M // BLOCK_M):
        # What each memtile receives from its shim, cut into the objects the fifos hold.
        a_objs = [a[tap_indices(a_tap(M, K, N, bm, r))].reshape(-1, tile_a) for r in range(ROWS)]
        b_objs = [b_packed[tap_indices(b_tap(M, K, N, bm, c_))].reshape(-1, tile_b) for c_ in range(COLS)]
        a_l1, b_l1 = _indices(0, a_l1_dims()), _indices(0, b_l1_dims())
        slabs = [[] for _ in range(COLS)]
        for col in range(COLS):
            for nb in range(N // BLOCK_N):
                slab = np.zeros(BLOCK_M * TILE_N)
                for row in range(ROWS):
                    acc = slab[row * TILE_M * TILE_N:(row + 1) * TILE_M * TILE_N]  # view: join offset m*n*row
                    for kt in range(K // TILE_K):
                        i = nb * (K // TILE_K) + kt  # the core's acquire order
                        core_matmul_blocked(a_objs[row][i][a_l1], b_objs[col][i][b_l1], acc)
                slabs[col].append(slab[_indices(0, c_l2_dims())])
            out = np.concatenate(slabs[col])
            c[tap_indices(c_tap(M, K, N, bm, col))] = out
    return c.reshape(M, N)


# ---------------------------------------------------------------------------------------------------------------
# Dataflow v2 (issue 15, manifest dtype f32_f32): fp32 A read in place from ORT's buffer, any height M.
#   * Each core row's 64-row A slab is filled into its memtile once per 256-row block (fp32 64 x K <= 256 KiB, i.e.
#     K <= 1024) and re-read from there for every column block, instead of re-streamed from DDR (see v2_fits).
#   * Rows past M inside the last block are filled with copies of row M-1 (a second shim BD with row stride 0), so
#     the DMA never reads outside the tensor; their C rows are then bit-identical to row M-1 (same operands, same
#     core code, same order) and the shim writes them back onto row M-1, so it never writes outside C either.
#   * The memtile sends A to the cores as 64x32 fp32 halves of a K-tile (8 KiB, blocked 4x8); the core rounds
#     them to bf16 itself (gemm_bf16.cc matmul_f32a_bf16_f32, round-to-nearest-even) and uses the matching half
#     of the 64x64 B tile. B and C travel as in v1.
# The plan is pure Python; simulate_v2 runs it on numpy arrays (tests compare it with the contract).

TILE_KH = TILE_K // 2  # fp32 A objects: 64 x 32 = 8 KiB, as a bf16 64 x 64 tile
SLAB_BUDGET = 256 * 1024  # bytes of a memtile a resident A slab may take (the rest: B and C buffers)


def v2_fits(K: int) -> bool:
    """Whether the fp32 A slab of a core row fits its memtile. Larger K (fc2: 2048) streams A object by object as
    v1 does, the last block's objects with two BDs each (real rows, then copies of row M-1); simulate_v2 covers the
    resident-slab plan only."""
    return TILE_M * K * 4 <= SLAB_BUDGET


def a_slab_taps_v2(M: int, K: int, bm: int, row: int) -> list[Tap]:
    """Shim BDs filling the 64-row fp32 A slab of core `row` in block bm (flat element offsets into A [M, K])."""
    start = bm * BLOCK_M + row * TILE_M
    valid = max(0, min(TILE_M, M - start))
    taps = []
    if valid:
        taps.append(Tap(start * K, (1, 1, valid, K), (0, 0, K, 1)))
    if valid < TILE_M:  # replicate row M-1
        taps.append(Tap((M - 1) * K, (1, 1, TILE_M - valid, K), (0, 0, 0, 1)))
    return taps


def a_l1_dims_v2(K: int):
    """Memtile slab (row stride K) -> core: one 64x32 fp32 object, blocked 4x8; offset kt_half * 32."""
    m, k, r, s = TILE_M, TILE_KH, MMUL_R, MMUL_S
    return [(m // r, r * K), (k // s, s), (r, K), (s, 1)]


def c_taps_v2(M: int, N: int, bm: int, col: int, nb: int) -> list[Tap]:
    """Shim BDs writing one 256x64 C slab (n-tile nb*4 + col of block bm) into C [M, N]: real rows, then the
    padding rows onto row M-1."""
    start = bm * BLOCK_M
    valid = max(0, min(BLOCK_M, M - start))
    n0 = (nb * COLS + col) * TILE_N
    taps = []
    if valid:
        taps.append(Tap(start * N + n0, (1, 1, valid, TILE_N), (0, 0, N, 1)))
    if valid < BLOCK_M:
        taps.append(Tap((M - 1) * N + n0, (1, 1, BLOCK_M - valid, TILE_N), (0, 0, 0, 1)))
    return taps


def _rne_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 with round to nearest even, as values (NaN handling not modelled here)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32)).view(np.float32)


def _core_half(a_blk: np.ndarray, b_half: np.ndarray, c_blk: np.ndarray) -> None:
    """matmul_f32a_bf16_f32 on its blocked layouts: a 64x32 fp32 half (rounded here, as the core does), the
    matching 32 rows of the blocked B tile, C += A.B (float64)."""
    m, k, n, r, s, t = TILE_M, TILE_KH, TILE_N, MMUL_R, MMUL_S, MMUL_T
    a = _rne_bf16(a_blk).astype(np.float64).reshape(m // r, k // s, r, s).transpose(0, 2, 1, 3).reshape(m, k)
    b = b_half.reshape(k // s, n // t, s, t).transpose(0, 2, 1, 3).reshape(k, n)
    c = c_blk.reshape(m // r, n // t, r, t)
    c += (a @ b).reshape(m // r, r, n // t, t).transpose(0, 2, 1, 3)


def simulate_v2(a: np.ndarray, b_packed: np.ndarray, M: int, K: int, N: int) -> np.ndarray:
    """The v2 data movement on numpy arrays: a = flat fp32 A [M*K] (M any height), b_packed = flat bf16-valued
    packed B [K*N]. Checks that every DMA stays inside A and C and that padding rows rewrite row M-1 unchanged."""
    if M <= 0 or K % TILE_K or N % BLOCK_N or not v2_fits(K):
        raise ValueError(f"v2 plan needs K a multiple of {TILE_K} and <= {SLAB_BUDGET // (TILE_M * 4)}, N of {BLOCK_N}")
    c = np.full(M * N, np.nan)
    written = np.zeros(M * N, bool)
    tile_b = TILE_K * TILE_N
    for bm in range(-(-M // BLOCK_M)):
        slabs = []
        for row in range(ROWS):
            idx = np.concatenate([tap_indices(t) for t in a_slab_taps_v2(M, K, bm, row)])
            assert idx.min() >= 0 and idx.max() < M * K, "A read outside the tensor"
            slabs.append(a[idx].astype(np.float32))  # the memtile slab, 64 x K row-major
        b_objs = [b_packed[tap_indices(b_tap(BLOCK_M, K, N, 0, c_))].reshape(-1, tile_b) for c_ in range(COLS)]
        b_l1 = _indices(0, b_l1_dims())
        for col in range(COLS):
            for nb in range(N // BLOCK_N):
                slab_c = np.zeros(BLOCK_M * TILE_N)
                for row in range(ROWS):
                    acc = slab_c[row * TILE_M * TILE_N:(row + 1) * TILE_M * TILE_N]
                    for kt in range(K // TILE_K):
                        b_tile = b_objs[col][nb * (K // TILE_K) + kt][b_l1]
                        for half in range(2):
                            a_obj = slabs[row][_indices((2 * kt + half) * TILE_KH, a_l1_dims_v2(K))]
                            _core_half(a_obj, b_tile[half * TILE_KH * TILE_N:(half + 1) * TILE_KH * TILE_N], acc)
                out = slab_c[_indices(0, c_l2_dims())]
                pos = 0
                for tap in c_taps_v2(M, N, bm, col, nb):
                    idx = tap_indices(tap)
                    assert idx.min() >= 0 and idx.max() < M * N, "C written outside the tensor"
                    vals = out[pos:pos + idx.size]
                    pos += idx.size
                    again = written[idx]
                    assert np.array_equal(c[idx][again], vals[again]), "a padding row changed row M-1"
                    c[idx] = vals
                    written[idx] = True
                assert pos == out.size
    return c.reshape(M, N)


# ---------------------------------------------------------------------------------------------------------------
# The IRON program (needs mlir-aie).

KERNEL_OBJECT = "gemm_bf16.o"  # built from gemm_bf16.cc with Peano by build_kernels.py


def iron_module(M: int, K: int, N: int):
    """Returns the MLIR module of the design for padded shape M x K x N."""
    check_shape(M, K, N)
    import sys

    from ml_dtypes import bfloat16

    from aie.helpers.taplib import TensorAccessPattern
    from aie.iron import Kernel, ObjectFifo, Program, Runtime, Worker
    from aie.iron.device import NPU1Col4, Tile
    from aie.iron.placers import SequentialPlacer

    try:
        from aie.iron.controlflow import range_
    except ImportError:  # mlir-aie before the IRON controlflow module
        from aie.helpers.dialects.ext.scf import _for as range_

    a_ty = np.ndarray[(M * K,), np.dtype[bfloat16]]
    b_ty = np.ndarray[(K * N,), np.dtype[bfloat16]]
    c_ty = np.ndarray[(M * N,), np.dtype[np.float32]]
    a_tile_ty = np.ndarray[(TILE_M * TILE_K,), np.dtype[bfloat16]]
    b_tile_ty = np.ndarray[(TILE_K * TILE_N,), np.dtype[bfloat16]]
    c_tile_ty = np.ndarray[(TILE_M * TILE_N,), np.dtype[np.float32]]
    c_slab_ty = np.ndarray[(BLOCK_M * TILE_N,), np.dtype[np.float32]]

    zero = Kernel("zero_f32", KERNEL_OBJECT, [c_tile_ty])
    matmul = Kernel("matmul_bf16_f32", KERNEL_OBJECT, [a_tile_ty, b_tile_ty, c_tile_ty])

    a_l3l2, a_l2l1, b_l3l2, b_l2l1, c_l2l3, c_l1l2 = [], [], [], [], [], []
    for i in range(COLS):
        a_l3l2.append(ObjectFifo(a_tile_ty, name=f"A_L3L2_{i}", depth=FIFO_DEPTH))
        a_l2l1.append(a_l3l2[i].cons().forward(obj_type=a_tile_ty, name=f"A_L2L1_{i}", dims_to_stream=a_l1_dims(),
                                               placement=Tile(i, 1)))
        b_l3l2.append(ObjectFifo(b_tile_ty, name=f"B_L3L2_{i}", depth=FIFO_DEPTH))
        b_l2l1.append(b_l3l2[i].cons().forward(obj_type=b_tile_ty, name=f"B_L2L1_{i}", dims_to_stream=b_l1_dims(),
                                               placement=Tile(i, 1)))
        c_l2l3.append(ObjectFifo(c_slab_ty, name=f"C_L2L3_{i}", depth=FIFO_DEPTH, dims_to_stream=c_l2_dims()))
        c_l1l2.append(c_l2l3[i].prod().join([TILE_M * TILE_N * r for r in range(ROWS)], obj_types=[c_tile_ty] * ROWS,
                                            names=[f"C_L1L2_{i}_{r}" for r in range(ROWS)],
                                            depths=[C_L1_DEPTH] * ROWS, placement=Tile(i, 1)))

    k_steps = K // TILE_K

    def core_fn(in_a, in_b, out_c, zero_fn, matmul_fn):
        for _ in range_(sys.maxsize):  # forever: the runtime sequence decides how many tiles come
            c_tile = out_c.acquire(1)
            zero_fn(c_tile)
            for _ in range_(k_steps):
                a_tile = in_a.acquire(1)
                b_tile = in_b.acquire(1)
                matmul_fn(a_tile, b_tile, c_tile)
                in_a.release(1)
                in_b.release(1)
            out_c.release(1)

    workers = [
        Worker(core_fn, [a_l2l1[row].cons(), b_l2l1[col].cons(), c_l1l2[col][row].prod(), zero, matmul],
               placement=Tile(col, 2 + row))
        for row in range(ROWS) for col in range(COLS)
    ]

    def pattern(tensor_len: int, tap: Tap):
        return TensorAccessPattern((1, tensor_len), tap.offset, list(tap.sizes), list(tap.strides))

    rt = Runtime()
    with rt.sequence(a_ty, b_ty, c_ty) as (A, B, C):
        rt.start(*workers)
        for bm in range(M // BLOCK_M):
            tg = rt.task_group()
            for i in range(COLS):
                rt.fill(a_l3l2[i].prod(), A, tap=pattern(M * K, a_tap(M, K, N, bm, i)), task_group=tg,
                        placement=Tile(i, 0))
                rt.fill(b_l3l2[i].prod(), B, tap=pattern(K * N, b_tap(M, K, N, bm, i)), task_group=tg,
                        placement=Tile(i, 0))
                rt.drain(c_l2l3[i].cons(), C, tap=pattern(M * N, c_tap(M, K, N, bm, i)), wait=True, task_group=tg,
                         placement=Tile(i, 0))
            rt.finish_task_group(tg)

    return Program(NPU1Col4(), rt).resolve_program(SequentialPlacer())


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Print the MLIR of the bf16 GEMM design for padded M x K x N")
    p.add_argument("-M", type=int, required=True)
    p.add_argument("-K", type=int, required=True)
    p.add_argument("-N", type=int, required=True)
    args = p.parse_args()
    print(iron_module(args.M, args.K, args.N))
