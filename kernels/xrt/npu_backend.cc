#include "npu_backend.h"

#include "dataflow_model.h"
#include "../ep_buffers.h"
#include "int8_layout.h"
#include "../emulator/emulator.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <map>
#include <mutex>
#include <sstream>
#include <tuple>

namespace xdna::kernels::npu {
namespace {

// Written into C before a run: a signalling-NaN payload no bf16 x bf16 -> fp32 kernel can produce (NaNs that
// come from bf16 operands have zero low 16 bits, fresh ones are 0x7fc00000). If it survives the run, the
// kernel did not write its output although the command "completed".
constexpr uint32_t kCanary = 0x7fa5a5a5u;

// Runs `fn`; any exception that is not already a BackendFault becomes one for `step`.
template <typename Fn>
auto at_step(const char* step, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const BackendFault&) {
    throw;
  } catch (const std::exception& e) {
    throw BackendFault(step, e.what());
  } catch (...) {
    throw BackendFault(step, "unknown error");
  }
}

// rows x cols elements of elem_bytes each, as a byte count; throws instead of wrapping (sizes come from a manifest
// or a model).
size_t bytes_of(int64_t rows, int64_t cols, size_t elem_bytes) {
  int64_t elements = 0, bytes = 0;
  if (rows < 0 || cols < 0 || __builtin_mul_overflow(rows, cols, &elements) ||
      __builtin_mul_overflow(elements, static_cast<int64_t>(elem_bytes), &bytes))
    throw std::runtime_error("buffer size overflows: " + std::to_string(rows) + " x " + std::to_string(cols));
  return static_cast<size_t>(bytes);
}

std::vector<uint32_t> read_insts(const std::string& path) {
  std::string data, why;
  if (!read_regular_file(path, kMaxInstsBytes, &data, &why)) throw std::runtime_error(why);
  const size_t bytes = data.size();
  if (bytes == 0 || bytes % 4) throw std::runtime_error(path + ": size " + std::to_string(bytes) +
                                                        " is not a non-zero multiple of 4 (uint32 words)");
  std::vector<uint32_t> words(bytes / 4);
  std::memcpy(words.data(), data.data(), bytes);
  return words;
}

struct Staging {  // A and C buffers of one run
  std::unique_ptr<DeviceBuffer> a, c;
};

// One kernel height (m_rows) of a K x N shape: its instruction stream and a pool of run buffers.
struct Variant {
  KernelEntry entry;
  std::unique_ptr<DeviceBuffer> instr;
  uint32_t n_words = 0;
  std::mutex pool_mu;
  std::vector<std::unique_ptr<Staging>> pool;
};

struct Shape {
  int64_t K = 0, N = 0;
  std::string xclbin, kernel_name;
  std::vector<std::unique_ptr<Variant>> variants;  // by m_rows, descending
  LoadedKernel* kernel = nullptr;                  // set once loaded (owned by NpuBackend::contexts_)
};

using ShapeMap = std::map<std::pair<int64_t, int64_t>, std::unique_ptr<Shape>>;

class NpuWeight final : public DeviceWeight {
 public:
  NpuWeight(std::shared_ptr<const PackedB> host, Shape* shape, std::unique_ptr<DeviceBuffer> b)
      : DeviceWeight(std::move(host)), shape(shape), b(std::move(b)) {}
  Shape* shape;
  std::unique_ptr<DeviceBuffer> b;
};

class NpuBackend final : public Backend {
 public:
  NpuBackend(std::unique_ptr<NpuDevice> device, Manifest manifest, NpuBackendOptions options)
      : device_(std::move(device)), manifest_(std::move(manifest)), options_(options) {
    add_shapes(manifest_.kernels, shapes_);
    add_shapes(manifest_.int8_kernels, int8_shapes_);
    // The EP's allocator tells us before a block of its memory goes back to the system: drop our buffers over it.
    ep_listener_ = ep_buffer_add_listener([this](uint64_t block) { drop_ep_block(block); });
  }

  // int8 kernels (i8_f32) are shapes of their own: their xclbin (and hardware context) is not the bf16 one's.
  void add_shapes(const std::vector<KernelEntry>& entries, ShapeMap& shapes) {
    for (const KernelEntry& e : entries) {
      auto& shape = shapes[{e.K, e.N}];
      if (!shape) {
        shape = std::make_unique<Shape>();
        shape->K = e.K, shape->N = e.N, shape->xclbin = e.xclbin, shape->kernel_name = e.kernel_name;
      }
      // All heights of one shape run on one hardware context, so they must come from one xclbin.
      if (e.xclbin != shape->xclbin || e.kernel_name != shape->kernel_name) {
        manifest_.skipped.push_back("K=" + std::to_string(e.K) + " N=" + std::to_string(e.N) + " m_rows=" +
                                    std::to_string(e.m_rows) + ": other xclbin than the shape's first kernel");
        continue;
      }
      auto v = std::make_unique<Variant>();
      v->entry = e;
      shape->variants.push_back(std::move(v));
    }
    for (auto& [key, shape] : shapes)
      std::sort(shape->variants.begin(), shape->variants.end(),
                [](const auto& a, const auto& b) { return a->entry.m_rows > b->entry.m_rows; });
  }

  ~NpuBackend() override {
    ep_buffer_remove_listener(ep_listener_);
    // Buffers of runs that never finished may still be used by the device: do not free them.
    for (auto& s : quarantine_) {
      (void)s->a.release();
      (void)s->c.release();
    }
    for (auto& b : quarantined_imports_) new std::shared_ptr<DeviceBuffer>(b);  // leaked on purpose: never freed
  }

  std::string name() const override { return "xrt"; }

