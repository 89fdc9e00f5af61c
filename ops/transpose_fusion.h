// The Transpose fused into a MatMul (attention's head split and K^T): claimed with the MatMul when the MatMul is
// its only user, and never materialised: the MatMul reads the Transpose's input through permuted strides.
#pragma once

#include <vector>

#include "ops/op.h"

namespace xdna::ops {

// Claim rule: if operand `op` (of rank >= 2, computed at run time) is the output of a float Transpose whose only
// use is this MatMul, redirect it to the Transpose's input, record the permutation and add the Transpose to
// `claim->fused_producers`. Otherwise leaves both untouched (the Transpose stays where it is).
void read_through_transpose(const OrtApi& api, const GraphIndex& index, Operand* op, Claim* claim);

// Claim rule: if operand `op` (run-time) is made by a Cast to float of a run-time bfloat16 tensor of the same rank
// that nothing else reads, redirect it to that tensor (a perm read before stays: a Cast keeps the shape) and add
// the Cast to `claim->fused_producers`. The contract rounds a run-time B (and attention's K and V) to bf16 as it
// reads it, exactly as ORT's Cast to bfloat16 does (round to nearest even), so a tensor kept in bf16 (the decoder's
// K/V caches, issue 7) is read as it lies, at half the bytes, with the same results. Callers then get
// Tensor::bf16 for it at run time.
void read_through_bf16_cast(const OrtApi& api, const GraphIndex& index, Operand* op, Claim* claim);

// Claim rule: if operand `op` (run-time) is made by a Reshape that only splits the last dim of a run-time float
// tensor x (the head split [.., H*D] -> [.., H, D] before a Transpose of attention) and nothing else reads the
// Reshape's output: redirect it to x, record the split in `op->split` and add the Reshape to `claim->fused_producers`.
// The Reshape's shape must be a constant of rank(x) + 1 entries whose last two are positive (H, D) and whose others
// keep x's dims: 0 (copy, allowzero unset), the dim itself where x's shape gives it, or one -1 (then x's leading dims
// are kept exactly when its last dim is H*D). x's last dim, when symbolic, is checked at run time (view_of). A
// contiguous x split this way is a view: no copy is made. Returns whether it read through.
bool read_through_head_split(const OrtApi& api, const GraphIndex& index, Operand* op, Claim* claim);

// Whether `reshape` is such a head split of x (the rule above, on its shape and attribute alone): its H and D.
bool head_split_of(const OrtApi& api, const OrtNode* reshape, const Operand& x, int64_t* heads, int64_t* depth);

// Run step: an operand as the MatMul sees it, its dims and element strides into `data` (operand dim d = tensor
// dim perm[d]; empty perm: the tensor as it is).
struct View {
  const float* data = nullptr;
  std::vector<int64_t> dims, strides;
  const uint16_t* bf16 = nullptr;  // the tensor's bf16 data instead (Tensor::bf16)
};
View view_of(const Tensor& t, const std::vector<int64_t>& perm);
// The same for an operand read through a head split (Operand::split, else as above): x's last dim split, then perm.
View view_of(const Tensor& t, const Operand& op);
std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& dims);

// numpy-style broadcast of two batch shapes (throws ORT_INVALID_ARGUMENT when they do not broadcast).
std::vector<int64_t> broadcast_batch(const std::vector<int64_t>& a, const std::vector<int64_t>& b);
// Flat index into `dims` (right-aligned against `out`) for the multi-index of flat output position `pos`.
int64_t broadcast_index(const std::vector<int64_t>& out, const std::vector<int64_t>& dims, int64_t pos);
// Element offset of the matrix at flat output batch position `pos`, for batch dims right-aligned against `out`
// (broadcast dims of size 1 stay at index 0).
int64_t batch_offset(const std::vector<int64_t>& out, const std::vector<int64_t>& dims,
                     const std::vector<int64_t>& strides, int64_t pos);

}  // namespace xdna::ops
