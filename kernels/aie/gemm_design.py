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

Issue 15 (dataflow v2, see docs/npu.md and the "Dataflow v2" section below): kernels of manifest dtype f32_f32
read A as fp32 from ORT's own buffer in place, in 64x32 halves of a K-tile, and round it in the core
(gemm_bf16.cc matmul_f32a_bf16_f32, round-to-nearest-even set explicitly); heights are exact (e.g. 1500: the last
256-row block overlaps its predecessor) and C is written in place. iron_program_f32 is that program, written
against a namespace of IRON names (iron_layer.py) so that the host tests can record and check it without mlir-aie.

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
# Dataflow v2 (issue 15, manifest dtype f32_f32): fp32 A read in place from ORT's buffer, C written in place, any
# height M >= 256 (e.g. 1500 or 3000: one run per call), K a multiple of 64, N of 256, B packed as in v1.
#
#   * A and B travel in K-halves: the core gets a 64x32 fp32 A object (8 KiB, blocked 4x8) and the matching
#     32x64 bf16 half of a packed B tile (4 KiB, blocked 8x4: the full tile's blocks are K-major, so a half is a
#     contiguous half of the stream), rounds A to bf16 itself (gemm_bf16.cc matmul_f32a_bf16_f32, RNE set
#     explicitly) and accumulates into its 64x64 fp32 C tile. L1: 2 x 8 + 2 x 4 + 16 = 40 KiB.
#   * Heights: blocks of 256 rows; the last block is moved up to end at row M, overlapping its predecessor. Every
#     DMA then reads and writes whole 256-row blocks inside A and C (no padding, no stride-0 inner dimension, which
#     the shim BD cannot encode: only its outermost "repeat" dimension may have stride 0). The overlapped rows are
#     computed again and written again with the same bits: a C row depends only on its A row and on B, summed in a
#     fixed order. Needs M >= 256; smaller calls use a 256-row kernel on a staged A (the backend does this).
#   * A residency: when the 64-row fp32 slab of a core row fits its memtile (K <= 1024), the shim fills it once per
#     block (row-major, re-laid half-major by the memtile's S2MM) and the memtile sends it once per column block
#     (BD repeat count N/256) instead of re-reading DDR. Larger K (conv2 1536, fc2 2048) stream the halves from
#     DDR once per column block (the shim BD's repeat dimension), as v1 does with bf16 tiles.
#   * B and C move as in v1: B re-read per 256-row block (the model's "B resident" case for 512x512 is not built),
#     C tiles joined in the memtile into 256x64 slabs, un-blocked, written by the shim.
# plan_f32 is pure Python; simulate_f32 runs it on numpy arrays and check_shim_tap checks each transfer against
# the AIE-ML BD limits (mlir-aie's verifyStridesWraps: 10-bit wraps, 20-bit steps, 6-bit repeat on the shim).
#   * Designed, not built or wired (issue 15 item 2): b_kind "kt" reads a head's K^T in place (fp32, rounded in
#     the core by matmul_f32a_f32b_f32) with A's and C's row strides, for S_h = Q_h K_h^T; see F32Plan.

TILE_KH = TILE_K // 2
MEMTILE_BYTES = 512 * 1024  # AIETargetModel getMemTileSize (npu1)
SLAB_BUDGET = 256 * 1024  # bytes of a memtile a resident A slab may take (the rest: B and C buffers)
SHIM_WRAP, SHIM_STEP_WORDS = 1023, 1 << 20  # shim BD: d0/d1 wraps 10 bits, steps 20 bits (in 4-byte words)
MEM_DIMS, MEM_WRAP, MEM_STEP_WORDS = 4, 1023, 1 << 17  # memtile BD: 4 dimensions, 10-bit wraps, 17-bit steps
A_HALF, B_HALF = TILE_M * TILE_KH, TILE_KH * TILE_N  # elements of one A / B object in L1


