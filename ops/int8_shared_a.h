// Sibling int8 products of one A (issue 13): inside one fused node, consecutive MatMuls that read the same A (the
// same tensor, or the same LayerNormalization prologue of it), each int8 with a constant 2-D weight of the same K,
// run together through kernels::Backend::gemm_int8_shared_a: A quantised once instead of once per product, and
// their blocks one job. Whisper's prompt run ("start") has twelve of them: the six decoder layers' cross-attention
// K and V projections of the encoder output (1500 x 512 each, bf16 outputs split into heads, OpPlan::head_split_*),
// written by the backend straight from each block into their bf16 layouts. The same bits as running the nodes one
// after the other, which is what happens whenever the set is not taken (another precision, a backend without it,
// few rows, shapes known only at run time that do not match).
#pragma once

#include <string>
#include <vector>

#include "ops/op.h"

namespace xdna::ops {

// Whether sets are taken for sessions created now: XDNA_INT8_SHARED_A=off turns it off (A/B measurements, tests).
bool int8_shared_a_enabled();

// Why `plan` cannot be one of a set ("" when it can): int8, a constant 2-D weight, A read as it lies, its output
// fp32, bf16 or bf16 split into heads (no cache append, no residual).
std::string int8_shared_a_miss(const OpPlan& plan);

// Whether two plans that can be in a set read the same A (the same value through the same prologue, if any).
bool same_shared_a(const OpPlan& first, const OpPlan& second);

// Runs the set (plans[i] with dispatchers[i]): false when the run-time shapes or the backend decline (nothing written
// but, where the plans have one, their A prologue's output, which their own runs then reuse; `why` says why); the
// caller then runs them in turn.
bool run_int8_shared_a(const std::vector<const OpPlan*>& plans, const std::vector<ep::Dispatcher*>& dispatchers,
                       TensorIo& io, std::string* why);

}  // namespace xdna::ops
