#include "dispatch.h"

#include "json.h"

#include <tuple>
#include "kernels/ep_buffers.h"

namespace xdna::ep {
namespace {

uint64_t flop_of(int64_t M, int64_t K, int64_t N) {
  return 2ull * static_cast<uint64_t>(M) * static_cast<uint64_t>(K) * static_cast<uint64_t>(N);
}

constexpr const char* kReasonKeys[] = {"not_for_device", "unpacked", "fault"};

}  // namespace

Dispatcher::Dispatcher(std::string node_name, kernels::Precision precision, kernels::PackedWeights constant_b,
                       std::shared_ptr<kernels::Backend> primary, std::shared_ptr<kernels::Backend> cpu, Log log,
                       std::function<void(const std::string&)> report)
    : node_(std::move(node_name)), precision_(precision), primary_(std::move(primary)), cpu_(std::move(cpu)), log_(log),
      report_(std::move(report)), batch_shape_(std::move(constant_b.batch_shape)) {
  for (auto& m : constant_b.mats) weights_.push_back(make_weight(std::move(m)));
}

Dispatcher::~Dispatcher() {
  try {  // a destructor is noexcept: the report and the log line are best effort
    const uint64_t cpu_calls = cpu_calls_[0] + cpu_calls_[1] + cpu_calls_[2];
    const uint64_t cpu_flop = cpu_flop_[0] + cpu_flop_[1] + cpu_flop_[2];
    log_(ORT_LOGGING_LEVEL_INFO, "node '" + node_ + "': " + std::to_string(device_calls_.load()) + " GEMM calls on " +
                                     primary_->name() + ", " + std::to_string(cpu_calls) + " on the CPU path (" +
                                     std::to_string(cpu_calls_[0].load()) + " not for the device, " +
                                     std::to_string(cpu_calls_[1].load()) + " run-time B unpacked, " +
                                     std::to_string(cpu_calls_[2].load()) + " after a fault)");
    if (!report_) return;
    std::string by_reason;
    for (size_t r = 0; r < 3; ++r)
      by_reason += std::string(r ? ", " : "") + json_string(kReasonKeys[r]) + ": " + std::to_string(cpu_calls_[r].load());
    // work_ is a JSON array of integers (note_work)
    report_("{\"runtime\": true, \"node\": " + json_string(node_) + ", \"backend\": " + json_string(primary_->name()) +
            ", \"precision\": " + json_string(kernels::precision_name(precision_)) +
            ", \"device_calls\": " + std::to_string(device_calls_.load()) + ", \"cpu_calls\": " +
            std::to_string(cpu_calls) + ", \"cpu_calls_by_reason\": {" + by_reason + "}, \"device_mflop\": " +
            json_number(device_flop_.load() / 1e6) + ", \"cpu_mflop\": " + json_number(cpu_flop / 1e6) +
            (work_.empty() ? std::string() : ", \"work\": " + work_) +
            (attention_work_.empty() ? std::string() : ", \"attention\": " + attention_work_) +
            ", \"ep_buffers\": [" + std::to_string(a_in_ep_.load()) + ", " + std::to_string(c_in_ep_.load()) + ", " +
            std::to_string(products_.load()) + "], \"chained_calls\": " + std::to_string(chained_.load()) +
            ", \"a_shared_calls\": " + std::to_string(a_shared_.load()) +
            ", \"int8_chain_calls\": " + std::to_string(int8_chain_calls_.load()) +
            ", \"int8_shared_a_calls\": " + std::to_string(int8_shared_a_calls_.load()) + "}");
  } catch (...) {
  }
}

Dispatcher::Weight Dispatcher::make_weight(std::shared_ptr<const kernels::PackedB> packed) {
  Weight w{std::move(packed), nullptr, nullptr};
  w.cpu = cpu_->upload(w.host);
  if (primary_ok_ && primary_->supports(w.host->precision, nullptr) &&
      primary_->can_run_in(w.host->precision, 0, w.host->shape.K, w.host->shape.N, nullptr)) {
    try {
      w.device = primary_->upload(w.host);
    } catch (const kernels::BackendFault& f) {
      fault(f);
    }
  }
  return w;
}

void Dispatcher::fault(const kernels::BackendFault& f) {
  if (primary_ok_.exchange(false))
    log_(ORT_LOGGING_LEVEL_WARNING, "node '" + node_ + "': backend '" + primary_->name() + "' fault (" + f.what() +
                                        "); this node now runs on the CPU (same " +
                                        kernels::precision_name(precision_) + " arithmetic)");
}

void Dispatcher::on_cpu(CpuReason reason, uint64_t calls, uint64_t flop, const std::string& detail) {
  const auto r = static_cast<size_t>(reason);
  cpu_calls_[r] += calls;
  cpu_flop_[r] += flop;
  if (reason == CpuReason::kFault) return;  // fault() logged it, with its reason
  std::call_once(logged_[r], [&] {
    log_(ORT_LOGGING_LEVEL_INFO, "node '" + node_ + "': " + detail + "; computed on the CPU (same " +
                                     (reason == CpuReason::kUnpacked ? "bf16" : kernels::precision_name(precision_)) +
                                     " arithmetic)");
  });
}

void Dispatcher::note_buffers(const kernels::GemmArgs& args, int64_t K, int64_t N) {
  // Counted only for the report: two lookups under the EP-memory registry's mutex per product are a fixed cost of
  // every small call otherwise.
  if (args.M <= 0 || !report_) return;
  ++products_;
  const auto span = [&](int64_t ld, int64_t cols) { return static_cast<size_t>((args.M - 1) * ld + cols) * sizeof(float); };
  if (kernels::ep_buffer_find(args.a, span(args.lda, K), nullptr)) ++a_in_ep_;
  if (kernels::ep_buffer_find(args.c, span(args.ldc, N), nullptr)) ++c_in_ep_;
}

void Dispatcher::run(const kernels::GemmArgs& args, const Weight& w) {
  const auto& s = w.host->shape;
  if (args.M == 0 || s.N == 0) return;
  const uint64_t flop = flop_of(args.M, s.K, s.N);
  CpuReason reason = CpuReason::kFault;
  std::string why;
  if (primary_ok_) {
    if (w.device && primary_->can_run_in(w.host->precision, args.M, s.K, s.N, &why)) {
      try {
        primary_->gemm(args, *w.device);
        ++device_calls_;
        device_flop_ += flop;
        return;
      } catch (const kernels::BackendFault& f) {
        fault(f);
      }
    } else if (!primary_->supports(w.host->precision, &why)) {
      reason = CpuReason::kNotForDevice;
      why = primary_->name() + " runs no " + kernels::precision_name(w.host->precision) + " products (" + why + ")";
    } else {
      if (!w.device) primary_->can_run_in(w.host->precision, 0, s.K, s.N, &why);
      reason = CpuReason::kNotForDevice;
      why = primary_->name() + " does not take M=" + std::to_string(args.M) + " K=" + std::to_string(s.K) +
            " N=" + std::to_string(s.N) + " (" + why + ")";
    }
  }
  cpu_->gemm(args, *w.cpu);
  on_cpu(reason, 1, flop, why);
}

void Dispatcher::run_batch(const std::vector<std::pair<kernels::GemmArgs, const Weight*>>& items) {
  if (items.empty()) return;
  std::vector<kernels::BatchItem> device;
  bool all_device = primary_ok_ && items.size() > 1;
  uint64_t flop = 0;
  for (const auto& [args, w] : items) {
    if (!all_device) break;
    const auto& s = w->host->shape;
    if (args.M == 0 || s.N == 0) continue;
    if (!w->device || !primary_->can_run_in(w->host->precision, args.M, s.K, s.N, nullptr)) {  // (w->device: precision supported)
      all_device = false;  // run() below takes the CPU path and says why
      break;
    }
    device.push_back({args, w->device.get()});
    flop += flop_of(args.M, s.K, s.N);
  }
  if (all_device && !device.empty()) {
    try {
      primary_->gemm_batch(device.data(), device.size());
      device_calls_ += device.size();
      device_flop_ += flop;
      return;
    } catch (const kernels::BackendFault& f) {
      fault(f);  // every C of the batch is unspecified now: all of them again on the CPU
    }
  }
  for (const auto& [args, w] : items) run(args, *w);
}

void Dispatcher::gemm(const kernels::GemmArgs& args, size_t weight) {
  const Weight& w = weights_.at(weight);
  note_buffers(args, w.host->shape.K, w.host->shape.N);
  run(args, w);
}

bool Dispatcher::int8_product_on(const kernels::Backend* primary, int64_t M) const {
  if (weights_.size() != 1 || primary_.get() != primary || !primary_ok_) return false;
  const Weight& w = weights_[0];
  const auto& s = w.host->shape;
  const auto int8 = kernels::Precision::kInt8;
  return w.host->precision == int8 && w.device && primary->can_run_in(int8, M, s.K, s.N, nullptr);
}

bool Dispatcher::gemm_int8_chain(const kernels::GemmArgs& first, Dispatcher& next, const kernels::GemmArgs& second) {
  if (!int8_product_on(primary_.get(), first.M) || !next.int8_product_on(primary_.get(), second.M)) return false;
  const Weight &w1 = weights_[0], &w2 = next.weights_[0];
  const auto &s1 = w1.host->shape, &s2 = w2.host->shape;
  if (!primary_->gemm_int8_chain({first, w1.device.get(), second, w2.device.get()})) return false;
  ++device_calls_;
  device_flop_ += flop_of(first.M, s1.K, s1.N);
  ++int8_chain_calls_;
  ++next.int8_chain_calls_;
  ++next.device_calls_;
  next.device_flop_ += flop_of(second.M, s2.K, s2.N);
  return true;
}

bool Dispatcher::int8_shared_a_ready(const std::vector<Dispatcher*>& nodes, int64_t M) {
  if (nodes.empty() || !nodes[0]->primary_->runs_int8_shared_a()) return false;
  for (const Dispatcher* d : nodes)
    if (!d->int8_product_on(nodes[0]->primary_.get(), M)) return false;
  return true;
}

bool Dispatcher::gemm_int8_shared_a(const std::vector<Dispatcher*>& nodes, const float* a, int64_t M, int64_t lda,
                                    std::vector<kernels::SharedAProduct>& products) {
  if (nodes.size() != products.size() || !int8_shared_a_ready(nodes, M)) return false;
  const auto& primary = nodes[0]->primary_;
  for (size_t i = 0; i < nodes.size(); ++i) products[i].weight = nodes[i]->weights_[0].device.get();
  if (!primary->gemm_int8_shared_a(a, M, lda, products.data(), products.size())) return false;
  for (size_t i = 0; i < nodes.size(); ++i) {
    Dispatcher* d = nodes[i];
    const auto& s = d->weights_[0].host->shape;
    // For the report, as gemm() counts a product: A and C in the EP's memory? A bf16 output's fp32 product is the
    // backend's own (the per-node path puts it in an EP buffer), so its C counts as such.
    const kernels::SharedAProduct& pr = products[i];
    d->note_buffers({a, M, lda, pr.c, pr.ldc}, s.K, s.N);
    if (!pr.c && d->report_) ++d->c_in_ep_;
    ++d->device_calls_;
    d->device_flop_ += flop_of(M, s.K, s.N);
    ++d->int8_shared_a_calls_;
  }
  return true;
}

void Dispatcher::gemm_later(const kernels::GemmArgs& args, size_t weight, DeferredProducts* later) {
  const Weight& w = weights_.at(weight);
  const auto& s = w.host->shape;
  if (!later || args.M == 0 || s.N == 0 || !primary_ok_ || !w.device ||
      !primary_->can_run_in(w.host->precision, args.M, s.K, s.N, nullptr))
    return gemm(args, weight);  // run() says why a product is not for the device
  note_buffers(args, s.K, s.N);
  later->items_.push_back({this, args, weight});
}

void DeferredProducts::flush() {
  std::vector<Item> items;
  items.swap(items_);
  size_t first = 0;
  while (first < items.size()) {  // runs of one primary backend (in practice every node of a session shares one)
    const auto& primary = items[first].node->primary_;
    size_t last = first + 1;
    while (last < items.size() && items[last].node->primary_ == primary) ++last;
    std::vector<kernels::BatchItem> batch;
    for (size_t i = first; i < last; ++i)
      batch.push_back({items[i].args, items[i].node->weights_.at(items[i].weight).device.get()});
    auto shape_of = [&](size_t i) {  // the xrt backend's hardware context is per padded weight shape
      const auto& h = *items[i].node->weights_.at(items[i].weight).host;
      return std::make_tuple(h.shape.Kpad, h.shape.Npad, static_cast<int>(h.precision));
    };
    try {
      primary->gemm_batch(batch.data(), batch.size());
      for (size_t i = first; i < last; ++i) {
        Dispatcher& d = *items[i].node;
        const auto& s = d.weights_.at(items[i].weight).host->shape;
        ++d.device_calls_;
        d.device_flop_ += flop_of(items[i].args.M, s.K, s.N);
        if (i > first && shape_of(i) == shape_of(i - 1)) {  // same xclbin: the same runlist
          ++d.chained_;
          for (size_t j = first; j < i; ++j) {
            const kernels::GemmArgs& e = items[j].args;
            if (e.a == items[i].args.a && e.M == items[i].args.M && e.lda == items[i].args.lda) {
              ++d.a_shared_;  // the backend imports and syncs that A once per list
              break;
            }
          }
        }
      }
    } catch (const kernels::BackendFault& f) {
      for (size_t i = first; i < last; ++i) {  // every C of the batch is unspecified: all of them on the CPU
        Dispatcher& d = *items[i].node;
        const Dispatcher::Weight& w = d.weights_.at(items[i].weight);
        d.fault(f);
        d.cpu_->gemm(items[i].args, *w.cpu);
        d.on_cpu(Dispatcher::CpuReason::kFault, 1, flop_of(items[i].args.M, w.host->shape.K, w.host->shape.N), "");
      }
    }
    first = last;
  }
}

void Dispatcher::gemm_batch(const std::vector<std::pair<kernels::GemmArgs, size_t>>& items) {
  std::vector<std::pair<kernels::GemmArgs, const Weight*>> batch;
  batch.reserve(items.size());
  for (const auto& [args, i] : items) {
    batch.emplace_back(args, &weights_.at(i));
    note_buffers(args, batch.back().second->host->shape.K, batch.back().second->host->shape.N);
  }
  run_batch(batch);
}

void Dispatcher::gemm_runtime(const std::vector<std::pair<kernels::GemmArgs, RuntimeB>>& items, int64_t K, int64_t N) {
  if (N == 0) return;
  std::vector<kernels::UnpackedGemm> unpacked;
  std::vector<Weight> packed;  // kept alive until the batch has run
  std::vector<std::pair<kernels::GemmArgs, const Weight*>> batch;
  packed.reserve(items.size());
  uint64_t unpacked_flop = 0;
  // A run-time B is used once: int8 keeps it in bf16 (quantising it would cost a pass over B for one use, the
  // contract's rule), bf16x3 splits it like a constant one (no unpacked path: the precision was asked for).
  const kernels::Precision b_precision =
      precision_ == kernels::Precision::kInt8 ? kernels::Precision::kBf16 : precision_;
  for (const auto& [args, b] : items) {
    if (args.M == 0) continue;
    note_buffers(args, K, N);
    // Few rows against B with a unit stride along K or N: read as it lies (K^T straight from K).
    if (b_precision == kernels::Precision::kBf16 && args.M <= kernels::kUnpackedMaxM &&
        (b.stride_n == 1 || b.stride_k == 1)) {
      unpacked.push_back(b.stride_n == 1 ? kernels::UnpackedGemm{args, b.b, b.stride_k, false}
                                         : kernels::UnpackedGemm{args, b.b, b.stride_n, true});
      unpacked.back().b_bf16 = b.b_bf16;
      unpacked_flop += flop_of(args.M, K, N);
      continue;
    }
    // A bf16 B is packed from its exact fp32 widening: every precision's packing then sees the values an fp32 B
    // rounded to bf16 would have, so the products are the same.
    std::vector<float> widened;
    if (b.b_bf16) {
      widened.resize(static_cast<size_t>(K * N));
      for (int64_t k = 0; k < K; ++k)
        for (int64_t n = 0; n < N; ++n)
          widened[static_cast<size_t>(k * N + n)] = kernels::bf16_to_f32(b.b_bf16[k * b.stride_k + n * b.stride_n]);
    }
    packed.push_back(make_weight(std::make_shared<const kernels::PackedB>(
        b.b_bf16 ? kernels::pack_b_in(b_precision, widened.data(), K, N, N, 1)
                 : kernels::pack_b_in(b_precision, b.b, K, N, b.stride_k, b.stride_n))));
    batch.emplace_back(args, &packed.back());
  }
  if (!unpacked.empty()) {
    if (!cpu_->gemm_unpacked(unpacked.data(), unpacked.size(), K, N))
      throw OrtError(ORT_EP_FAIL, "the CPU backend '" + cpu_->name() + "' cannot run an unpacked B");
    static const std::string why_unpacked =  // built once: this runs for every decoder self-attention product
        "run-time B with at most " + std::to_string(kernels::kUnpackedMaxM) +
        " rows against it read unpacked, on purpose (packing or a device dispatch would cost more)";
    on_cpu(CpuReason::kUnpacked, unpacked.size(), unpacked_flop, why_unpacked);
  }
  run_batch(batch);
}

void Dispatcher::attention(const kernels::AttentionShape& shape, const std::vector<kernels::AttentionHead>& heads) {
  if (heads.empty() || shape.M == 0 || shape.Dv == 0) return;
  // A counts a head whose Q, K^T and V all lie in EP memory; C its output.
  for (const auto& h : heads) {
    ++products_;
    const auto in_ep = [](const void* p, int64_t last_offset, size_t element) {
      return kernels::ep_buffer_find(p, static_cast<size_t>(last_offset + 1) * element, nullptr);
    };
    const int64_t kt_last = (shape.D - 1) * h.kt_stride_d + (shape.T - 1) * h.kt_stride_t;
    const int64_t v_last = (shape.T - 1) * h.v_stride_t + (shape.Dv - 1) * h.v_stride_n;
    if (in_ep(h.q, (shape.M - 1) * h.ldq + shape.D - 1, sizeof(float)) &&
        (h.kt_bf16 ? in_ep(h.kt_bf16, kt_last, sizeof(uint16_t)) : in_ep(h.kt, kt_last, sizeof(float))) &&
        (h.v_bf16 ? in_ep(h.v_bf16, v_last, sizeof(uint16_t)) : in_ep(h.v, v_last, sizeof(float))))
      ++a_in_ep_;
    if (in_ep(h.o, (shape.M - 1) * h.ldo + shape.Dv - 1, sizeof(float))) ++c_in_ep_;
  }
  // bf16 K^T / V (a Cast fused into the attention) as fp32 copies for a backend that reads only fp32.
  std::vector<std::vector<float>> widened_storage;
  std::vector<kernels::AttentionHead> widened;
  const bool bf16_kv = kernels::has_bf16_kv(heads.data(), heads.size());
  const auto heads_for = [&](const kernels::Backend& b) -> const kernels::AttentionHead* {
    if (!bf16_kv || b.reads_bf16_kv()) return heads.data();
    if (widened.empty()) widened = kernels::widen_bf16_kv(shape, heads.data(), heads.size(), &widened_storage);
    return widened.data();
  };
  const uint64_t flop = heads.size() * (flop_of(shape.M, shape.D, shape.T) + flop_of(shape.M, shape.T, shape.Dv));
  CpuReason reason = CpuReason::kFault;
  std::string why;
  if (primary_ok_) {
    if (primary_->can_run_attention_on(shape, heads_for(*primary_), heads.size(), &why)) {
      try {
        primary_->attention(shape, heads_for(*primary_), heads.size());
        device_calls_ += heads.size();
        device_flop_ += flop;
        return;
      } catch (const kernels::BackendFault& f) {
        fault(f);  // every O is unspecified now: all heads again on the CPU
      }
    } else {
      reason = CpuReason::kNotForDevice;
    }
  }
  if (!cpu_->can_run_attention(shape, nullptr))
    throw OrtError(ORT_EP_FAIL, "the CPU backend '" + cpu_->name() + "' has no fused attention");
  cpu_->attention(shape, heads_for(*cpu_), heads.size());
  on_cpu(reason, heads.size(), flop,
         primary_->name() + " does not take the fused attention M=" + std::to_string(shape.M) + " T=" +
             std::to_string(shape.T) + " D=" + std::to_string(shape.D) + " (" + why + ")");
}

void Dispatcher::note_attention(int64_t heads, int64_t Tq, int64_t Tk, int64_t d) {
  if (!report_) return;
  std::string w = "[" + std::to_string(heads) + ", " + std::to_string(Tq) + ", " + std::to_string(Tk) + ", " +
                  std::to_string(d) + "]";
  std::lock_guard<std::mutex> lock(work_mu_);
  attention_work_ = std::move(w);
}

void Dispatcher::note_work(int64_t batches, int64_t M, int64_t K, int64_t N, bool runtime_b, bool a_gather,
                           bool conv) {
  if (!report_) return;
  std::string w = "[" + std::to_string(batches) + ", " + std::to_string(M) + ", " + std::to_string(K) + ", " +
                  std::to_string(N) + ", " + (runtime_b ? "1" : "0") + ", " + (a_gather ? "1" : "0") + ", " +
                  (conv ? "1" : "0") + "]";
  std::lock_guard<std::mutex> lock(work_mu_);
  work_ = std::move(w);
}

}  // namespace xdna::ep
