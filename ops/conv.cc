// Conv over one spatial dimension (Whisper's encoder front end), group 1, constant weights: im2col rows times the
// packed weights (ops/op.h ConvParams), the bias and a GELU after it as the GEMM's epilogue; a Transpose(0, 2, 1)
// after that (the encoder's [N, T, C] layout: the GEMM's own) and a constant added to it (the positional
// embedding, as the epilogue's residual) taken too. Anything else stays on the CPU EP.
#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

#include "ep_plugin/dispatch.h"
#include "kernels/emulator/emulator.h"
#include "kernels/packing.h"
#include "ops/op.h"

namespace xdna::ops {

std::vector<float> conv_weight_tap_major(const std::vector<float>& w, const ConvParams& conv) {
  const int64_t cout = conv.out_channels, cin = conv.in_channels, k = conv.kernel;
  std::vector<float> b(w.size());
  for (int64_t co = 0; co < cout; ++co)
    for (int64_t ci = 0; ci < cin; ++ci)
      for (int64_t kk = 0; kk < k; ++kk) b[(co * k + kk) * cin + ci] = w[(co * cin + ci) * k + kk];
  return b;
}

namespace {

// dst[c][r] = src[r][c] for a row-major src [rows, cols], in 16 x 16 blocks of 4 x 4 register transposes: the
// scalar loop was most of a conv's time, its column reads at a power-of-two stride (Cout = 512) thrashing L1 sets.
void transpose_rows(const float* src, int64_t rows, int64_t cols, int64_t ld_src, float* dst, int64_t ld_dst) {
  constexpr int64_t kBlock = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock)
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      const int64_t r1 = std::min(rows, r0 + kBlock), c1 = std::min(cols, c0 + kBlock);
#if defined(__SSE2__)
      if (r1 - r0 == kBlock && c1 - c0 == kBlock) {
        for (int64_t r = r0; r < r1; r += 4)
          for (int64_t c = c0; c < c1; c += 4) {
            const float* s = src + r * ld_src + c;
            __m128 v0 = _mm_loadu_ps(s), v1 = _mm_loadu_ps(s + ld_src), v2 = _mm_loadu_ps(s + 2 * ld_src),
                   v3 = _mm_loadu_ps(s + 3 * ld_src);
            _MM_TRANSPOSE4_PS(v0, v1, v2, v3);
            float* d = dst + c * ld_dst + r;
            _mm_storeu_ps(d, v0);
            _mm_storeu_ps(d + ld_dst, v1);
            _mm_storeu_ps(d + 2 * ld_dst, v2);
            _mm_storeu_ps(d + 3 * ld_dst, v3);
          }
        continue;
      }
#endif
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ld_dst + r] = src[r * ld_src + c];
    }
}

// dst[c][r] = src[r][c] for a row-major src [rows, cols]: bands of rows on the emulator's threads (a pass over
// memory that one core does not saturate).
void transpose(const float* src, int64_t rows, int64_t cols, float* dst) {
  constexpr int64_t kBand = 256;
  const int64_t bands = (rows + kBand - 1) / kBand;
  kernels::emulator_parallel_for(rows * cols >= (int64_t{1} << 16) ? 0 : 1, bands, [&](int64_t b) {
    const int64_t r0 = b * kBand;
    transpose_rows(src + r0 * cols, std::min(kBand, rows - r0), cols, cols, dst + r0, rows);
  });
}

