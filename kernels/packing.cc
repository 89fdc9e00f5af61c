#include "packing.h"

#include <cstdio>

#include "emulator/emulator.h"

namespace xdna::kernels {

PackedB pack_b(const float* src, int64_t K, int64_t N, int64_t stride_k, int64_t stride_n) {
  PackedB out;
  out.shape = padded_shape(0, K, N);
  out.data.assign(static_cast<size_t>(out.shape.Kpad * out.shape.Npad), 0);  // pads are exact zeros
  const int64_t Kpad = out.shape.Kpad;
  // Walk the source in its own memory order (a transposed B, stride_k == 1, is read column by column).
  if (stride_k < stride_n) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k)
        out.data[packed_b_offset(Kpad, k, n)] = f32_to_bf16(src[k * stride_k + n * stride_n]);
  } else {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n)
        out.data[packed_b_offset(Kpad, k, n)] = f32_to_bf16(src[k * stride_k + n * stride_n]);
  }
  return out;
}

PackedB pack_b_in(Precision precision, const float* src, int64_t K, int64_t N, int64_t stride_k, int64_t stride_n) {
  if (precision == Precision::kBf16) return pack_b(src, K, N, stride_k, stride_n);
  PackedB out;
  out.shape = padded_shape(0, K, N);
  out.precision = precision;
  if (precision == Precision::kInt8)
    out.int8 = std::make_shared<const QuantizedB>(quantize_b_int8(src, K, N, stride_k, stride_n));
  else
    out.bf16x3 = std::make_shared<const SplitB>(pack_b_bf16x3(src, K, N, stride_k, stride_n));
  return out;
}

std::string precision_problem(Precision precision, int64_t K) {
  if (precision == Precision::kInt8 && K > kInt8MaxK)
    return "K=" + std::to_string(K) + " is past int8's exact int32 sum limit (" + std::to_string(kInt8MaxK) + ")";
  return "";
}

PackedWeights pack_weights(const float* data, std::vector<int64_t> shape, bool trans_b, Precision precision) {
  if (shape.size() == 1) shape = {shape[0], 1};
  const int64_t rows = shape[shape.size() - 2], cols = shape[shape.size() - 1];
  const int64_t K = trans_b ? cols : rows, N = trans_b ? rows : cols;
  PackedWeights w;
  w.batch_shape.assign(shape.begin(), shape.end() - 2);
  int64_t batches = 1;
  for (int64_t d : w.batch_shape) batches *= d;
  for (int64_t i = 0; i < batches; ++i) {
    const float* m = data + i * rows * cols;
    w.mats.push_back(std::make_shared<const PackedB>(trans_b ? pack_b_in(precision, m, K, N, 1, K)
                                                             : pack_b_in(precision, m, K, N, N, 1)));
  }
  return w;
}

std::string packing_size_problem(std::vector<int64_t> shape, bool trans_b) {
  if (shape.size() == 1) shape = {shape[0], 1};
  if (shape.size() < 2) return "constant B of rank 0";
  double batches = 1;
  for (size_t i = 0; i + 2 < shape.size(); ++i) batches *= static_cast<double>(shape[i]);
  const int64_t rows = shape[shape.size() - 2], cols = shape[shape.size() - 1];
  const int64_t K = trans_b ? cols : rows, N = trans_b ? rows : cols;
  if (K < 0 || N < 0 || batches < 0) return "constant B of unknown shape";
  const PaddedShape p = padded_shape(0, K, N);
  const double one_matrix = static_cast<double>(p.Kpad) * static_cast<double>(p.Npad) * 2;
  const double packed = batches * one_matrix;
  const double weight = batches * static_cast<double>(K) * static_cast<double>(N) * 4;
  // At most 4x the fp32 weight, plus the padding of one matrix: a 2-D weight always packs (its padding is at most
  // one 64 x 256 block beyond its own size), while each matrix of a batch must pack within ~4x its own size.
  if (packed > 4 * weight + one_matrix) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "packing pads its %.0f matrices to %.3g MB, %.0fx the weight's %.3g MB", batches,
                  packed / 1e6, weight > 0 ? packed / weight : 0.0, weight / 1e6);
    return buf;
  }
  return "";
}

}  // namespace xdna::kernels