  std::string device_description() const override {
    std::ostringstream os;
    os << device_->description() << "; kernels from " << manifest_.dir << ":";
    for (const auto& [key, shape] : shapes_) {
      os << " " << key.first << "x" << key.second << " (m_rows";
      for (const auto& v : shape->variants) os << " " << v->entry.m_rows;
      os << ")";
    }
    for (const auto& [key, shape] : int8_shapes_) {
      os << " " << key.first << "x" << key.second << " int8 (m_rows";
      for (const auto& v : shape->variants) os << " " << v->entry.m_rows;
      os << ")";
    }
    if (disabled_) os << "; DISABLED: " << disabled_reason();
    return os.str();
  }

  bool can_run(int64_t M, int64_t K, int64_t N, std::string* why_not) const override {
    return can_run_in(Precision::kBf16, M, K, N, why_not);
  }

  bool can_run_in(Precision precision, int64_t M, int64_t K, int64_t N, std::string* why_not) const override {
    if (precision != Precision::kBf16 && precision != Precision::kInt8) return supports(precision, why_not);
    const bool int8 = precision == Precision::kInt8;
    if (options_.cost_model && M > 0) {
      NodeWork work;
      work.M = M, work.K = K, work.N = N, work.int8 = int8;
      const NodeCost cost = model_node_v2(work);  // the dataflow model `xdna partition --npu-model` prints
      if (!cost.npu) {
        if (why_not) {
          std::ostringstream os;
          os << "cost model: CPU faster (modelled NPU " << cost.npu_us << " us incl. dispatch vs CPU " << cost.cpu_us
             << " us)";
          *why_not = os.str();
        }
        return false;
      }
    }
    if (disabled_) {
      if (why_not) *why_not = "xrt backend disabled: " + disabled_reason();
      return false;
    }
    if (int8) {
      if (!has_int8_kernel(K, N, why_not)) return false;
      if (K > kInt8MaxK) {
        if (why_not) *why_not = "K=" + std::to_string(K) + " is past the int8 contract's exact int32 limit";
        return false;
      }
    }
    const ShapeMap& shapes = int8 ? int8_shapes_ : shapes_;
    const PaddedShape p = padded_shape(0, K, N);
    auto it = shapes.find({p.Kpad, p.Npad});
    if (it == shapes.end()) {
      if (why_not) {
        std::ostringstream os;
        os << "no NPU kernel built for K=" << K << " N=" << N << " (padded " << p.Kpad << "x" << p.Npad
           << "); built:";
        for (const auto& [key, shape] : shapes) os << " " << key.first << "x" << key.second;
        *why_not = os.str();
      }
      return false;
    }
    std::lock_guard<std::mutex> lock(load_mu_);
    if (!it->second->kernel && !contexts_.count(it->second->xclbin) &&
        static_cast<int>(contexts_.size()) >= options_.max_contexts) {
      if (why_not) *why_not = context_limit_message();
      return false;
    }
    return true;
  }

  // Whether the manifest lists an i8_f32 kernel for this weight shape (can_run_in(kInt8) adds the cost model and
  // the backend's state).
  bool has_int8_kernel(int64_t K, int64_t N, std::string* why_not) const override {
    const PaddedShape p = padded_shape(0, K, N);
    for (const KernelEntry& e : manifest_.int8_kernels)
      if (e.K == p.Kpad && e.N == p.Npad) return true;
    if (why_not) {
      std::ostringstream os;
      os << "no int8 NPU kernel built for K=" << K << " N=" << N << " (padded " << p.Kpad << "x" << p.Npad
         << "); int8 built:";
      for (const KernelEntry& e : manifest_.int8_kernels) os << " " << e.K << "x" << e.N;
      if (manifest_.int8_kernels.empty()) os << " none";
      *why_not = os.str();
    }
    return false;
  }

  // Fused attention runs on attn_f32 kernels (kernels/aie/attention_design.py): self-attention (M == T) of head dim
  // 64 whose T and scale are those of a built kernel. Anything else is declined with the reason (the dispatcher
  // logs it and runs the node on the CPU path).
  bool can_run_attention(const AttentionShape& shape, std::string* why_not) const override {
    if (disabled_) {
      if (why_not) *why_not = "xrt backend disabled: " + disabled_reason();
      return false;
    }
    if (shape.zero_nan_rows) {  // attn_f32 has neither the mask nor the NaN rule (attention_contract.h)
      if (why_not) *why_not = "the attn_f32 kernels have no NaN rule (Where(IsNaN(P), 0, P)) and no mask";
      return false;
    }
    for (const AttentionEntry& e : manifest_.attention_kernels)
      if (attention_fits(e, shape)) return true;
    if (why_not) {
      std::ostringstream os;
      if (manifest_.attention_kernels.empty()) {
        os << "no fused attention kernel built (M=" << shape.M << " T=" << shape.T << " D=" << shape.D
           << "; build one with kernels/aie/build_kernels.py --dtype attn_f32 --attention TxH)";
      } else {
        os << std::setprecision(9) << "no fused attention kernel for M=" << shape.M << " T=" << shape.T
           << " D=" << shape.D << " Dv=" << shape.Dv << " scale=" << shape.scale
           << "; attn_f32 built (self-attention, D 64):";
        for (const AttentionEntry& e : manifest_.attention_kernels) os << " T=" << e.T << " scale=" << e.scale;
      }
      *why_not = os.str();
    }
    return false;
  }