// Extends a Conv claim whose (GELU'd) output is `value` [N, Cout, T_out] over the Transpose(0, 2, 1) that alone
// reads it (OpPlan::conv_time_major: the GEMM's rows are that layout already) and then over an Add of a float32
// constant [T_out, Cout] or [1, T_out, Cout] that alone reads the Transpose's output (Whisper's positional
// embedding), added by the epilogue after the GELU as a residual. Returns the reason's part ("" when not taken).
std::string claim_time_major_output(const OrtApi& api, const GraphIndex& index, const std::string& value, Claim* r) {
  OpPlan& p = r->plan;
  const OrtNode* transpose = only_reader(index, value);
  std::vector<int64_t> perm;
  if (!transpose || !is_op(api, transpose, "", "Transpose") || !ints_attr(api, transpose, "perm", &perm) ||
      perm != std::vector<int64_t>{0, 2, 1})
    return "";
  const NodeIo tio = node_io(api, transpose);
  if (tio.inputs.size() != 1 || tio.outputs.size() != 1 || !tio.outputs[0]) return "";
  r->fused_consumers.push_back(transpose);
  p.conv_time_major = true;
  p.output = value_name(api, tio.outputs[0]);
  std::string why = ", output time-major (its Transpose(0, 2, 1))";
  const OrtNode* add = only_reader(index, p.output);
  if (!add || !is_op(api, add, "", "Add")) return why;
  const NodeIo aio = node_io(api, add);
  if (aio.inputs.size() != 2 || !aio.inputs[0] || !aio.inputs[1] || aio.outputs.size() != 1 || !aio.outputs[0])
    return why;
  const bool first = value_name(api, aio.inputs[0]) == p.output;
  if (first == (value_name(api, aio.inputs[1]) == p.output)) return why;
  const OrtValueInfo* other = aio.inputs[first ? 1 : 0];
  ONNXTensorElementDataType t;
  const Operand res = describe(api, other, &t);
  const int64_t T = res.rank >= 2 ? res.dims[res.rank - 2] : -1;
  // T_out when the input length is known (else checked at run time: a constant made for one length)
  const ConvParams& c = p.conv;
  const int64_t t_out = p.a.dims[2] < 0 ? -1
                                        : (p.a.dims[2] + c.pad_begin + c.pad_end - c.dilation * (c.kernel - 1) - 1) /
                                                  c.stride + 1;
  if (t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || !res.constant || (res.rank != 2 && res.rank != 3) ||
      (res.rank == 3 && res.dims[0] != 1) || res.dims.back() != c.out_channels || T <= 0 || (t_out >= 0 && t_out != T))
    return why + "; the Add after it stays on the CPU EP (not a float32 constant [T_out, " +
           std::to_string(c.out_channels) + "])";
  r->fused_consumers.push_back(add);
  r->residual_input = other;
  p.residual = res;
  p.residual.present = true;
  p.output = value_name(api, aio.outputs[0]);
  return why + ", + a constant [" + std::to_string(T) + ", " + std::to_string(p.conv.out_channels) + "]";
}

