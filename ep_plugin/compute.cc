#include "compute.h"

#include <algorithm>
#include <cstring>
#include <optional>

#include "kernels/emulator/emulator.h"

namespace xdna::ep {
namespace {

using Dims = std::vector<int64_t>;

struct Tensor {
  const float* data = nullptr;
  Dims dims;
};

Tensor input(const OrtApi& api, OrtKernelContext* ctx, int index) {
  const OrtValue* v = nullptr;
  check(api, api.KernelContext_GetInput(ctx, static_cast<size_t>(index), &v));
  if (!v) throw OrtError(ORT_EP_FAIL, "missing runtime input " + std::to_string(index));
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(api, api.GetTensorTypeAndShape(v, &info));
  size_t rank = 0;
  api.GetDimensionsCount(info, &rank);
  Tensor t;
  t.dims.resize(rank);
  api.GetDimensions(info, t.dims.data(), rank);
  api.ReleaseTensorTypeAndShapeInfo(info);
  const void* p = nullptr;
  check(api, api.GetTensorData(v, &p));
  t.data = static_cast<const float*>(p);
  return t;
}

float* output(const OrtApi& api, OrtKernelContext* ctx, const Dims& dims) {
  OrtValue* v = nullptr;
  check(api, api.KernelContext_GetOutput(ctx, 0, dims.data(), dims.size(), &v));
  void* p = nullptr;
  check(api, api.GetTensorMutableData(v, &p));
  return static_cast<float*>(p);
}

int64_t count(const Dims& d, size_t begin = 0, size_t end = SIZE_MAX) {
  int64_t n = 1;
  for (size_t i = begin; i < std::min(end, d.size()); ++i) n *= d[i];
  return n;
}

// numpy-style broadcast of two batch shapes.
Dims broadcast(const Dims& a, const Dims& b) {
  Dims out(std::max(a.size(), b.size()));
  for (size_t i = 0; i < out.size(); ++i) {
    const int64_t da = i < out.size() - a.size() ? 1 : a[i - (out.size() - a.size())];
    const int64_t db = i < out.size() - b.size() ? 1 : b[i - (out.size() - b.size())];
    if (da != db && da != 1 && db != 1)
      throw OrtError(ORT_INVALID_ARGUMENT, "MatMul batch dimensions do not broadcast");
    out[i] = da == 1 ? db : da;
  }
  return out;
}

// Flat index into `dims` (right-aligned against `out`) for the multi-index of flat output position `pos`.
int64_t broadcast_index(const Dims& out, const Dims& dims, int64_t pos) {
  int64_t idx = 0, stride = 1;
  for (size_t i = out.size(); i-- > 0;) {
    const int64_t coord = pos % out[i];
    pos /= out[i];
    const size_t offset = out.size() - dims.size();
    if (i >= offset) {
      const int64_t d = dims[i - offset];
      if (d != 1) idx += coord * stride;
      stride *= d;
    }
  }
  return idx;
}

Dims contiguous_strides(const Dims& dims) {
  Dims strides(dims.size());
  int64_t s = 1;
  for (size_t i = dims.size(); i-- > 0;) {
    strides[i] = s;
    s *= dims[i];
  }
  return strides;
}

// An operand as the MatMul sees it: its dims and element strides into `data`. A fused Transpose makes both a
// permutation of the tensor's own (operand dim d = tensor dim perm[d]).
struct View {
  const float* data = nullptr;
  Dims dims, strides;
};

View view_of(const Tensor& t, const std::vector<int64_t>& perm) {
  View v{t.data, t.dims, contiguous_strides(t.dims)};
  if (perm.empty()) return v;
  if (perm.size() != t.dims.size()) throw OrtError(ORT_INVALID_ARGUMENT, "Transpose perm does not match its input");
  View p{t.data, Dims(perm.size()), Dims(perm.size())};
  for (size_t d = 0; d < perm.size(); ++d) {
    p.dims[d] = v.dims[static_cast<size_t>(perm[d])];
    p.strides[d] = v.strides[static_cast<size_t>(perm[d])];
  }
  return p;
}

// Element offset of the matrix at flat output batch position `pos`, for batch dims right-aligned against `out`
// (broadcast dims of size 1 stay at index 0).
int64_t batch_offset(const Dims& out, const Dims& dims, const Dims& strides, int64_t pos) {
  int64_t offset = 0;
  const size_t shift = out.size() - dims.size();
  for (size_t i = out.size(); i-- > 0;) {
    const int64_t coord = pos % out[i];
    pos /= out[i];
    if (i >= shift && dims[i - shift] != 1) offset += coord * strides[i - shift];
  }
  return offset;
}

// A run-time B with a unit stride along K or N, few rows against it: the unpacked CPU-path call (packing a fresh B
// would cost more than the product, and no device dispatch pays off for so little work). Otherwise none.
std::optional<kernels::UnpackedGemm> as_unpacked(const kernels::GemmArgs& args, const float* b, int64_t stride_k,
                                                 int64_t stride_n) {
  if (args.M > kernels::kUnpackedMaxM) return std::nullopt;
  if (stride_n == 1) return kernels::UnpackedGemm{args, b, stride_k, false};
  if (stride_k == 1) return kernels::UnpackedGemm{args, b, stride_n, true};  // K^T read from K as it lies
  return std::nullopt;
}

}  // namespace

NodeKernel::NodeKernel(graph::GemmPlan plan, std::vector<std::string> runtime_inputs,
                       std::shared_ptr<kernels::Backend> backend, int threads, Log log,
                       std::function<void(const std::string&)> report)
    : plan_(std::move(plan)), runtime_inputs_(std::move(runtime_inputs)), backend_(std::move(backend)),
      threads_(threads), log_(log), report_(std::move(report)) {
  for (auto& m : plan_.weights.mats) weights_.push_back(make_weight(m, true));
  plan_.weights.mats.clear();  // weights_ owns them now
}

NodeKernel::~NodeKernel() {
  log_(ORT_LOGGING_LEVEL_INFO, "node '" + plan_.node_name + "': " + std::to_string(device_calls_.load()) +
                                   " GEMM calls on " + backend_->name() + ", " + std::to_string(cpu_calls_.load()) +
                                   " on the CPU path (fallbacks, shapes without a kernel, few-row run-time B)");
  if (report_) {
    std::string name;
    for (char c : plan_.node_name) {
      if (c == '"' || c == '\\') name += '\\';
      name += c;
    }
    report_("{\"runtime\": true, \"node\": \"" + name + "\", \"backend\": \"" + backend_->name() +
            "\", \"device_calls\": " + std::to_string(device_calls_.load()) + ", \"cpu_calls\": " +
            std::to_string(cpu_calls_.load()) + ", \"device_mflop\": " + std::to_string(device_flop_.load() / 1e6) +
            ", \"cpu_mflop\": " + std::to_string(cpu_flop_.load() / 1e6) +
            (work_.empty() ? std::string() : ", \"work\": " + work_) + "}");
  }
}

NodeKernel::Weight NodeKernel::make_weight(std::shared_ptr<const kernels::PackedB> packed, bool log_faults) {
  Weight w{std::move(packed), nullptr};
  if (!device_ok_) return w;
  std::string why;
  if (!backend_->can_run(0, w.host->shape.K, w.host->shape.N, &why)) {
    note_cpu_path(w.host->shape.K, w.host->shape.N, why);
    return w;
  }
  try {
    w.device = backend_->upload(w.host);
  } catch (const kernels::BackendFault& f) {
    if (log_faults) fall_back(f.what());
    else device_ok_ = false;
  }
  return w;
}

void NodeKernel::note_cpu_path(int64_t K, int64_t N, const std::string& why) {
  std::call_once(cpu_path_logged_, [&] {
    log_(ORT_LOGGING_LEVEL_INFO, "node '" + plan_.node_name + "': " + backend_->name() + " cannot run K=" +
                                     std::to_string(K) + " N=" + std::to_string(N) + " (" + why +
                                     "); computing on the CPU path (same bf16 arithmetic)");
  });
}

void NodeKernel::note_work(int64_t batches, int64_t M, int64_t K, int64_t N, bool runtime_b, bool a_gather,
                           bool conv) {
  if (!report_) return;
  std::string w = "[" + std::to_string(batches) + ", " + std::to_string(M) + ", " + std::to_string(K) + ", " +
                  std::to_string(N) + ", " + (runtime_b ? "1" : "0") + ", " + (a_gather ? "1" : "0") + ", " +
                  (conv ? "1" : "0") + "]";
  std::lock_guard<std::mutex> lock(work_mu_);
  work_ = std::move(w);
}

void NodeKernel::fall_back(const std::string& why) {
  if (device_ok_.exchange(false))
    log_(ORT_LOGGING_LEVEL_WARNING, "node '" + plan_.node_name + "': backend '" + backend_->name() + "' fault (" +
                                        why + "); this node now runs on the CPU (same bf16 arithmetic)");
}

int NodeKernel::runtime_index(const std::string& name) const {
  for (size_t i = 0; i < runtime_inputs_.size(); ++i)
    if (runtime_inputs_[i] == name) return static_cast<int>(i);
  throw OrtError(ORT_EP_FAIL, "node '" + plan_.node_name + "': input '" + name + "' not among the fused inputs");
}

void NodeKernel::run(const kernels::GemmArgs& args, const Weight& w) {
  if (args.M == 0 || w.host->shape.N == 0) return;
  const auto& s = w.host->shape;
  const uint64_t flop = 2ull * static_cast<uint64_t>(args.M) * static_cast<uint64_t>(s.K) * static_cast<uint64_t>(s.N);
  if (device_ok_ && w.device) {
    std::string why;
    if (backend_->can_run(args.M, s.K, s.N, &why)) {
      try {
        backend_->gemm(args, *w.device);
        ++device_calls_;
        device_flop_ += flop;
        return;
      } catch (const kernels::BackendFault& f) {
        fall_back(f.what());
      }
    } else {
      note_cpu_path(s.K, s.N, "M=" + std::to_string(args.M) + ": " + why);
    }
  }
  kernels::emulator_gemm(args, *w.host, threads_);
  ++cpu_calls_;
  cpu_flop_ += flop;
}

void NodeKernel::compute(const OrtApi& api, OrtKernelContext* ctx) {
  if (plan_.op == graph::GemmPlan::Op::kGemm) compute_gemm(api, ctx);
  else if (plan_.op == graph::GemmPlan::Op::kConv) compute_conv(api, ctx);
  else compute_matmul(api, ctx);
}

void NodeKernel::compute_matmul(const OrtApi& api, OrtKernelContext* ctx) {
  const View a = view_of(input(api, ctx, runtime_index(plan_.a.name)), plan_.a.perm);
  View b;
  if (plan_.b.constant) {
    b.dims = plan_.weights.batch_shape;
    const auto& s = weights_.at(0).host->shape;
    b.dims.push_back(s.K);
    b.dims.push_back(s.N);
    if (plan_.b.rank == 1) b.dims = {s.K};
    b.strides = contiguous_strides(b.dims);
  } else {
    b = view_of(input(api, ctx, runtime_index(plan_.b.name)), plan_.b.perm);
  }
  const bool a_vec = a.dims.size() == 1, b_vec = b.dims.size() == 1;
  const View a2 = a_vec ? View{a.data, {1, a.dims[0]}, {a.dims[0], 1}} : a;
  const View b2 = b_vec ? View{b.data, {b.dims[0], 1}, {1, 1}} : b;
  const size_t ra = a2.dims.size(), rb = b2.dims.size();
  const int64_t M = a2.dims[ra - 2], K = a2.dims[ra - 1], N = b2.dims[rb - 1];
  if (b2.dims[rb - 2] != K)
    throw OrtError(ORT_INVALID_ARGUMENT, "node '" + plan_.node_name + "': MatMul inner dimensions differ");
  const Dims batch_a(a2.dims.begin(), a2.dims.end() - 2), batch_b(b2.dims.begin(), b2.dims.end() - 2);
  const Dims batch = broadcast(batch_a, batch_b);
  Dims out_dims = batch;
  if (!a_vec) out_dims.push_back(M);
  if (!b_vec) out_dims.push_back(N);
  float* y = output(api, ctx, out_dims);
  const int64_t batches = count(batch);
  if (batches == 0 || M == 0 || N == 0) return;

  // A 2-D (or batch-broadcast) B shared by every batch of a contiguous A: one tall GEMM.
  const bool plain = plan_.a.perm.empty() && plan_.b.perm.empty();
  const bool tall = plain && count(batch_b) == 1 && count(batch_a) == batches;
  note_work(tall ? 1 : batches, tall ? batches * M : M, K, N, !plan_.b.constant, a2.strides[ra - 1] != 1, false);
  if (tall) {
    if (plan_.b.constant) run({a.data, batches * M, K, y, N}, weights_.at(0));
    else run_runtime_b({a.data, batches * M, K, y, N}, b.data, K, N, N, 1);
    return;
  }
  const Dims a_batch_strides(a2.strides.begin(), a2.strides.end() - 2);
  const Dims b_batch_strides(b2.strides.begin(), b2.strides.end() - 2);
  const int64_t a_m_stride = a2.strides[ra - 2], a_k_stride = a2.strides[ra - 1];
  const int64_t b_k_stride = b2.strides[rb - 2], b_n_stride = b2.strides[rb - 1];
  // The kernels read A rows with unit stride; a fused Transpose that moves A's last dim gets A gathered.
  std::vector<float> a_gathered(a_k_stride == 1 ? 0 : static_cast<size_t>(batches * M * K));
  std::vector<kernels::UnpackedGemm> unpacked;  // run-time B, few rows: all batches in one call
  std::vector<std::pair<kernels::GemmArgs, Weight>> batched;  // the others: one backend batch
  for (int64_t i = 0; i < batches; ++i) {
    const float* ap = a.data + batch_offset(batch, batch_a, a_batch_strides, i);
    int64_t lda = a_m_stride;
    if (a_k_stride != 1) {
      float* dst = a_gathered.data() + i * M * K;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) dst[m * K + k] = ap[m * a_m_stride + k * a_k_stride];
      ap = dst;
      lda = K;
    }
    const kernels::GemmArgs args{ap, M, lda, y + i * M * N, N};
    if (plan_.b.constant) {
      batched.emplace_back(args, weights_.at(static_cast<size_t>(broadcast_index(batch, batch_b, i))));
      continue;
    }
    const float* bp = b.data + batch_offset(batch, batch_b, b_batch_strides, i);
    if (auto call = as_unpacked(args, bp, b_k_stride, b_n_stride)) unpacked.push_back(*call);
    else batched.emplace_back(args, make_weight(std::make_shared<const kernels::PackedB>(
                                                    kernels::pack_b(bp, K, N, b_k_stride, b_n_stride)),
                                                true));
  }
  run_unpacked(unpacked.data(), unpacked.size(), K, N);
  run_batch(batched);
}