  bool can_run_attention_on(const AttentionShape& shape, const AttentionHead* heads, size_t count,
                            std::string* why_not) const override {
    if (!can_run_attention(shape, why_not)) return false;
    if (has_mask(heads, count)) {
      if (why_not) *why_not = "the attn_f32 kernels have no additive mask";
      return false;
    }
    if (attention_kernel_for(shape, heads, count)) return true;
    if (why_not) {
      std::ostringstream os;
      os << count << " heads not in the layout of a built attn_f32 kernel (groups of H heads: Q, K, V rows strided"
         << " by ld with head h at column h*64, K read as K^T, O row t of head h at h*o_head + t*ldo); built:";
      for (const AttentionEntry& e : manifest_.attention_kernels)
        os << " T=" << e.T << " H=" << e.H << " ld=" << e.ld << " ldo=" << e.ldo << " o_head=" << e.o_head;
      *why_not = os.str();
    }
    return false;
  }

  // One command per group of H heads (one batch item of the node), each waited for before the next: Q, K, V and O
  // are ORT's memory imported in place (or views of the EP's), else staged.
  void attention(const AttentionShape& shape, const AttentionHead* heads, size_t count) override {
    if (disabled_) throw BackendFault("run", "xrt backend disabled: " + disabled_reason());
    const AttentionEntry* e = attention_kernel_for(shape, heads, count);
    if (!e) throw BackendFault("run", "internal: no attn_f32 kernel for these heads");
    AttentionKernel& k = ensure_attention_loaded(*e);
    for (size_t g = 0; g < count; g += static_cast<size_t>(e->H)) run_attention(k, heads[g]);
  }

  // Declined modes run on the CPU backend in the same precision (dispatcher), never silently in bf16.
  // int8: when the kernel directory holds i8_f32 kernels (which shapes: can_run_in).
  bool supports(Precision precision, std::string* why_not) const override {
    if (precision == Precision::kBf16) return true;
    if (precision == Precision::kInt8 && !int8_shapes_.empty()) return true;
    if (why_not)
      *why_not = precision == Precision::kInt8
                     ? "declined: no int8 (i8_f32) kernels in " + manifest_.dir +
                           " (build them with kernels/aie/build_kernels.py --dtype i8_f32)"
                     : "declined: bf16x3 is not run on the device yet";
    return false;
  }

  std::shared_ptr<DeviceWeight> upload(std::shared_ptr<const PackedB> b) override {
    if (!b) throw BackendFault("upload", "null weight");
    const bool int8 = b->precision == Precision::kInt8;
    if (!supports(b->precision, nullptr) || (int8 && !b->int8))
      throw BackendFault("upload", std::string("weight packed in ") + precision_name(b->precision) +
                                       ", which this backend declines");
    if (disabled_) throw BackendFault("upload", "xrt backend disabled: " + disabled_reason());
    ShapeMap& shapes = int8 ? int8_shapes_ : shapes_;
    auto it = shapes.find({b->shape.Kpad, b->shape.Npad});
    if (it == shapes.end())
      throw BackendFault("load", "no NPU kernel for padded shape " + std::to_string(b->shape.Kpad) + "x" +
                                     std::to_string(b->shape.Npad));
    Shape* shape = it->second.get();
    ensure_loaded(shape);
    if (int8) return upload_int8(std::move(b), shape);
    const size_t bytes = bytes_of(b->shape.Kpad, b->shape.Npad, sizeof(uint16_t));
    if (b->size() * sizeof(uint16_t) != bytes)
      throw BackendFault("upload", "packed B holds " + std::to_string(b->size()) + " values, expected " +
                                       std::to_string(bytes / 2));
    auto buffer = at_step("upload", [&] {
      auto buf = shape->kernel->alloc(BufferKind::b, bytes);
      if (buf->size() < bytes) throw std::runtime_error("device buffer for B is smaller than requested");
      std::memcpy(buf->map(), b->bits(), bytes);
      buf->to_device(bytes, 0);
      return buf;
    });
    return std::make_shared<NpuWeight>(std::move(b), shape, std::move(buffer));
  }

  void gemm(const GemmArgs& args, const DeviceWeight& weight) override {
    const BatchItem item{args, &weight};
    gemm_batch(&item, 1);
  }

  // The products of a batch (the heads of an attention product) go to the device in one submission when their
  // weights share one hardware context; otherwise one submission per product.
  void gemm_batch(const BatchItem* items, size_t count) override {
    std::vector<const NpuWeight*> weights(count);
    for (size_t i = 0; i < count; ++i) {
      weights[i] = dynamic_cast<const NpuWeight*>(items[i].weight);
      if (!weights[i]) throw BackendFault("run", "weight was not uploaded by the xrt backend");
    }
    if (disabled_) throw BackendFault("run", "xrt backend disabled: " + disabled_reason());
    size_t first = 0;
    while (first < count) {
      size_t last = first + 1;  // [first, last): products sharing the first one's context
      while (last < count && weights[last]->shape->kernel == weights[first]->shape->kernel) ++last;
      submit(items + first, weights.data() + first, last - first);
      first = last;
    }
  }

 private:
  struct InFlight {
    const GemmArgs* args;
    const PaddedShape* p;
    Variant* variant;
    std::unique_ptr<Staging> staging;         // staged A/C (null when both are imported)
    // ORT's (or the EP's) memory as device buffers (issue 15); A is shared by the runs of one submission that read
    // the same rows (q/k/v projections of one input in one runlist): imported and synced once.
    std::shared_ptr<DeviceBuffer> a_in, c_in;
    int64_t row0, rows;
  };