Claim claim_conv(const OrtApi& api, const OrtNode* node, const GraphIndex& index) {
  Claim r;
  OpPlan& p = r.plan;
  p.op = OpPlan::Op::kConv;
  NodeIo io = node_io(api, node);
  if (io.inputs.size() < 2 || !io.inputs[0] || !io.inputs[1]) return reject("Conv without X and W");
  if (auto why = read_float_operands(api, io, &p); !why.empty()) return reject(why);
  if (p.a.rank != 3 || p.b.rank != 3) return reject("not a 1-D convolution (X and W of rank 3)");
  if (!p.b.constant) return reject("weights computed at run time");
  std::string auto_pad = "NOTSET";
  if (!string_attr(api, node, "auto_pad", &auto_pad)) return reject("unreadable auto_pad");
  if (auto_pad != "NOTSET" && auto_pad != "VALID") return reject("auto_pad " + auto_pad);
  int64_t group = 1;
  std::vector<int64_t> strides{1}, dilations{1}, pads{0, 0}, kernel_shape;
  if (!int_attr(api, node, "group", &group)) return reject("unreadable group");
  if (group != 1) return reject("grouped convolution (group " + std::to_string(group) + ")");
  // What ORT's CPU EP refuses (at session creation or run time) is left to it, so the user gets its error.
  if (auto_pad != "NOTSET" && has_attr(api, node, "pads"))
    return reject("auto_pad " + auto_pad + " together with pads (the CPU EP refuses this)");
  if (!ints_attr(api, node, "strides", &strides) || !ints_attr(api, node, "dilations", &dilations) ||
      !ints_attr(api, node, "pads", &pads) || !ints_attr(api, node, "kernel_shape", &kernel_shape))
    return reject("unreadable attributes");
  if (strides.size() != 1 || dilations.size() != 1 || pads.size() != 2 || kernel_shape.size() > 1)
    return reject("attributes do not describe a 1-D convolution");
  const auto& w = p.b.dims;  // [Cout, Cin, k]
  if (w[0] <= 0 || w[1] <= 0 || w[2] <= 0) return reject("weight shape unknown");
  if (!kernel_shape.empty() && kernel_shape[0] != w[2])
    return reject("kernel_shape differs from W's (the CPU EP refuses this)");
  if (p.a.dims[1] >= 0 && p.a.dims[1] != w[1]) return reject("X channels differ from W");
  constexpr int64_t kMaxAttr = int64_t{1} << 31;
  if (strides[0] < 1 || dilations[0] < 1 || pads[0] < 0 || pads[1] < 0 || strides[0] > kMaxAttr ||
      dilations[0] > kMaxAttr || pads[0] > kMaxAttr || pads[1] > kMaxAttr)
    return reject("bad strides/dilations/pads");
  int64_t span = 0;  // dilation * (k - 1) + 1
  if (__builtin_mul_overflow(dilations[0], w[2] - 1, &span) || span > (int64_t{1} << 62))
    return reject("dilated kernel too long");
  ++span;
  if (p.a.dims[2] >= 0 && p.a.dims[2] + pads[0] + pads[1] < span)
    return reject("output length below 1 (the CPU EP refuses this input)");
  // W [Cout, Cin, k] is the transposed B of the GEMM: B[ci*k + kk][co] = W[co][ci][kk].
  p.weight_shape = {w[0], w[1] * w[2]};
  p.weight_transposed = true;
  if (auto why = kernels::packing_size_problem(p.weight_shape, true); !why.empty()) return reject(why);
  ConvParams& c = p.conv;
  c.out_channels = w[0];
  c.in_channels = w[1];
  c.kernel = w[2];
  c.stride = strides[0];
  c.dilation = dilations[0];
  c.pad_begin = pads[0];
  c.pad_end = pads[1];
  if (io.inputs.size() >= 3 && io.inputs[2]) {
    ONNXTensorElementDataType tc;
    p.c = describe(api, io.inputs[2], &tc);
    if (tc != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || !p.c.constant) return reject("bias is not a float constant");
    if (p.c.rank != 1 || p.c.dims[0] != c.out_channels)
      return reject("bias length differs from the output channels (" + std::to_string(c.out_channels) + ")");
  }
  bool sym = false;
  const double t_in = product_lower_bound(p.a.dims, 2, 3, &sym);
  const double t_out = std::max(1.0, std::floor((t_in + c.pad_begin + c.pad_end - c.dilation * (c.kernel - 1) - 1) /
                                                c.stride) + 1);
  const double batch = product_lower_bound(p.a.dims, 0, 1, &sym);
  p.mflop = 2.0 * batch * t_out * static_cast<double>(c.in_channels * c.kernel * c.out_channels) / 1e6;
  p.mflop_lower_bound = sym;
  r.ok = true;
  r.reason = "1-D convolution as a GEMM (constant weight)";
  // The GELU after it (Whisper's encoder) as the GEMM epilogue, as MatMul takes it: elementwise, so applying it to
  // the [T_out, Cout] product before the transpose gives Conv + Gelu's values.
  if (io.outputs.size() == 1 && io.outputs[0]) {
    ONNXTensorElementDataType t;
    const Operand out = describe(api, io.outputs[0], &t);
    p.output = out.name;
    if (const auto gelu = match_gelu(api, index, out.name, out.dims); !gelu.empty()) {
      p.epilogue_gelu = true;
      r.fused_consumers = gelu;
      p.output = value_name(api, node_io(api, gelu.back()).outputs[0]);
      r.reason += ", epilogue: gelu";
    }
    r.reason += claim_time_major_output(api, index, p.output, &r);
  }
  return r;
}