void NodeKernel::run_batch(const std::vector<std::pair<kernels::GemmArgs, Weight>>& items) {
  if (items.empty()) return;
  std::vector<kernels::BatchItem> device;
  bool all_device = device_ok_ && items.size() > 1;
  uint64_t flop = 0;
  for (const auto& [args, w] : items) {
    if (!all_device) break;
    const auto& s = w.host->shape;
    if (args.M == 0 || s.N == 0) continue;
    std::string why;
    if (!w.device || !backend_->can_run(args.M, s.K, s.N, &why)) {
      all_device = false;  // run() below takes the CPU path and says why
      break;
    }
    device.push_back({args, w.device.get()});
    flop += 2ull * static_cast<uint64_t>(args.M) * static_cast<uint64_t>(s.K) * static_cast<uint64_t>(s.N);
  }
  if (all_device && !device.empty()) {
    try {
      backend_->gemm_batch(device.data(), device.size());
      device_calls_ += device.size();
      device_flop_ += flop;
      return;
    } catch (const kernels::BackendFault& f) {
      fall_back(f.what());  // every C of the batch is unspecified now: all of them again on the CPU path
    }
  }
  for (const auto& [args, w] : items) run(args, w);
}

void NodeKernel::run_unpacked(const kernels::UnpackedGemm* calls, size_t count, int64_t K, int64_t N) {
  if (count == 0) return;
  kernels::emulator_gemm_unpacked(calls, count, K, N, threads_);
  uint64_t flop = 0;
  for (size_t i = 0; i < count; ++i) flop += 2ull * static_cast<uint64_t>(calls[i].args.M * K * N);
  cpu_calls_ += count;
  cpu_flop_ += flop;
}

