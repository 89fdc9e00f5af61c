// The int8 FFN chain (issue 13): inside one fused node, a MatMul whose only reader is the next node, itself a MatMul
// reading it as A, both int8 with a constant 2-D weight (an encoder layer's fc1 + bias + GELU, then fc2 + bias +
// residual), run together in row panels (kernels::Backend::gemm_int8_chain), so that fc1's output never goes to
// memory. The same bits as running the two nodes one after the other, which is what happens whenever the chain is
// not taken (another precision, a backend without it, few rows, shapes known only at run time that do not chain).
#pragma once

#include <string>

#include "ops/op.h"

namespace xdna::ops {

// Whether the chain is enabled for sessions created now: XDNA_INT8_CHAIN=off turns it off (A/B measurements, tests).
bool int8_chain_enabled();

// Why `second` cannot take `first`'s output through the chain, from their plans alone ("" when it can). The caller
// checks that nothing else reads first.output and that it is not an output of the fused node.
std::string int8_chain_miss(const OpPlan& first, const OpPlan& second);

// Runs both nodes as one chain: false when the run-time shapes or the backend decline (nothing written but, where
// `first` has one, its A prologue's output, which its own run then reuses); the caller then runs them in turn.
bool run_int8_chain(const OpPlan& first, ep::Dispatcher& first_dispatch, const OpPlan& second,
                    ep::Dispatcher& second_dispatch, TensorIo& io);

}  // namespace xdna::ops