  // Every run of every product goes to the device in one submission (a runlist), then one wait.
  void submit(const BatchItem* items, const NpuWeight* const* weights, size_t count) {
    LoadedKernel* kernel = weights[0]->shape->kernel;
    std::vector<InFlight> runs;
    std::unique_ptr<PendingRun> chain;
    try {
      std::vector<RunArgs> list;
      for (size_t i = 0; i < count; ++i) {
        const GemmArgs& args = items[i].args;
        if (args.M <= 0) continue;
        const NpuWeight* w = weights[i];
        Shape& shape = *w->shape;
        const PaddedShape& p = w->host().shape;
        std::vector<int64_t> heights;
        for (const auto& v : shape.variants) heights.push_back(v->entry.m_rows);
        int64_t row0 = 0;
        for (int64_t height : plan_row_chunks(args.M, heights)) {
          Variant* v = variant_for(shape, height);
          InFlight f{&args, &p, v, nullptr, nullptr, nullptr, row0, std::min(height, args.M - row0)};
          at_step("run", [&] { in_place(args, p, v->entry, height, f.row0, f.rows, f.a_in, f.c_in, *kernel, runs); });
          if (!f.a_in) {
            f.staging = at_step("run", [&] { return take_staging(*v, shape, p); });
            at_step("run", [&] {
              if (v->entry.a_f32) stage_a_f32(args, p, f.row0, f.rows, height, *f.staging->a);
              else if (v->entry.int8) stage_a_int8(args, p, f.row0, f.rows, height, *f.staging->a);
              else stage_a(args, p, f.row0, f.rows, height, *f.staging->a);
              plant_canary(*f.staging->c, static_cast<int64_t>(bytes_of(height, p.Npad, 1)));
            });
          }
          runs.push_back(std::move(f));
          InFlight& r = runs.back();
          list.push_back({v->instr.get(), v->n_words, r.a_in ? r.a_in.get() : r.staging->a.get(), w->b.get(),
                          r.c_in ? r.c_in.get() : r.staging->c.get()});
          row0 += height;
        }
      }
      if (list.empty()) return;
      chain = at_step("run", [&] { return kernel->start_chain(list); });
      std::string detail;
      const RunState state = at_step("run", [&] { return chain->wait(options_.timeout, &detail); });
      chain.reset();
      if (state == RunState::timeout) {
        disable("a run timed out after " + std::to_string(options_.timeout.count()) + " ms");
        throw BackendFault("timeout", "run did not complete within " + std::to_string(options_.timeout.count()) +
                                          " ms" + (detail.empty() ? "" : " (" + detail + ")"));
      }
      if (state != RunState::completed) throw BackendFault("run", "command failed: " + detail);
      for (InFlight& r : runs) {
        if (r.c_in) at_step("result", [&] { check_in_place_c(*r.c_in, static_cast<int64_t>(bytes_of(r.rows, r.p->Npad, 1))); });
        else at_step("result", [&] { read_c(*r.staging->c, *r.p, r.row0, r.rows, r.variant->entry.m_rows, *r.args); });
        // The epilogue (gemm_contract.h): the built xclbins have none yet (kernels/aie/gemm_bf16.cc has it, unbuilt
        // here: no Peano), so the host applies it to the run's rows as they come back.
        if (!r.args->epilogue.empty())
          apply_epilogue(r.args->epilogue, r.args->c, r.args->ldc, r.row0, r.row0 + r.rows, 0, r.p->N);
        r.a_in.reset();
        r.c_in.reset();
        if (r.staging) give_back(*r.variant, std::move(r.staging));
      }
    } catch (...) {
      settle(runs, chain);
      throw;
    }
  }

  // In place (issue 15): a kernel that reads fp32 A (converting it in the core) over exactly the rows of this run,
  // on dense rows (lda = K, ldc = N) of whole tiles (K a multiple of 64, N of 256), gets ORT's A and C memory as
  // buffers: a view of an EP block (ep_view) when ORT placed the tensor in the EP's memory, else imported for this
  // call. Anything else, or a device that refuses the import, leaves both null: the run is staged.
  void in_place(const GemmArgs& args, const PaddedShape& p, const KernelEntry& e, int64_t height, int64_t row0,
                int64_t rows, std::shared_ptr<DeviceBuffer>& a_in, std::shared_ptr<DeviceBuffer>& c_in,
                LoadedKernel& kernel, const std::vector<InFlight>& earlier) {
    if (!e.a_f32 || rows != height || p.K != p.Kpad || p.N != p.Npad || args.lda != p.K || args.ldc != p.N) return;
    const size_t a_bytes = bytes_of(rows, p.K, sizeof(float));
    const size_t c_bytes = bytes_of(rows, p.N, sizeof(float));
    void* a = const_cast<float*>(args.a + row0 * args.lda);
    void* c = args.c + row0 * args.ldc;
    for (const InFlight& r : earlier)  // the same A rows in this submission already: share its buffer and sync
      if (r.a_in && r.a_in->map() == a && r.a_in->size() == a_bytes) a_in = r.a_in;
    const bool shared = a_in != nullptr;
    if (!a_in) a_in = ep_view(kernel, BufferKind::a, a, a_bytes);
    if (!a_in) a_in = kernel.import(BufferKind::a, a, a_bytes);
    if (a_in) c_in = ep_view(kernel, BufferKind::c, c, c_bytes);
    if (a_in && !c_in) c_in = kernel.import(BufferKind::c, c, c_bytes);
    if (!a_in || !c_in || a_in->size() < a_bytes || c_in->size() < c_bytes) {
      a_in.reset();
      c_in.reset();
      return;
    }
    if (!shared) a_in->to_device(a_bytes, 0);  // cache maintenance: the NPU reads DDR, not the CPU's caches
    plant_canary(*c_in, static_cast<int64_t>(bytes_of(rows, p.N, 1)));
  }