void NodeKernel::run_runtime_b(const kernels::GemmArgs& args, const float* b, int64_t K, int64_t N,
                               int64_t stride_k, int64_t stride_n) {
  if (args.M == 0 || N == 0) return;
  if (auto call = as_unpacked(args, b, stride_k, stride_n)) {
    run_unpacked(&*call, 1, K, N);
    return;
  }
  run(args, make_weight(std::make_shared<const kernels::PackedB>(kernels::pack_b(b, K, N, stride_k, stride_n)), true));
}

void NodeKernel::compute_conv(const OrtApi& api, OrtKernelContext* ctx) {
  const graph::ConvParams& c = plan_.conv;
  const Tensor x = input(api, ctx, runtime_index(plan_.a.name));
  if (x.dims.size() != 3 || x.dims[1] != c.in_channels)
    throw OrtError(ORT_INVALID_ARGUMENT, "node '" + plan_.node_name + "': Conv input is not [N, " +
                                             std::to_string(c.in_channels) + ", T]");
  const int64_t batches = x.dims[0], t_in = x.dims[2];
  const int64_t span = c.dilation * (c.kernel - 1) + 1;
  const int64_t t_out = std::max<int64_t>(0, (t_in + c.pad_begin + c.pad_end - span) / c.stride + 1);
  float* y = output(api, ctx, {batches, c.out_channels, t_out});
  if (batches == 0 || t_out == 0 || c.out_channels == 0) return;
  const int64_t K = c.in_channels * c.kernel, N = c.out_channels;
  note_work(batches, t_out, K, N, false, false, true);
  // im2col rows (one per output position, zeros where the window reaches into the padding) and the GEMM result
  // [t_out, Cout], written back transposed to the [Cout, t_out] layout of Conv's output.
  std::vector<float> cols(static_cast<size_t>(t_out * K)), yt(static_cast<size_t>(t_out * N));
  for (int64_t n = 0; n < batches; ++n) {
    const float* xn = x.data + n * c.in_channels * t_in;
    for (int64_t t = 0; t < t_out; ++t) {
      float* row = cols.data() + t * K;
      const int64_t start = t * c.stride - c.pad_begin;
      for (int64_t ci = 0; ci < c.in_channels; ++ci)
        for (int64_t kk = 0; kk < c.kernel; ++kk) {
          const int64_t pos = start + kk * c.dilation;
          row[ci * c.kernel + kk] = pos >= 0 && pos < t_in ? xn[ci * t_in + pos] : 0.f;
        }
    }
    run({cols.data(), t_out, K, yt.data(), N}, weights_.at(0));
    float* yn = y + n * N * t_out;
    for (int64_t co = 0; co < N; ++co) {
      const float bias = plan_.c_value.empty() ? 0.f : plan_.c_value[static_cast<size_t>(co)];
      for (int64_t t = 0; t < t_out; ++t) yn[co * t_out + t] = yt[t * N + co] + bias;
    }
  }
}