def check_shape_f32(M: int, K: int, N: int, b_kind: str = "packed") -> None:
    check_shape(BLOCK_M, K, N if b_kind == "packed" else max(BLOCK_N, N // BLOCK_N * BLOCK_N))
    if N < BLOCK_N:
        raise ValueError(f"N={N}: must be >= {BLOCK_N}")
    if M < BLOCK_M:
        raise ValueError(f"f32_f32 height {M}: must be >= {BLOCK_M} (smaller calls run a 256-row kernel, staged)")
    if K // TILE_KH > MAX_DIM:
        raise ValueError(f"K={K} too large")


def a_resident(K: int) -> bool:
    """Whether the fp32 A slab of a core row (64 x K) stays in its memtile for all column blocks."""
    return TILE_M * K * 4 <= SLAB_BUDGET


def block_starts(M: int) -> list[int]:
    """First row of each 256-row block; the last one ends at row M (see above)."""
    return [min(i * BLOCK_M, M - BLOCK_M) for i in range(-(-M // BLOCK_M))]


def col_block_starts(N: int) -> list[int]:
    """First column of each 256-column block; as for rows, the last one ends at column N (run-time B only: packed B
    is padded to a multiple of 256 by pack_b)."""
    return [min(j * BLOCK_N, N - BLOCK_N) for j in range(-(-N // BLOCK_N))]


def a_slab_depth(K: int, b_elem: int = 2) -> int:
    """Double-buffer the slab (prefetch the next block's) when two fit beside B and C, else one."""
    rest = FIFO_DEPTH * B_HALF * b_elem + FIFO_DEPTH * BLOCK_M * TILE_N * 4
    return 2 if 2 * TILE_M * K * 4 + rest <= MEMTILE_BYTES else 1


@dataclass(frozen=True)
class F32Plan:
    """Everything of the f32_f32 design that is not IRON syntax; iron_program_f32 turns it into the program."""

    M: int
    K: int
    N: int
    resident: bool
    a_l2_len: int  # elements of one A object in the memtile: the slab, or one half
    a_depth: int  # memtile buffers of A
    a_l2_from_stream: tuple  # memtile S2MM re-layout of A (resident: row-major slab -> half-major), or ()
    a_l1_dims: tuple  # memtile MM2S -> cores: blocked 4x8 halves
    a_repeat: int  # memtile BD repeat count of A (resident: once per column block), 1 = none
    b_l1_dims: tuple
    c_l2_dims: tuple
    blocks: tuple
    # Run-time B (issue 15 item 2, designed, not wired into the backend): "kt" reads B = K_h^T in place from a
    # head's keys (fp32 [N rows, ldb], B[k, n] = keys[n * ldb + k]) and rounds it in the core; "packed" is the
    # weights' bf16 layout. lda, ldb, ldc: row strides in elements (0 = dense), e.g. H * 64 for a head's Q rows.
    b_kind: str = "packed"
    lda: int = 0
    ldb: int = 0
    ldc: int = 0

    @property
    def static_key(self) -> tuple:
        """What the xclbin depends on (not M): kernels of equal keys share one xclbin and hardware context."""
        key = ("f32_f32", self.K, self.resident, self.a_depth, self.a_repeat)
        return key if self.b_kind == "packed" else key + (self.b_kind,)

    @property
    def b_elem(self) -> int:
        return 2 if self.b_kind == "packed" else 4

    @property
    def col_blocks(self) -> list[int]:
        return col_block_starts(self.N)

    @property
    def a_len(self) -> int:  # elements of the A buffer the kernel reads: (M - 1) * lda + K
        return (self.M - 1) * (self.lda or self.K) + self.K

    @property
    def b_len(self) -> int:
        return self.K * self.N if self.b_kind == "packed" else (self.N - 1) * (self.ldb or self.K) + self.K

    @property
    def c_len(self) -> int:
        return (self.M - 1) * (self.ldc or self.N) + self.N

    def a_taps(self, start: int, row: int) -> list[Tap]:
        """Shim MM2S of core row `row` in the block starting at `start` (flat fp32 offsets into A)."""
        K, lda = self.K, self.lda or self.K
        first = (start + row * TILE_M) * lda
        if self.resident:  # the 64-row slab, row-major (d0 = 64 elements: a K-wide row exceeds the 10-bit wrap)
            return [Tap(first, (1, TILE_M, K // TILE_K, TILE_K), (0, lda, TILE_K, 1))]
        # 64x32 halves in core order, all of them once per column block (repeat dimension, stride 0)
        return [Tap(first, (len(self.col_blocks), K // TILE_KH, TILE_M, TILE_KH), (0, TILE_KH, lda, 1))]

    def b_taps(self, start: int, col: int) -> list[Tap]:
        if self.b_kind == "packed":
            return [b_tap(BLOCK_M, self.K, self.N, 0, col)]  # the packed tiles of column col: as v1, per block
        # K^T in place: per column block and K-half, 64 key rows of 32 contiguous floats (n-major; the memtile
        # transposes into the 8x4 blocks). Whole blocks through the repeat dimension, the overlapping last one apart.
        K, ldb, full = self.K, self.ldb or self.K, self.N // BLOCK_N
        taps = []
        if full:
            taps.append(Tap(col * TILE_N * ldb, (full, K // TILE_KH, TILE_N, TILE_KH),
                            (BLOCK_N * ldb, TILE_KH, ldb, 1)))
        if self.N % BLOCK_N:
            taps.append(Tap((self.N - BLOCK_N + col * TILE_N) * ldb, (1, K // TILE_KH, TILE_N, TILE_KH),
                            (0, TILE_KH, ldb, 1)))
        return taps

    def c_taps(self, start: int, col: int) -> list[Tap]:
        N, ldc, full = self.N, self.ldc or self.N, self.N // BLOCK_N
        taps = []
        if full:
            taps.append(Tap(start * ldc + col * TILE_N, (1, full, BLOCK_M, TILE_N), (0, COLS * TILE_N, ldc, 1)))
        if N % BLOCK_N:
            taps.append(Tap(start * ldc + N - BLOCK_N + col * TILE_N, (1, 1, BLOCK_M, TILE_N), (0, 0, ldc, 1)))
        return taps

    def l1_bytes(self) -> int:
        return FIFO_DEPTH * (A_HALF * 4 + B_HALF * self.b_elem) + C_L1_DEPTH * TILE_M * TILE_N * 4

    def memtile_bytes(self) -> int:
        return (self.a_depth * self.a_l2_len * 4 + FIFO_DEPTH * B_HALF * self.b_elem +
                FIFO_DEPTH * BLOCK_M * TILE_N * 4)


def plan_f32(M: int, K: int, N: int, stream_a: bool = False, b_kind: str = "packed", lda: int = 0, ldb: int = 0,
             ldc: int = 0) -> F32Plan:
    """The f32_f32 design for height M (>= 256), padded K and N. stream_a forces the streamed-A variant. b_kind
    "kt" (with N >= 256 any width, and the row strides) is the designed run-time-B variant, see F32Plan."""
    if b_kind not in ("packed", "kt"):
        raise ValueError(f"b_kind {b_kind!r}")
    check_shape_f32(M, K, N, b_kind)
    if (lda and lda < K) or (ldb and ldb < K) or (ldc and ldc < N) or (b_kind == "packed" and ldb):
        raise ValueError("row strides must be at least the row length (and packed B has none)")
    resident = a_resident(K) and not stream_a
    m, h, r, s = TILE_M, TILE_KH, MMUL_R, MMUL_S
    if resident:
        # S2MM: the shim's row-major stream (row, half, col) lands half-major: [half][row][col] (64x32 each).
        from_stream = ((m, h), (K // h, m * h), (h, 1))
        # MM2S: halves are contiguous, so (half, row group) merge into one dimension of K/2 steps of 4 rows.
        l1 = ((K // h * (m // r), r * h), (h // s, s), (r, h), (s, 1))
        l2_len, depth, repeat = m * K, a_slab_depth(K, 2 if b_kind == "packed" else 4), len(col_block_starts(N))
    else:
        from_stream = ()
        l1 = ((m // r, r * h), (h // s, s), (r, h), (s, 1))
        l2_len, depth, repeat = A_HALF, FIFO_DEPTH, 1
    kh, n, t = TILE_KH, TILE_N, MMUL_T
    if b_kind == "packed":
        b_l1 = ((kh // s, s * n), (n // t, t), (s, n), (t, 1))  # one 32x64 half, blocked 8x4
    else:  # an n-major 64 x 32 object ([n][k]) into the same 8x4 blocks: a transpose by the memtile's MM2S
        b_l1 = ((kh // s, s), (n // t, t * kh), (s, 1), (t, kh))
    return F32Plan(M, K, N, resident, l2_len, depth, from_stream, l1, repeat, b_l1, tuple(c_l2_dims()),
                   tuple(block_starts(M)), b_kind, lda, ldb, ldc)


def check_shim_tap(tap: Tap, elem_bytes: int, tensor_len: int) -> None:
    """Raises ValueError unless the shim BD can encode the transfer and it stays inside the tensor."""
    d3, d2, d1, d0 = tap.sizes
    s3, s2, s1, s0 = tap.strides
    if min(tap.sizes) < 1:
        raise ValueError(f"{tap}: sizes must be positive")
    if (d0 * elem_bytes) % 4 or d0 * elem_bytes // 4 > SHIM_WRAP or d1 > SHIM_WRAP:
        raise ValueError(f"{tap}: d0 must be whole 4-byte words and d0/d1 at most {SHIM_WRAP} (10-bit wraps)")
    if d3 > MAX_REPEAT:
        raise ValueError(f"{tap}: repeat dimension {d3} > {MAX_REPEAT}")
    for size, stride in ((d2, s2), (d1, s1), (d0, s0)):
        if size > 1 and stride < 1:
            raise ValueError(f"{tap}: only the outermost (repeat) dimension may have stride 0")
    if s3 < 0 or (s0 != 1 and (s0 * elem_bytes) % 4):
        raise ValueError(f"{tap}: bad stride")
    for stride in (s3, s2, s1):
        if (stride * elem_bytes) % 4 or stride * elem_bytes // 4 > SHIM_STEP_WORDS:
            raise ValueError(f"{tap}: stride {stride} not encodable (4-byte multiple, <= 2^20 words)")
    idx = tap_indices(tap)
    if idx.min() < 0 or idx.max() >= tensor_len:
        raise ValueError(f"{tap}: outside the tensor [0, {tensor_len})")


def check_mem_dims(dims, elem_bytes: int, buf_len: int) -> None:
    """Raises ValueError unless a memtile BD can encode these (size, stride) dims inside its buffer."""
    if len(dims) > MEM_DIMS:
        raise ValueError(f"{dims}: more than {MEM_DIMS} dimensions")
    for i, (size, stride) in enumerate(dims):
        words = (size * elem_bytes // 4) if i == len(dims) - 1 else size
        if size < 1 or stride < 1 or words > MEM_WRAP or stride * elem_bytes // 4 > MEM_STEP_WORDS:
            raise ValueError(f"{dims}: dimension {i} not encodable")
    idx = _indices(0, dims)
    if idx.min() < 0 or idx.max() >= buf_len:
        raise ValueError(f"{dims}: outside the {buf_len}-element buffer")


L1_LIMIT = 48 * 1024  # of the 64 KiB data memory: the rest for stack and the kernel's locals


def check_plan_f32(plan: F32Plan) -> None:
    """Raises ValueError unless every shim transfer and memtile re-layout of the plan is encodable and inside its
    tensor or buffer, and the buffers fit L1 and the memtile."""
    for start in plan.blocks:
        for i in range(COLS):
            for tap in plan.a_taps(start, i):
                check_shim_tap(tap, 4, plan.a_len)
            for tap in plan.b_taps(start, i):
                check_shim_tap(tap, plan.b_elem, plan.b_len)
            for tap in plan.c_taps(start, i):
                check_shim_tap(tap, 4, plan.c_len)
    check_mem_dims(plan.a_l1_dims, 4, plan.a_l2_len)
    check_mem_dims(plan.b_l1_dims, plan.b_elem, B_HALF)
    check_mem_dims(plan.c_l2_dims, 4, BLOCK_M * TILE_N)
    if plan.a_l2_from_stream:
        check_mem_dims(plan.a_l2_from_stream, 4, plan.a_l2_len)
    if plan.a_repeat > MAX_REPEAT * 4:  # memtile BD repeat count (8 bits in the task queue)
        raise ValueError(f"A repeat {plan.a_repeat} too large")
    if plan.l1_bytes() > L1_LIMIT or plan.memtile_bytes() > MEMTILE_BYTES:
        raise ValueError(f"buffers do not fit: L1 {plan.l1_bytes()} B, memtile {plan.memtile_bytes()} B")


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


def simulate_f32(a: np.ndarray, b_packed: np.ndarray, M: int, K: int, N: int, stream_a: bool = False,
                 trace: dict | None = None, plan: F32Plan | None = None) -> np.ndarray:
    """Runs plan_f32's data movement on numpy arrays: a = flat fp32 A (plan.a_len), b_packed = flat bf16-valued
    packed B [K*N] (or, for a "kt" plan, the flat fp32 keys, plan.b_len). Every shim transfer is checked with
    check_shim_tap (encodable, inside its tensor), every memtile re-layout with check_mem_dims; a C element written
    twice (overlapped rows or columns) must get the same bits. trace, if given, collects the flat indices of A, B
    and C the shim touched ('a', 'b', 'c'). Returns C [M, N] (gathered from its row stride)."""
    plan = plan or plan_f32(M, K, N, stream_a)
    M, K, N = plan.M, plan.K, plan.N
    assert a.size == plan.a_len and b_packed.size == plan.b_len
    c = np.full(plan.c_len, np.nan)
    written = np.zeros(plan.c_len, bool)
    seen = {"a": [], "b": [], "c": []}
    a_l1, b_l1, c_l2 = (_indices(0, d) for d in (plan.a_l1_dims, plan.b_l1_dims, plan.c_l2_dims))
    check_plan_f32(plan)
    steps = K // TILE_KH
    n_blocks = len(plan.col_blocks)  # core loop trip count per C tile
    for start in plan.blocks:
        a_objs = []
        for row in range(ROWS):
            stream = []
            for tap in plan.a_taps(start, row):
                idx = tap_indices(tap)
                seen["a"].append(idx)
                stream.append(a[idx].astype(np.float32))
            stream = np.concatenate(stream)
            objs = []
            for l2 in stream.reshape(-1, plan.a_l2_len):  # memtile buffers, in order
                if plan.a_l2_from_stream:
                    buf = np.empty(plan.a_l2_len, np.float32)
                    buf[_indices(0, plan.a_l2_from_stream)] = l2  # S2MM re-layout
                else:
                    buf = l2
                for _ in range(plan.a_repeat):  # the memtile BD replays the slab
                    objs.extend(buf[a_l1].reshape(-1, A_HALF))
            assert len(objs) == n_blocks * steps, "A objects per core row and block"
            a_objs.append(objs)
        b_objs = []
        for col in range(COLS):
            stream = []
            for tap in plan.b_taps(start, col):
                idx = tap_indices(tap)
                seen["b"].append(idx)
                stream.append(b_packed[idx])
            halves = [h[b_l1] for h in np.concatenate(stream).reshape(-1, B_HALF)]
            b_objs.append(halves if plan.b_kind == "packed" else [_rne_bf16(h) for h in halves])  # core rounds B
            assert len(b_objs[col]) == n_blocks * steps
        for col in range(COLS):
            out = []
            for nb in range(n_blocks):
                slab = np.zeros(BLOCK_M * TILE_N)
                for row in range(ROWS):  # core (row, col): one C tile per column block
                    acc = slab[row * TILE_M * TILE_N:(row + 1) * TILE_M * TILE_N]
                    for i in range(nb * steps, (nb + 1) * steps):
                        _core_half(a_objs[row][i], b_objs[col][i], acc)
                out.append(slab[c_l2])
            out = np.concatenate(out)
            pos = 0
            for tap in plan.c_taps(start, col):
                idx = tap_indices(tap)
                seen["c"].append(idx)
                vals = out[pos:pos + idx.size]
                pos += idx.size
                again = written[idx]
                assert np.array_equal(c[idx][again], vals[again]), "an overlapped row/column got other bits"
                c[idx] = vals
                written[idx] = True
            assert pos == out.size, "the shim writes exactly what the memtile sends"
    if trace is not None:
        trace.update({k: np.concatenate(v) for k, v in seen.items()})
    ldc = plan.ldc or N
    return c[(np.arange(M)[:, None] * ldc + np.arange(N)[None, :])]


# ---------------------------------------------------------------------------------------------------------------
# The IRON program (needs mlir-aie).

KERNEL_OBJECT = "gemm_bf16.o"  # built from gemm_bf16.cc with Peano by build_kernels.py


def iron_module(M: int, K: int, N: int):
    """Returns the MLIR module of the bf16_f32 design for padded shape M x K x N."""
    check_shape(M, K, N)
    import sys

    import iron_layer

    iron = iron_layer.real()
    bfloat16, TensorAccessPattern, range_ = iron.bfloat16, iron.TensorAccessPattern, iron.range_
    Kernel, ObjectFifo, Program, Runtime, Worker = iron.Kernel, iron.ObjectFifo, iron.Program, iron.Runtime, iron.Worker
    NPU1Col4, Tile, SequentialPlacer = iron.NPU1Col4, iron.Tile, iron.SequentialPlacer

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
    c_shim = [c.cons() for c in c_l2l3]  # one handle each: every cons() call adds a consumer in IRON
    with rt.sequence(a_ty, b_ty, c_ty) as (A, B, C):
        rt.start(*workers)
        for bm in range(M // BLOCK_M):
            tg = rt.task_group()
            for i in range(COLS):
                rt.fill(a_l3l2[i].prod(), A, tap=pattern(M * K, a_tap(M, K, N, bm, i)), task_group=tg,
                        placement=Tile(i, 0))
                rt.fill(b_l3l2[i].prod(), B, tap=pattern(K * N, b_tap(M, K, N, bm, i)), task_group=tg,
                        placement=Tile(i, 0))
                rt.drain(c_shim[i], C, tap=pattern(M * N, c_tap(M, K, N, bm, i)), wait=True, task_group=tg,
                         placement=Tile(i, 0))
            rt.finish_task_group(tg)

    return Program(NPU1Col4(), rt).resolve_program(SequentialPlacer())


def iron_program_f32(plan: F32Plan, iron):
    """The f32_f32 design of `plan` as IRON calls on `iron` (iron_layer.real(): mlir-aie, returns the MLIR module;
    iron_layer.Recorder(): records the program for the host checks). The core program and the fifos depend on
    plan.static_key only; M lives in the runtime sequence (insts.bin)."""
    M, K, N = plan.M, plan.K, plan.N
    f32, ty, Tile = np.float32, iron.tensor_type, iron.Tile
    b_dtype = iron.bfloat16 if plan.b_kind == "packed" else f32
    a_ty, b_ty, c_ty = ty(plan.a_len, f32), ty(plan.b_len, b_dtype), ty(plan.c_len, f32)
    a_l2_ty, a_l1_ty, b_l1_ty = ty(plan.a_l2_len, f32), ty(A_HALF, f32), ty(B_HALF, b_dtype)
    c_l1_ty, c_l2_ty = ty(TILE_M * TILE_N, f32), ty(BLOCK_M * TILE_N, f32)

    zero = iron.Kernel("zero_f32", KERNEL_OBJECT, [c_l1_ty])
    matmul = iron.Kernel("matmul_f32a_bf16_f32" if plan.b_kind == "packed" else "matmul_f32a_f32b_f32",
                         KERNEL_OBJECT, [a_l1_ty, b_l1_ty, c_l1_ty])

    a_l3l2, a_l2l1, b_l3l2, b_l2l1, c_l2l3, c_l1l2 = [], [], [], [], [], []
    for i in range(COLS):  # memtile i: A of core row i, B and C of core column i
        mem = Tile(i, 1)
        a_l3l2.append(iron.ObjectFifo(a_l2_ty, depth=plan.a_depth, name=f"A_L3L2_{i}"))
        a_mem = a_l3l2[i].cons(dims_from_stream=[list(d) for d in plan.a_l2_from_stream]) \
            if plan.a_l2_from_stream else a_l3l2[i].cons()
        a_l2l1.append(a_mem.forward(placement=mem, obj_type=a_l1_ty, depth=FIFO_DEPTH, name=f"A_L2L1_{i}",
                                    dims_to_stream=[list(d) for d in plan.a_l1_dims]))
        if plan.a_repeat > 1:  # the resident slab is sent once per column block without re-reading DDR
            a_l2l1[i].set_repeat_count(plan.a_repeat)
        b_l3l2.append(iron.ObjectFifo(b_l1_ty, depth=FIFO_DEPTH, name=f"B_L3L2_{i}"))
        b_l2l1.append(b_l3l2[i].cons().forward(placement=mem, obj_type=b_l1_ty, depth=FIFO_DEPTH, name=f"B_L2L1_{i}",
                                               dims_to_stream=[list(d) for d in plan.b_l1_dims]))
        c_l2l3.append(iron.ObjectFifo(c_l2_ty, depth=FIFO_DEPTH, name=f"C_L2L3_{i}",
                                      dims_to_stream=[list(d) for d in plan.c_l2_dims]))
        c_l1l2.append(c_l2l3[i].prod().join([TILE_M * TILE_N * r for r in range(ROWS)], placement=mem,
                                            obj_types=[c_l1_ty] * ROWS, names=[f"C_L1L2_{i}_{r}" for r in range(ROWS)],
                                            depths=[C_L1_DEPTH] * ROWS))

    steps = K // TILE_KH

    def core_fn(in_a, in_b, out_c, zero_fn, matmul_fn):  # one C tile; the Worker repeats it forever
        c = out_c.acquire(1)
        zero_fn(c)
        for _ in iron.range_(steps):
            a = in_a.acquire(1)
            b = in_b.acquire(1)
            matmul_fn(a, b, c)
            in_a.release(1)
            in_b.release(1)
        out_c.release(1)

    workers = [iron.Worker(core_fn, [a_l2l1[row].cons(), b_l2l1[col].cons(), c_l1l2[col][row].prod(), zero, matmul],
                           placement=Tile(col, 2 + row), while_true=True)
               for row in range(ROWS) for col in range(COLS)]

    def pattern(tensor_len: int, tap: Tap):
        return iron.TensorAccessPattern((1, tensor_len), tap.offset, list(tap.sizes), list(tap.strides))

    rt = iron.Runtime()
    c_shim = [c.cons() for c in c_l2l3]
    with rt.sequence(a_ty, b_ty, c_ty) as (A, B, C):
        rt.start(*workers)
        # Two blocks per task group: at most 2 x 3 BDs per shim in flight (16 available), and the next block's
        # fills are queued while the previous block's C drains.
        tg = rt.task_group()
        for j, start in enumerate(plan.blocks):
            for i in range(COLS):
                shim = Tile(i, 0)
                for tap in plan.a_taps(start, i):
                    rt.fill(a_l3l2[i].prod(), A, tap=pattern(plan.a_len, tap), task_group=tg, placement=shim)
                for tap in plan.b_taps(start, i):
                    rt.fill(b_l3l2[i].prod(), B, tap=pattern(plan.b_len, tap), task_group=tg, placement=shim)
                for tap in plan.c_taps(start, i):
                    rt.drain(c_shim[i], C, tap=pattern(plan.c_len, tap), wait=True, task_group=tg, placement=shim)
            if j % 2 == 1 or j == len(plan.blocks) - 1:
                rt.finish_task_group(tg)
                if j != len(plan.blocks) - 1:
                    tg = rt.task_group()

    return iron.Program(iron.NPU1Col4(), rt).resolve_program(iron.SequentialPlacer())


def iron_module_f32(M: int, K: int, N: int, stream_a: bool = False):
    """Returns the MLIR module of the f32_f32 design (needs mlir-aie)."""
    import iron_layer

    return iron_program_f32(plan_f32(M, K, N, stream_a), iron_layer.real())


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Print the MLIR of a GEMM design for padded K x N and height M")
    p.add_argument("-M", type=int, required=True)
    p.add_argument("-K", type=int, required=True)
    p.add_argument("-N", type=int, required=True)
    p.add_argument("--dtype", choices=["f32_f32", "bf16_f32"], default="f32_f32")
    args = p.parse_args()
    print(iron_module_f32(args.M, args.K, args.N) if args.dtype == "f32_f32" else iron_module(args.M, args.K, args.N))