  // [ptr, ptr + bytes) inside a block of the EP's own memory (kernels/ep_buffers.h): the block is imported once per
  // hardware context and buffer kind, and kept until the allocator gives it back to the system (drop_ep_block);
  // each run gets a sub-buffer of it, so nothing is pinned per call. nullptr: not EP memory, or the device refused.
  std::unique_ptr<DeviceBuffer> ep_view(LoadedKernel& kernel, BufferKind kind, void* ptr, size_t bytes) {
    EpBlock block;
    if (!ep_buffer_find(ptr, bytes, &block)) return nullptr;  // (registry lock, released before ep_mu_)
    std::lock_guard<std::mutex> lock(ep_mu_);
    const auto key = std::make_tuple(block.id, &kernel, kind);
    auto it = ep_blocks_.find(key);
    if (it == ep_blocks_.end()) {
      auto whole = kernel.import(kind, block.base, block.bytes);
      if (!whole || whole->size() < block.bytes) return nullptr;
      it = ep_blocks_.emplace(key, std::move(whole)).first;
    }
    const size_t offset = static_cast<size_t>(static_cast<unsigned char*>(ptr) - static_cast<unsigned char*>(block.base));
    return kernel.sub_buffer(*it->second, offset, bytes);
  }

  // Called by the EP's allocator (under its lock) before the block is unmapped. A run never uses a block ORT has
  // freed; after a timeout (backend disabled) a late write could still land in it, as for any in-place C.
  void drop_ep_block(uint64_t block) {
    std::lock_guard<std::mutex> lock(ep_mu_);
    for (auto it = ep_blocks_.begin(); it != ep_blocks_.end();)
      it = std::get<0>(it->first) == block ? ep_blocks_.erase(it) : std::next(it);
  }

  static void check_in_place_c(DeviceBuffer& c, int64_t elements) {
    if (elements <= 0 || c.size() < bytes_of(elements, 1, sizeof(float)))
      throw std::runtime_error("C buffer is smaller than one run's rows");
    c.from_device(bytes_of(elements, 1, sizeof(float)), 0);
    const auto* words = static_cast<const uint32_t*>(c.map());
    if (words[0] == kCanary || words[elements - 1] == kCanary)
      throw std::runtime_error("the kernel completed but did not write its result");
  }

  struct AttentionKernel {
    const AttentionEntry* entry = nullptr;
    LoadedKernel* kernel = nullptr;
    std::unique_ptr<DeviceBuffer> instr;
    uint32_t n_words = 0;
  };

  static bool attention_fits(const AttentionEntry& e, const AttentionShape& s) {
    return s.M == e.T && s.T == e.T && s.D == 64 && s.Dv == 64 && s.scale == e.scale;
  }

  // The kernel whose fixed strides these heads have, in groups of its H (each group one command), or nullptr.
  const AttentionEntry* attention_kernel_for(const AttentionShape& shape, const AttentionHead* heads,
                                             size_t count) const {
    for (const AttentionEntry& e : manifest_.attention_kernels) {
      if (!attention_fits(e, shape) || count == 0 || count % static_cast<size_t>(e.H)) continue;
      bool ok = true;
      for (size_t i = 0; i < count && ok; ++i) {
        const AttentionHead& b = heads[i - i % static_cast<size_t>(e.H)];  // the group's first head
        const AttentionHead& h = heads[i];
        const int64_t j = static_cast<int64_t>(i % static_cast<size_t>(e.H));
        ok = h.q == b.q + j * 64 && h.ldq == e.ld && h.kt == b.kt + j * 64 && h.kt_stride_d == 1 &&
             h.kt_stride_t == e.ld && h.v == b.v + j * 64 && h.v_stride_t == e.ld && h.v_stride_n == 1 &&
             h.o == b.o + j * e.o_head && h.ldo == e.ldo;
      }
      if (ok) return &e;
    }
    return nullptr;
  }

  AttentionKernel& ensure_attention_loaded(const AttentionEntry& e) {
    std::lock_guard<std::mutex> lock(load_mu_);
    auto& k = attention_kernels_[&e];
    if (k.kernel) return k;
    auto it = contexts_.find(e.xclbin);
    if (it == contexts_.end()) {
      if (static_cast<int>(contexts_.size()) >= options_.max_contexts)
        throw BackendFault("load", context_limit_message());
      auto kernel = at_step("load", [&] { return device_->load(e.xclbin, e.kernel_name); });
      if (!kernel) throw BackendFault("load", "device returned no kernel for " + e.xclbin);
      it = contexts_.emplace(e.xclbin, std::move(kernel)).first;
    }
    at_step("load", [&] {
      const std::vector<uint32_t> words = read_insts(e.insts);
      const size_t bytes = words.size() * sizeof(uint32_t);
      auto instr = it->second->alloc(BufferKind::instructions, bytes);
      if (instr->size() < bytes) throw std::runtime_error("instruction buffer smaller than requested");
      std::memcpy(instr->map(), words.data(), bytes);
      instr->to_device(bytes, 0);
      k.instr = std::move(instr);
      k.n_words = static_cast<uint32_t>(words.size());
    });
    k.entry = &e;
    k.kernel = it->second.get();  // only now: a failed load leaves it unloaded and retryable
    return k;
  }

  // A tensor range of one attention command as a device buffer: the EP's memory (a view), ORT's imported, or a
  // staging copy (`staged` set; an input is copied in).
  std::shared_ptr<DeviceBuffer> attention_operand(LoadedKernel& kernel, BufferKind kind, const float* ptr,
                                                  size_t bytes, bool input, bool* staged) {
    void* p = const_cast<float*>(ptr);
    std::shared_ptr<DeviceBuffer> b = ep_view(kernel, kind, p, bytes);
    if (!b) b = kernel.import(kind, p, bytes);
    *staged = !b || b->size() < bytes;
    if (*staged) {
      b = kernel.alloc(kind, bytes);
      if (b->size() < bytes) throw std::runtime_error("staging buffer smaller than requested");
      if (input) std::memcpy(b->map(), ptr, bytes);
    }
    if (input || !*staged) b->to_device(bytes, 0);  // O in place: flushed, so the rows between heads stay ORT's
    return b;
  }

