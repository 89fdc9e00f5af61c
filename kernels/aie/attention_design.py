"""Fused attention for the Phoenix (npu1) 4x4 AIE-ML array: O = softmax(scale * Q K^T) V for all heads of a layer in
one command, the scores never leaving a core's L1 (issue 15). A DESIGN with a host check: this file plans the
data movement and states the numerics; `simulate` runs them on numpy arrays. No IRON program yet, no kernel built,
and the EP does not use it: it needs the EP to claim MatMul -> [Mul/Div] -> Softmax -> MatMul as one node.

Operands (ORT's fp32 tensors, read in place through the shim DMA's strides, so no head split/Transpose copies):
  Q, K, V: [T, H * D] row-major (the q/k/v projections' outputs); head h is columns h*D .. h*D + D - 1.
  O:       [T, H * D] row-major, head h written into its columns (the layout out_proj reads).
  D = 64 (one K-tile of the GEMM design); T any length (Whisper: 1500).

Array mapping and L1 (64 KiB per core):
  * A work item is (head h, a tile of QROWS query rows). Items are dealt round-robin to the 16 cores; each core
    keeps its query tile as bf16 (converted in the core, round-to-nearest-even) and its fp32 output accumulator.
  * K and V of head h stream from DDR once per pass of the 16 cores, KEYS rows at a time, as fp32 (the cores round
    them), broadcast by one shim through the memtiles to every core working on h.
  * Per key tile (flash-attention's online softmax, all in fp32 except where noted):
        S = scale * Q K_j^T                  (bf16 x bf16 products, fp32 sums: aie::mmul<4,8,4>)
        m' = max(m, rowmax S);  c = exp(m - m')
        P = bf16(exp(S - m'))                (exp on the vector unit, rounded to bf16 for the next mmul)
        l = c * l + rowsum(P);  O = c * O + P V_j;  m = m'
    and O / l written out. S and P live only in L1.
"""

from __future__ import annotations

import numpy as np

D = 64  # head dim: one 64-deep K step of gemm_design.py
QROWS = 32  # query rows per work item
KEYS = 32  # keys per streamed K/V tile
CORES = 16
L1_LIMIT = 56 * 1024  # of 64 KiB: the rest for stack and the program's locals


def l1_bytes() -> dict[str, int]:
    """L1 use of one core (double-buffered K/V tiles)."""
    return {
        "Q tile (bf16)": QROWS * D * 2,
        "K tiles (fp32, x2)": 2 * KEYS * D * 4,
        "V tiles (fp32, x2)": 2 * KEYS * D * 4,
        "S (fp32)": QROWS * KEYS * 4,
        "P (bf16)": QROWS * KEYS * 2,
        "O accumulator (fp32)": QROWS * D * 4,
        "m, l (fp32)": 2 * QROWS * 4,
    }


def work_items(H: int, T: int) -> list[list[tuple[int, int]]]:
    """(head, first query row) per core, in processing order."""
    items = [(h, r) for h in range(H) for r in range(0, T, QROWS)]
    return [items[c::CORES] for c in range(CORES)]


def head_rows(flat: np.ndarray, T: int, H: int, h: int, rows: range) -> np.ndarray:
    """The shim DMA's strided read of head h, rows `rows`, from a [T, H*D] tensor: offset r*H*D + h*D, D
    contiguous values per row. Rows past T are not read (the tile's tail is masked instead)."""
    idx = (np.array([r for r in rows if r < T])[:, None] * (H * D) + h * D + np.arange(D)[None, :])
    return flat[idx]


def _rne_bf16(x: np.ndarray) -> np.ndarray:
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32)).view(np.float32).astype(np.float64)


def simulate(q: np.ndarray, k: np.ndarray, v: np.ndarray, T: int, H: int, scale: float) -> np.ndarray:
    """The design's data movement and numerics on flat [T*H*D] fp32 arrays; returns O [T, H*D] (float64 sums
    stand in for the fp32 accumulators, exp is exact here: the bound in the tests covers both)."""
    out = np.full(T * H * D, np.nan)
    for core_items in work_items(H, T):
        for h, r0 in core_items:
            qt = _rne_bf16(head_rows(q, T, H, h, range(r0, r0 + QROWS)))  # valid rows only
            n = qt.shape[0]
            m = np.full(n, -np.inf)
            l = np.zeros(n)
            o = np.zeros((n, D))
            for j0 in range(0, T, KEYS):
                kt = _rne_bf16(head_rows(k, T, H, h, range(j0, j0 + KEYS)))
                vt = _rne_bf16(head_rows(v, T, H, h, range(j0, j0 + KEYS)))
                s = scale * (qt @ kt.T)
                m_new = np.maximum(m, s.max(axis=1))
                c = np.exp(m - m_new)
                p = _rne_bf16(np.exp(s - m_new[:, None]))
                l = c * l + p.sum(axis=1)
                o = c[:, None] * o + p @ vt
                m = m_new
            idx = np.arange(r0, r0 + n)[:, None] * (H * D) + h * D + np.arange(D)[None, :]
            out[idx] = o / l[:, None]
    return out.reshape(T, H * D)
