// The GEMM contract's A prologue (kernels/gemm_contract.h, "A prologue"): LayerNormalization over the last axis,
// computed on the host as ORT's CPU LayerNormalization computes it, bit for bit.
#pragma once

#include <cstdint>

namespace xdna::kernels {

// y[m][k] = LN(x[m])[k] for `rows` rows of K floats (row stride K); beta may be null. x and y must not overlap.
void layernorm_rows(const float* x, float* y, int64_t rows, int64_t K, const float* gamma, const float* beta,
                    float epsilon);

}  // namespace xdna::kernels