  void run_attention(AttentionKernel& k, const AttentionHead& first) {
    const AttentionEntry& e = *k.entry;
    const size_t in_bytes = bytes_of((e.T - 1) * e.ld + e.H * 64, 1, sizeof(float));
    const int64_t out_elems = (e.H - 1) * e.o_head + (e.T - 1) * e.ldo + 64;
    const size_t out_bytes = bytes_of(out_elems, 1, sizeof(float));
    std::shared_ptr<DeviceBuffer> q, kb, v, o;
    bool q_staged = false, k_staged = false, v_staged = false, o_staged = false;
    std::unique_ptr<PendingRun> run;
    try {
      at_step("run", [&] {
        q = attention_operand(*k.kernel, BufferKind::a, first.q, in_bytes, true, &q_staged);
        kb = attention_operand(*k.kernel, BufferKind::b, first.kt, in_bytes, true, &k_staged);
        v = attention_operand(*k.kernel, BufferKind::c, first.v, in_bytes, true, &v_staged);
        o = attention_operand(*k.kernel, BufferKind::d, first.o, out_bytes, false, &o_staged);
        plant_canary(*o, out_elems);
      });
      run = at_step("run", [&] { return k.kernel->start4(*k.instr, k.n_words, *q, *kb, *v, *o); });
      std::string detail;
      const RunState state = at_step("run", [&] { return run->wait(options_.timeout, &detail); });
      if (state == RunState::timeout) {
        disable("a run timed out after " + std::to_string(options_.timeout.count()) + " ms");
        throw BackendFault("timeout", "run did not complete within " + std::to_string(options_.timeout.count()) +
                                          " ms" + (detail.empty() ? "" : " (" + detail + ")"));
      }
      run.reset();
      if (state != RunState::completed) throw BackendFault("run", "command failed: " + detail);
      at_step("result", [&] {
        check_in_place_c(*o, out_elems);
        if (o_staged) {  // only the heads' rows: whatever lies between them is not the kernel's
          const auto* src = static_cast<const float*>(o->map());
          for (int64_t h = 0; h < e.H; ++h)
            for (int64_t t = 0; t < e.T; ++t) {
              const int64_t at = h * e.o_head + t * e.ldo;
              std::memcpy(first.o + at, src + at, 64 * sizeof(float));
            }
        }
      });
    } catch (...) {
      bool finished = !run;
      if (run) {
        try {
          std::string detail;
          finished = run->wait(options_.timeout, &detail) != RunState::timeout;
        } catch (...) {
          finished = false;
        }
      }
      if (!finished) {  // the device may still use them: never freed
        std::lock_guard<std::mutex> lock(load_mu_);
        for (auto* b : {&q, &kb, &v, &o})
          if (*b) quarantined_imports_.push_back(std::move(*b));
      }
      throw;
    }
  }

  // A rows [row0, row0 + rows) -> fp32 row-major [height, Kpad] for a kernel that converts A in the core; pads
  // zero (contract: exact zeros), tail rows zero.
  static void stage_a_f32(const GemmArgs& args, const PaddedShape& p, int64_t row0, int64_t rows, int64_t height,
                          DeviceBuffer& a) {
    const size_t bytes = bytes_of(height, p.Kpad, sizeof(float));
    if (a.size() < bytes || rows > height) throw std::runtime_error("A buffer is smaller than one run's rows");
    auto* dst = static_cast<float*>(a.map());
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(dst + r * p.Kpad, args.a + (row0 + r) * args.lda, static_cast<size_t>(p.K) * sizeof(float));
      std::fill(dst + r * p.Kpad + p.K, dst + (r + 1) * p.Kpad, 0.f);
    }
    std::fill(dst + rows * p.Kpad, dst + height * p.Kpad, 0.f);
    a.to_device(bytes, 0);
  }

  std::string context_limit_message() const {
    return "hardware context limit hit: " + std::to_string(contexts_.size()) + " of " +
           std::to_string(options_.max_contexts) +
           " contexts in use by this backend (Phoenix allows 6 per device; set XDNA_XRT_MAX_CONTEXTS)";
  }

  void ensure_loaded(Shape* shape) {
    std::lock_guard<std::mutex> lock(load_mu_);
    if (shape->kernel) return;
    auto it = contexts_.find(shape->xclbin);
    if (it == contexts_.end()) {
      if (static_cast<int>(contexts_.size()) >= options_.max_contexts)
        throw BackendFault("load", context_limit_message());
      auto kernel = at_step("load", [&] { return device_->load(shape->xclbin, shape->kernel_name); });
      if (!kernel) throw BackendFault("load", "device returned no kernel for " + shape->xclbin);
      it = contexts_.emplace(shape->xclbin, std::move(kernel)).first;
    }
    LoadedKernel* kernel = it->second.get();
    for (auto& v : shape->variants) {
      at_step("load", [&] {
        const std::vector<uint32_t> words = read_insts(v->entry.insts);
        const size_t bytes = words.size() * sizeof(uint32_t);
        auto instr = kernel->alloc(BufferKind::instructions, bytes);
        if (instr->size() < bytes) throw std::runtime_error("instruction buffer smaller than requested");
        std::memcpy(instr->map(), words.data(), bytes);
        instr->to_device(bytes, 0);
        v->instr = std::move(instr);
        v->n_words = static_cast<uint32_t>(words.size());
      });
    }
    shape->kernel = kernel;  // only now: a failed load leaves the shape unloaded and retryable
  }

  static Variant* variant_for(Shape& shape, int64_t height) {
    for (auto& v : shape.variants)
      if (v->entry.m_rows == height) return v.get();
    throw BackendFault("run", "internal: no kernel of height " + std::to_string(height));
  }