void run_conv(const OpPlan& plan, TensorIo& io, ep::Dispatcher& dispatch) {
  const ConvParams& c = plan.conv;
  const Tensor x = io.input(plan.a.name);
  if (x.dims.size() != 3 || x.dims[1] != c.in_channels)
    throw ep::OrtError(ORT_INVALID_ARGUMENT, "node '" + plan.node_name + "': Conv input is not [N, " +
                                                 std::to_string(c.in_channels) + ", T]");
  const int64_t batches = x.dims[0], t_in = x.dims[2];
  const int64_t span = c.dilation * (c.kernel - 1) + 1;  // no overflow: bounded when claimed
  // As ORT's Conv: an input shorter than the dilated kernel (after padding) is an error, not an empty output.
  const int64_t room = t_in + c.pad_begin + c.pad_end - span;
  if (room < 0)
    throw ep::OrtError(ORT_INVALID_ARGUMENT, "node '" + plan.node_name + "': Conv input length " +
                                                 std::to_string(t_in) + " is shorter than its dilated kernel (" +
                                                 std::to_string(span) + ") after padding");
  const int64_t t_out = room / c.stride + 1;
  const int64_t K = c.in_channels * c.kernel, N = c.out_channels;
  int64_t cols_size = 0, yt_size = 0;
  if (__builtin_mul_overflow(t_out, K, &cols_size) || __builtin_mul_overflow(t_out, N, &yt_size))
    throw ep::OrtError(ORT_INVALID_ARGUMENT, "node '" + plan.node_name + "': Conv output too large");
  const bool time_major = plan.conv_time_major;
  const bool residual = !plan.residual_value.empty();
  if (residual && plan.residual.dims[plan.residual.dims.size() - 2] != t_out)
    throw ep::OrtError(ORT_INVALID_ARGUMENT, "node '" + plan.node_name + "': Conv output length " +
                                                 std::to_string(t_out) + " differs from the " +
                                                 std::to_string(plan.residual.dims[plan.residual.dims.size() - 2]) +
                                                 " rows of the constant added to it");
  float* y = io.output(plan.output, time_major ? std::vector<int64_t>{batches, t_out, c.out_channels}
                                               : std::vector<int64_t>{batches, c.out_channels, t_out});
  if (batches == 0 || c.out_channels == 0) return;
  dispatch.note_work(batches, t_out, K, N, false, false, true);
  const int64_t cin = c.in_channels;
  // X[n] transposed to [rows, Cin] with pad_begin / pad_end zero rows: the window of output t is rows
  // t * stride + kk * dilation, so with dilation 1 its k rows lie back to back and are its im2col row in the
  // tap-major order the weight was packed in (conv_weight_tap_major): the GEMM reads them where they lie. Windows
  // that overlap or touch (stride <= k) keep that buffer within the im2col rows' size; others gather im2col rows.
  const bool in_place = c.dilation == 1 && c.stride <= c.kernel;
  const int64_t rows = in_place ? t_in + c.pad_begin + c.pad_end : 0;  // <= (t_out + 1) * k: no overflow
  std::unique_ptr<float[]> a(new float[static_cast<size_t>(in_place ? rows * cin : cols_size)]);
  // Time-major: the GEMM writes each batch's [t_out, Cout] rows into the output itself.
  std::unique_ptr<float[]> yt(time_major ? nullptr : new float[static_cast<size_t>(yt_size)]);
  if (in_place) {
    std::fill(a.get(), a.get() + c.pad_begin * cin, 0.f);
    std::fill(a.get() + (c.pad_begin + t_in) * cin, a.get() + rows * cin, 0.f);
  }
  kernels::GemmArgs args{a.get(), t_out, in_place ? c.stride * cin : K, yt.get(), N};
  if (!plan.c_value.empty()) args.epilogue.bias = plan.c_value.data();  // the same fp32 add as after the product
  args.epilogue.gelu = plan.epilogue_gelu;
  if (residual) {  // added after the GELU, as the Add after the Transpose adds it
    args.epilogue.residual = plan.residual_value.data();
    args.epilogue.ldr = N;
  }
  for (int64_t n = 0; n < batches; ++n) {
    const float* xn = x.data + n * cin * t_in;
    if (in_place) {
      transpose(xn, cin, t_in, a.get() + c.pad_begin * cin);
    } else {
      for (int64_t t = 0; t < t_out; ++t) {
        float* row = a.get() + t * K;
        const int64_t start = t * c.stride - c.pad_begin;
        for (int64_t kk = 0; kk < c.kernel; ++kk) {
          const int64_t pos = start + kk * c.dilation;
          for (int64_t ci = 0; ci < cin; ++ci) row[kk * cin + ci] = pos >= 0 && pos < t_in ? xn[ci * t_in + pos] : 0.f;
        }
      }
    }
    if (time_major) {
      args.c = y + n * t_out * N;
      dispatch.gemm(args, 0);
    } else {
      dispatch.gemm(args, 0);
      transpose(yt.get(), t_out, N, y + n * N * t_out);  // [t_out, Cout] -> Conv's [Cout, t_out]
    }
  }
}

}  // namespace

extern const OpModule kConvModule{"", "Conv", 1, OpPlan::Op::kConv, claim_conv, run_conv};

}  // namespace xdna::ops