void NodeKernel::compute_gemm(const OrtApi& api, OrtKernelContext* ctx) {
  Tensor a = input(api, ctx, runtime_index(plan_.a.name));
  const int64_t M = plan_.trans_a ? a.dims[1] : a.dims[0];
  const int64_t K = plan_.trans_a ? a.dims[0] : a.dims[1];
  Tensor b;
  int64_t N;
  if (plan_.b.constant) {
    const auto& s = weights_.at(0).host->shape;
    if (s.K != K) throw OrtError(ORT_INVALID_ARGUMENT, "node '" + plan_.node_name + "': Gemm inner dimensions differ");
    N = s.N;
  } else {
    b = input(api, ctx, runtime_index(plan_.b.name));
    const int64_t Kb = plan_.trans_b ? b.dims[1] : b.dims[0];
    N = plan_.trans_b ? b.dims[0] : b.dims[1];
    if (Kb != K) throw OrtError(ORT_INVALID_ARGUMENT, "node '" + plan_.node_name + "': Gemm inner dims differ");
  }
  float* y = output(api, ctx, {M, N});
  if (M == 0 || N == 0) return;

  std::vector<float> a_t;  // transA: the kernel wants row-major [M, K]
  const float* a_rows = a.data;
  if (plan_.trans_a) {
    a_t.resize(static_cast<size_t>(M * K));
    for (int64_t k = 0; k < K; ++k)
      for (int64_t m = 0; m < M; ++m) a_t[m * K + k] = a.data[k * M + m];
    a_rows = a_t.data();
  }
  const kernels::GemmArgs args{a_rows, M, K, y, N};
  note_work(1, M, K, N, !plan_.b.constant, plan_.trans_a, false);
  if (K == 0) std::fill(y, y + M * N, 0.f);
  else if (plan_.b.constant) run(args, weights_.at(0));
  else if (!plan_.trans_b) run_runtime_b(args, b.data, K, N, N, 1);
  else run_runtime_b(args, b.data, K, N, 1, K);
  if (plan_.alpha != 1.f)
    for (int64_t i = 0; i < M * N; ++i) y[i] *= plan_.alpha;

  // beta * C, C unidirectionally broadcast to [M, N].
  if (!plan_.c.present || plan_.beta == 0.f) return;
  const float* c;
  Dims c_dims;
  if (plan_.c.constant) {
    c = plan_.c_value.data();
    c_dims = plan_.c.dims;
  } else {
    Tensor ct = input(api, ctx, runtime_index(plan_.c.name));
    c = ct.data;
    c_dims = ct.dims;
  }
  const int64_t cm = c_dims.size() == 2 ? c_dims[0] : 1;
  const int64_t cn = c_dims.empty() ? 1 : c_dims.back();
  if ((cm != 1 && cm != M) || (cn != 1 && cn != N))
    throw OrtError(ORT_INVALID_ARGUMENT, "node '" + plan_.node_name + "': Gemm C does not broadcast to [M, N]");
  for (int64_t m = 0; m < M; ++m) {
    const float* crow = c + (cm == 1 ? 0 : m * cn);
    float* yrow = y + m * N;
    if (cn == 1)
      for (int64_t n = 0; n < N; ++n) yrow[n] += plan_.beta * crow[0];
    else
      for (int64_t n = 0; n < N; ++n) yrow[n] += plan_.beta * crow[n];
  }
}

}  // namespace xdna::ep