  std::unique_ptr<Staging> take_staging(Variant& v, Shape& shape, const PaddedShape& p) {
    {
      std::lock_guard<std::mutex> lock(v.pool_mu);
      if (!v.pool.empty()) {
        auto s = std::move(v.pool.back());
        v.pool.pop_back();
        return s;
      }
    }
    auto s = std::make_unique<Staging>();
    const size_t a_elem = v.entry.a_f32 ? sizeof(float) : sizeof(uint16_t);
    s->a = shape.kernel->alloc(BufferKind::a, v.entry.int8 ? i8_a_bytes(v.entry.m_rows, p.Kpad)
                                                           : bytes_of(v.entry.m_rows, p.Kpad, a_elem));
    s->c = shape.kernel->alloc(BufferKind::c, bytes_of(v.entry.m_rows, p.Npad, sizeof(float)));
    return s;
  }

  static void give_back(Variant& v, std::unique_ptr<Staging> s) {
    std::lock_guard<std::mutex> lock(v.pool_mu);
    v.pool.push_back(std::move(s));
  }

  // A rows [row0, row0 + rows) -> bf16 row-major [height, Kpad], zero pads (contract: exact zeros).
  static void stage_a(const GemmArgs& args, const PaddedShape& p, int64_t row0, int64_t rows, int64_t height,
                      DeviceBuffer& a) {
    const size_t bytes = bytes_of(height, p.Kpad, sizeof(uint16_t));
    if (a.size() < bytes || rows > height) throw std::runtime_error("A buffer is smaller than one run's rows");
    auto* dst = static_cast<uint16_t*>(a.map());
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = args.a + (row0 + r) * args.lda;
      uint16_t* out = dst + r * p.Kpad;
      for (int64_t k = 0; k < p.K; ++k) out[k] = f32_to_bf16(src[k]);
      std::fill(out + p.K, out + p.Kpad, uint16_t{0});
    }
    std::fill(dst + rows * p.Kpad, dst + height * p.Kpad, uint16_t{0});
    a.to_device(bytes, 0);
  }

  static size_t i8_a_bytes(int64_t rows, int64_t Kpad) {
    (void)bytes_of(rows, Kpad, 2);  // throws on overflow (the objects add 1/16 to the int8 bytes)
    return i8::a_bytes(rows, Kpad);
  }

  // A rows [row0, row0 + rows) -> the i8_f32 layout (int8_layout.h) for `height` rows: each row quantised with the
  // emulator's own code (quantize_row_int8), so the device's exact int32 sums are the emulator's; pad rows and
  // columns zero with scale 0 (their C is never read).
  static void stage_a_int8(const GemmArgs& args, const PaddedShape& p, int64_t row0, int64_t rows, int64_t height,
                           DeviceBuffer& a) {
    const size_t bytes = i8_a_bytes(height, p.Kpad);
    if (a.size() < bytes || rows > height) throw std::runtime_error("A buffer is smaller than one run's rows");
    auto* dst = static_cast<unsigned char*>(a.map());
    std::memset(dst, 0, bytes);
    std::vector<int8_t> q(static_cast<size_t>(p.K));
    for (int64_t r = 0; r < rows; ++r) {
      const float scale = quantize_row_int8(args.a + (row0 + r) * args.lda, p.K, q.data());
      for (int64_t k = 0; k < p.K; ++k) dst[i8::a_obj(r, k, p.Kpad) + i8::a_in_tile(r, k)] = static_cast<unsigned char>(q[k]);
      for (int64_t kt = 0; kt < p.Kpad; kt += i8::kTile)
        std::memcpy(dst + i8::a_obj(r, kt, p.Kpad) + i8::scale_in_obj(r), &scale, sizeof scale);
    }
    a.to_device(bytes, 0);
  }

  // An int8 weight (QuantizedB: 16-column panels) -> the i8_f32 layout, once; pad columns zero with scale 0.
  std::shared_ptr<DeviceWeight> upload_int8(std::shared_ptr<const PackedB> b, Shape* shape) {
    const QuantizedB& qb = *b->int8;
    const PaddedShape& p = b->shape;
    if (qb.K != p.K || qb.N != p.N || static_cast<int64_t>(qb.scale.size()) < qb.N)
      throw BackendFault("upload", "int8 weight does not match its padded shape");
    const size_t bytes = i8::b_bytes(p.Kpad, p.Npad);
    (void)bytes_of(p.Kpad, p.Npad, 2);
    auto buffer = at_step("upload", [&] {
      auto buf = shape->kernel->alloc(BufferKind::b, bytes);
      if (buf->size() < bytes) throw std::runtime_error("device buffer for B is smaller than requested");
      auto* dst = static_cast<unsigned char*>(buf->map());
      std::memset(dst, 0, bytes);
      for (int64_t n = 0; n < p.N; ++n) {
        const int8_t* panel = qb.q.data() + (n / 16) * qb.Kpad * 16 + (n % 16) * 4;
        for (int64_t k = 0; k < p.K; ++k)
          dst[i8::b_obj(k, n, p.Kpad) + i8::b_in_tile(k, n)] = static_cast<unsigned char>(panel[(k / 4) * 64 + k % 4]);
        for (int64_t kt = 0; kt < p.Kpad; kt += i8::kTile)
          std::memcpy(dst + i8::b_obj(kt, n, p.Kpad) + i8::scale_in_obj(n), &qb.scale[n], sizeof(float));
      }
      buf->to_device(bytes, 0);
      return buf;
    });
    return std::make_shared<NpuWeight>(std::move(b), shape, std::move(buffer));
  }

  static void plant_canary(DeviceBuffer& c, int64_t elements) {
    if (elements <= 0 || c.size() < bytes_of(elements, 1, sizeof(uint32_t)))
      throw std::runtime_error("C buffer is smaller than one run's rows");
    auto* words = static_cast<uint32_t*>(c.map());
    words[0] = kCanary;
    words[elements - 1] = kCanary;
    c.to_device(sizeof(uint32_t), 0);
    c.to_device(sizeof(uint32_t), static_cast<size_t>(elements - 1) * sizeof(uint32_t));
  }

  static void read_c(DeviceBuffer& c, const PaddedShape& p, int64_t row0, int64_t rows, int64_t height,
                     const GemmArgs& args) {
    const size_t bytes = bytes_of(height, p.Npad, sizeof(float));
    if (c.size() < bytes || rows > height)
      throw std::runtime_error("result buffer holds " + std::to_string(c.size()) + " bytes, expected " +
                               std::to_string(bytes));
    c.from_device(bytes, 0);
    const auto* words = static_cast<const uint32_t*>(c.map());
    if (words[0] == kCanary || words[height * p.Npad - 1] == kCanary)
      throw std::runtime_error("the kernel completed but did not write its result");
    const auto* src = static_cast<const float*>(c.map());
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(args.c + (row0 + r) * args.ldc, src + r * p.Npad, static_cast<size_t>(p.N) * sizeof(float));
  }

  // After a fault: wait (briefly) for the submission still in flight. Buffers of runs that do not finish are never
  // reused or freed (imported ones stay pinned: the device may still write them).
  template <typename Runs>
  void settle(Runs& runs, std::unique_ptr<PendingRun>& chain) {
    bool finished = !chain;
    if (chain) {
      try {
        std::string detail;
        finished = chain->wait(options_.timeout, &detail) != RunState::timeout;
      } catch (...) {
        finished = false;
      }
    }
    for (auto& r : runs) {
      if (finished) {
        r.a_in.reset();
        r.c_in.reset();
        if (r.staging) give_back(*r.variant, std::move(r.staging));
      } else {
        std::lock_guard<std::mutex> lock(load_mu_);
        if (r.staging) quarantine_.push_back(std::move(r.staging));
        if (r.a_in) quarantined_imports_.push_back(std::move(r.a_in));
        if (r.c_in) quarantined_imports_.push_back(std::move(r.c_in));
      }
    }
  }

  void disable(const std::string& reason) {
    {
      std::lock_guard<std::mutex> lock(load_mu_);
      if (disabled_) return;
      disabled_reason_ = reason;
    }
    disabled_ = true;
  }
  std::string disabled_reason() const {
    std::lock_guard<std::mutex> lock(load_mu_);
    return disabled_reason_;
  }

  std::unique_ptr<NpuDevice> device_;
  Manifest manifest_;
  NpuBackendOptions options_;
  ShapeMap shapes_;       // bf16_f32 / f32_f32 kernels by (Kpad, Npad)
  ShapeMap int8_shapes_;  // i8_f32 kernels by (Kpad, Npad)
  mutable std::mutex load_mu_;
  std::map<std::string, std::unique_ptr<LoadedKernel>> contexts_;  // by xclbin path: one hardware context each
  std::map<const AttentionEntry*, AttentionKernel> attention_kernels_;  // attn_f32 kernels loaded (load_mu_)
  std::vector<std::unique_ptr<Staging>> quarantine_;
  std::vector<std::shared_ptr<DeviceBuffer>> quarantined_imports_;
  std::atomic<bool> disabled_{false};
  std::string disabled_reason_;
  // Imported blocks of the EP's memory by (block id, hardware context, kind); after contexts_: destroyed first.
  std::mutex ep_mu_;
  std::map<std::tuple<uint64_t, LoadedKernel*, BufferKind>, std::unique_ptr<DeviceBuffer>> ep_blocks_;
  int ep_listener_ = 0;
};

int env_int(const BackendConfig& cfg, const char* name, int dflt) {
  const std::string s = cfg.env_value(name);
  const char* v = s.c_str();
  if (!*v) return dflt;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  return end && *end == '\0' && x > 0 && x <= INT_MAX ? static_cast<int>(x) : dflt;
}

}  // namespace

NpuBackendOptions NpuBackendOptions::from_config(const BackendConfig& cfg) {
  NpuBackendOptions o;
  o.max_contexts = env_int(cfg, "XDNA_XRT_MAX_CONTEXTS", o.max_contexts);
  o.timeout = std::chrono::milliseconds(env_int(cfg, "XDNA_XRT_TIMEOUT_MS", static_cast<int>(o.timeout.count())));
  o.cost_model = cfg.env_value("XDNA_XRT_COST_MODEL") != "0";
  return o;
}

std::vector<int64_t> plan_row_chunks(int64_t M, std::vector<int64_t> heights) {
  std::sort(heights.begin(), heights.end(), std::greater<>());
  heights.erase(std::unique(heights.begin(), heights.end()), heights.end());
  std::vector<int64_t> plan;
  if (heights.empty() || M <= 0) return plan;
  // Heights need not be multiples of kBlockM (f32_f32 kernels of an exact height, e.g. 1500): a height fits
  // when it is at most the remaining rows rounded up to a block.
  int64_t remaining = M;
  while (remaining > 0) {
    const int64_t room = round_up(remaining, kBlockM);
    auto fit = std::find_if(heights.begin(), heights.end(), [&](int64_t h) { return h <= room; });
    const int64_t h = fit != heights.end() ? *fit : heights.back();  // none fits: pad up to the smallest
    plan.push_back(h);
    remaining -= h;
  }
  return plan;
}

std::unique_ptr<Backend> make_npu_backend(std::unique_ptr<NpuDevice> device, Manifest manifest,
                                          NpuBackendOptions options) {
  return std::make_unique<NpuBackend>(std::move(device), std::move(manifest), options);
}

}  // namespace xdna::kernels::npu
