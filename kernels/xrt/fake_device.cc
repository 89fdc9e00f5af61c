#include "fake_device.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <fstream>
#include <stdexcept>

#include "../emulator/emulator.h"
#include "int8_layout.h"
#include "manifest.h"

namespace xdna::kernels::npu {
namespace {

constexpr uint32_t kFakeInstsMagic = 0x46414b45u;  // "FAKE"
constexpr uint32_t kModeI8 = 2;  // header[4]: 0 bf16 A, 1 fp32 A (f32_f32), 2 i8_f32
// attn_f32: {magic, T, H, ld, kModeAttention, ldo, o_head, scale bits}
constexpr uint32_t kModeAttention = 3;
constexpr size_t kAttentionHeaderWords = 8;

float round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }

// Host and device copies are separate, as without cache maintenance on the real NPU; an imported buffer's host
// side is the caller's memory itself. A sub-buffer shares its parent's host and device bytes (as a sub-BO does).
class FakeBuffer final : public DeviceBuffer {
 public:
  FakeBuffer(BufferKind kind, size_t bytes, size_t reported)
      : kind(kind), own_(bytes), device_(std::make_shared<std::vector<unsigned char>>(bytes)), host_(own_.data()),
        size_(bytes), reported_(reported) {}
  FakeBuffer(BufferKind kind, void* user, size_t bytes)
      : kind(kind), device_(std::make_shared<std::vector<unsigned char>>(bytes)),
        host_(static_cast<unsigned char*>(user)), size_(bytes), reported_(bytes) {}
  FakeBuffer(const FakeBuffer& parent, size_t offset, size_t bytes)
      : kind(parent.kind), device_(parent.device_), device_offset_(parent.device_offset_ + offset),
        host_(parent.host_ + offset), size_(bytes), reported_(bytes) {}
  void* map() override { return host_; }
  size_t size() const override { return reported_; }
  void to_device(size_t bytes, size_t offset) override {
    check(bytes, offset);
    std::memcpy(dev() + offset, host_ + offset, bytes);
  }
  void from_device(size_t bytes, size_t offset) override {
    check(bytes, offset);
    std::memcpy(host_ + offset, dev() + offset, bytes);
  }
  unsigned char* dev() { return device_->data() + device_offset_; }  // what the "NPU" sees
  size_t dev_size() const { return size_; }

  BufferKind kind;

 private:
  void check(size_t bytes, size_t offset) const {
    if (offset > size_ || bytes > size_ - offset) throw std::runtime_error("sync beyond the end of the buffer");
  }
  std::vector<unsigned char> own_;
  std::shared_ptr<std::vector<unsigned char>> device_;  // shared with sub-buffers
  size_t device_offset_ = 0;
  unsigned char* host_;
  size_t size_, reported_;
};

class FakeRun final : public PendingRun {
 public:
  FakeRun(RunState state, std::string detail) : state_(state), detail_(std::move(detail)) {}
  RunState wait(std::chrono::milliseconds, std::string* detail) override {
    if (detail) *detail = detail_;
    return state_;
  }

 private:
  RunState state_;
  std::string detail_;
};

FakeBuffer& as_fake(DeviceBuffer& b, BufferKind expected, const char* arg) {
  auto* f = dynamic_cast<FakeBuffer*>(&b);
  if (!f || f->kind != expected)
    throw std::runtime_error(std::string("argument ") + arg + " is not a buffer of the right kind/group");
  return *f;
}

class FakeKernel final : public LoadedKernel {
 public:
  explicit FakeKernel(FakeOptions options) : options_(std::move(options)) {}

  std::unique_ptr<DeviceBuffer> alloc(BufferKind kind, size_t bytes) override {
    if (kind == BufferKind::b && options_.fail_at == "upload")
      throw std::runtime_error("fake: bo allocation failed (injected)");
    ++options_.stats->buffers[static_cast<int>(kind)];
    return std::make_unique<FakeBuffer>(kind, bytes, bytes);
  }

  std::unique_ptr<DeviceBuffer> import(BufferKind kind, void* ptr, size_t bytes) override {
    if (options_.fail_at == "import") return nullptr;
    // The shim DMA addresses 32-bit words: a buffer must start on a 4-byte boundary (page rounding is XRT's).
    if (!ptr || reinterpret_cast<uintptr_t>(ptr) % 4 || bytes == 0 || kind == BufferKind::instructions)
      return nullptr;
    ++options_.stats->imports;
    return std::make_unique<FakeBuffer>(kind, ptr, bytes);
  }

  std::unique_ptr<DeviceBuffer> sub_buffer(DeviceBuffer& parent, size_t offset, size_t bytes) override {
    auto* p = dynamic_cast<FakeBuffer*>(&parent);
    if (!p) throw std::runtime_error("fake: sub-buffer of a buffer this device did not make");
    if (offset > p->dev_size() || bytes > p->dev_size() - offset || bytes == 0)
      throw std::runtime_error("fake: sub-buffer outside its parent");
    ++options_.stats->sub_buffers;
    return std::make_unique<FakeBuffer>(*p, offset, bytes);
  }

  std::unique_ptr<PendingRun> start_chain(const std::vector<RunArgs>& runs) override {
    if (options_.fail_at == "run") throw std::runtime_error("fake: runlist submission failed (injected)");
    ++options_.stats->submissions;
    // Like a runlist: the commands run in order; the first that fails decides the chain's state.
    for (const RunArgs& r : runs) {
      auto run = execute(*r.instr, r.n_instr_words, *r.a, *r.b, *r.c);
      std::string detail;
      const RunState state = run->wait(std::chrono::milliseconds(0), &detail);
      if (state != RunState::completed) return run;
    }
    return std::make_unique<FakeRun>(RunState::completed, "");
  }

  std::unique_ptr<PendingRun> start4(DeviceBuffer& instr_buf, uint32_t n_words, DeviceBuffer& q_buf,
                                     DeviceBuffer& k_buf, DeviceBuffer& v_buf, DeviceBuffer& o_buf) override {
    if (options_.fail_at == "run") throw std::runtime_error("fake: kernel start failed (injected)");
    ++options_.stats->submissions;
    FakeBuffer& instr = as_fake(instr_buf, BufferKind::instructions, "1 (instructions)");
    FakeBuffer& q = as_fake(q_buf, BufferKind::a, "3 (Q)");
    FakeBuffer& k = as_fake(k_buf, BufferKind::b, "4 (K)");
    FakeBuffer& v = as_fake(v_buf, BufferKind::c, "5 (V)");
    FakeBuffer& o = as_fake(o_buf, BufferKind::d, "6 (O)");
    ++options_.stats->runs;
    if (auto injected = injected_run_end()) return injected;
    if (n_words < kAttentionHeaderWords || instr.dev_size() < kAttentionHeaderWords * 4)
      throw std::runtime_error("fake: instruction stream too short");
    uint32_t h[kAttentionHeaderWords];
    std::memcpy(h, instr.dev(), sizeof h);
    if (h[0] != kFakeInstsMagic) throw std::runtime_error("fake: instructions were not synced to the device");
    if (h[4] != kModeAttention) throw std::runtime_error("fake: not a fused attention kernel");
    const int64_t T = h[1], H = h[2], ld = h[3], ldo = h[5], o_head = h[6];
    float scale;
    std::memcpy(&scale, &h[7], sizeof scale);
    constexpr int64_t D = 64;
    if (T < 1 || H < 1 || T > kMaxKernelRows || H > 1024 || ld < H * D || ldo < D)
      throw std::runtime_error("fake: attention header out of range");
    const size_t in_bytes = static_cast<size_t>((T - 1) * ld + H * D) * 4;
    const size_t out_bytes = static_cast<size_t>((H - 1) * o_head + (T - 1) * ldo + D) * 4;
    if (q.dev_size() < in_bytes || k.dev_size() < in_bytes || v.dev_size() < in_bytes || o.dev_size() < out_bytes)
      throw std::runtime_error("fake: buffer sizes do not match the attention kernel");
    if (options_.fail_at == "result") return std::make_unique<FakeRun>(RunState::completed, "");
    run_attention(reinterpret_cast<const float*>(q.dev()), reinterpret_cast<const float*>(k.dev()),
                  reinterpret_cast<const float*>(v.dev()), reinterpret_cast<float*>(o.dev()), T, H, ld, ldo, o_head,
                  scale);
    return std::make_unique<FakeRun>(RunState::completed, "");
  }

  std::unique_ptr<PendingRun> start(DeviceBuffer& instr_buf, uint32_t n_words, DeviceBuffer& a_buf,
                                    DeviceBuffer& b_buf, DeviceBuffer& c_buf) override {
    if (options_.fail_at == "run") throw std::runtime_error("fake: kernel start failed (injected)");
    ++options_.stats->submissions;
    return execute(instr_buf, n_words, a_buf, b_buf, c_buf);
  }

 private:
  // The run that ends as the injected fault says (run_state, timeout), or null: both kernel kinds share it.
  std::unique_ptr<PendingRun> injected_run_end() const {
    if (options_.fail_at == "run_state") return std::make_unique<FakeRun>(RunState::failed, "ERT_CMD_STATE_ERROR");
    if (options_.fail_at == "timeout") return std::make_unique<FakeRun>(RunState::timeout, "ERT_CMD_STATE_TIMEOUT");
    return nullptr;
  }

  std::unique_ptr<PendingRun> execute(DeviceBuffer& instr_buf, uint32_t n_words, DeviceBuffer& a_buf,
                                      DeviceBuffer& b_buf, DeviceBuffer& c_buf) {
    FakeBuffer& instr = as_fake(instr_buf, BufferKind::instructions, "1 (instructions)");
    FakeBuffer& a = as_fake(a_buf, BufferKind::a, "3 (A)");
    FakeBuffer& b = as_fake(b_buf, BufferKind::b, "4 (B)");
    FakeBuffer& c = as_fake(c_buf, BufferKind::c, "5 (C)");
    ++options_.stats->runs;
    if (auto injected = injected_run_end()) return injected;

    // The device sees only what was synced: read the instruction header from the device copy.
    if (n_words < 5 || instr.dev_size() < 20) throw std::runtime_error("fake: instruction stream too short");
    uint32_t header[5];
    std::memcpy(header, instr.dev(), sizeof header);
    if (header[0] != kFakeInstsMagic) throw std::runtime_error("fake: instructions were not synced to the device");
    const int64_t m_rows = header[1], Kpad = header[2], Npad = header[3];
    if (m_rows > kMaxKernelRows || Kpad > kMaxKernelK || Npad > kMaxKernelN)
      throw std::runtime_error("fake: instruction header out of range");
    if (header[4] == kModeI8) {
      if (a.dev_size() < i8::a_bytes(m_rows, Kpad) || b.dev_size() != i8::b_bytes(Kpad, Npad) ||
          c.dev_size() < static_cast<size_t>(m_rows * Npad) * 4)
        throw std::runtime_error("fake: buffer sizes do not match the int8 kernel's GEMM");
      if (options_.fail_at == "result") return std::make_unique<FakeRun>(RunState::completed, "");
      run_i8(a.dev(), b.dev(), reinterpret_cast<float*>(c.dev()), m_rows, Kpad, Npad);
      return std::make_unique<FakeRun>(RunState::completed, "");
    }
    const bool a_f32 = header[4] != 0;
    const size_t a_elem = a_f32 ? 4 : 2;
    if (a.dev_size() < static_cast<size_t>(m_rows * Kpad) * a_elem ||
        b.dev_size() != static_cast<size_t>(Kpad * Npad) * 2 ||
        c.dev_size() < static_cast<size_t>(m_rows * Npad) * 4)
      throw std::runtime_error("fake: buffer sizes do not match the kernel's GEMM");
    if (options_.fail_at == "result") return std::make_unique<FakeRun>(RunState::completed, "");

    // Execute with the emulator. bf16 A: widening is exact. fp32 A: the core converts with round to nearest even
    // (gemm_bf16.cc sets the rounding mode), which is f32_to_bf16, the contract's host conversion.
    std::vector<float> a32(static_cast<size_t>(m_rows * Kpad));
    if (a_f32) {
      const auto* src = reinterpret_cast<const float*>(a.dev());
      for (size_t i = 0; i < a32.size(); ++i) a32[i] = bf16_to_f32(f32_to_bf16(src[i]));
    } else {
      const auto* a16 = reinterpret_cast<const uint16_t*>(a.dev());
      for (size_t i = 0; i < a32.size(); ++i) a32[i] = bf16_to_f32(a16[i]);
    }
    PackedB packed;
    packed.shape = padded_shape(0, Kpad, Npad);
    packed.data.resize(static_cast<size_t>(Kpad * Npad));
    std::memcpy(packed.data.data(), b.dev(), packed.data.size() * 2);
    GemmArgs args{a32.data(), m_rows, Kpad, reinterpret_cast<float*>(c.dev()), Npad};
    emulator_gemm(args, packed, 1);
    return std::make_unique<FakeRun>(RunState::completed, "");
  }

  // The fused attention contract (attention_contract.h) as attention_bf16.cc computes it, with its own loops:
  // Q, K, V rounded to bf16, fp32 sums, online softmax over 32-key tiles (running max, rescale by exp(m_old - m)),
  // P = bf16(exp), one division at the end; a row with NaN or +Inf scores is NaN. Written independently of the
  // emulator's kernels; the tests hold both within the contract's bound.
  static void run_attention(const float* q, const float* k, const float* v, float* o, int64_t T, int64_t H,
                            int64_t ld, int64_t ldo, int64_t o_head, float scale) {
    constexpr int64_t D = 64, kKeys = 32;
    std::vector<float> qr(D), acc(D), s(kKeys);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t m = 0; m < T; ++m) {
        for (int64_t d = 0; d < D; ++d) qr[d] = round_bf16(q[m * ld + h * D + d]);
        std::fill(acc.begin(), acc.end(), 0.f);
        float mx = -std::numeric_limits<float>::infinity(), l = 0.f;
        bool bad = false;
        for (int64_t t0 = 0; t0 < T; t0 += kKeys) {
          const int64_t n = std::min(kKeys, T - t0);
          float tile_max = mx;
          for (int64_t j = 0; j < n; ++j) {
            float sum = 0.f;
            for (int64_t d = 0; d < D; ++d) sum += qr[d] * round_bf16(k[(t0 + j) * ld + h * D + d]);
            s[j] = sum * scale;
            bad = bad || std::isnan(s[j]) || s[j] == std::numeric_limits<float>::infinity();
            tile_max = std::max(tile_max, s[j]);
          }
          const float c = tile_max == mx ? 1.f : std::exp(mx - tile_max);
          l *= c;
          for (int64_t d = 0; d < D; ++d) acc[d] *= c;
          for (int64_t j = 0; j < n; ++j) {
            const float p = round_bf16(std::exp(s[j] - tile_max));
            l += p;
            for (int64_t d = 0; d < D; ++d) acc[d] += p * round_bf16(v[(t0 + j) * ld + h * D + d]);
          }
          mx = tile_max;
        }
        const bool finite = !bad && std::isfinite(mx);
        for (int64_t d = 0; d < D; ++d)
          o[h * o_head + m * ldo + d] = finite ? acc[d] / l : std::numeric_limits<float>::quiet_NaN();
      }
  }

  // What gemm_int8.cc computes, read from the device layout: exact int32 sums, then float(acc) * (sa * sb) in fp32.
  // Written independently of the emulator's kernels, so agreeing with them bit for bit is a check of both.
  static void run_i8(const unsigned char* a, const unsigned char* b, float* c, int64_t M, int64_t K, int64_t N) {
    auto scale = [](const unsigned char* obj, int64_t i) {
      float s;
      std::memcpy(&s, obj + i8::scale_in_obj(i), sizeof s);
      return s;
    };
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        int32_t acc = 0;
        for (int64_t k = 0; k < K; ++k)
          acc += int32_t{static_cast<int8_t>(a[i8::a_obj(m, k, K) + i8::a_in_tile(m, k)])} *
                 static_cast<int8_t>(b[i8::b_obj(k, n, K) + i8::b_in_tile(k, n)]);
        const float sa = scale(a + i8::a_obj(m, K - 1, K), m), sb = scale(b + i8::b_obj(K - 1, n, K), n);
        c[m * N + n] = static_cast<float>(acc) * (sa * sb);
      }
  }

  FakeOptions options_;
};

class FakeDevice final : public NpuDevice {
 public:
  explicit FakeDevice(FakeOptions options) : options_(std::move(options)) {}
  std::string description() const override { return "fake NPU (emulator behind the XRT protocol; tests only)"; }
  std::unique_ptr<LoadedKernel> load(const std::string& xclbin_path, const std::string& kernel_name) override {
    if (options_.fail_at == "load") throw std::runtime_error("fake: failed to create hardware context (injected)");
    if (!std::ifstream(xclbin_path)) throw std::runtime_error("fake: cannot read " + xclbin_path);
    if (kernel_name != "MLIR_AIE") throw std::runtime_error("fake: no kernel named " + kernel_name);
    ++options_.stats->contexts;
    return std::make_unique<FakeKernel>(options_);
  }

 private:
  FakeOptions options_;
};

}  // namespace

std::unique_ptr<NpuDevice> make_fake_device(const FakeOptions& options) {
  if (options.fail_at == "open") throw std::runtime_error("Could not open device with index '0' (fake, injected)");
  return std::make_unique<FakeDevice>(options);
}

std::vector<uint32_t> fake_insts(int64_t m_rows, int64_t Kpad, int64_t Npad, bool a_f32) {
  return {kFakeInstsMagic, static_cast<uint32_t>(m_rows), static_cast<uint32_t>(Kpad), static_cast<uint32_t>(Npad),
          a_f32 ? 1u : 0u};
}

std::vector<uint32_t> fake_insts_attention(int64_t T, int64_t H, int64_t ld, int64_t ldo, int64_t o_head, float scale) {
  uint32_t scale_bits;
  std::memcpy(&scale_bits, &scale, sizeof scale_bits);
  return {kFakeInstsMagic, static_cast<uint32_t>(T), static_cast<uint32_t>(H), static_cast<uint32_t>(ld),
          kModeAttention, static_cast<uint32_t>(ldo), static_cast<uint32_t>(o_head), scale_bits};
}

std::vector<uint32_t> fake_insts_i8(int64_t m_rows, int64_t Kpad, int64_t Npad) {
  auto words = fake_insts(m_rows, Kpad, Npad, false);
  words[4] = kModeI8;
  return words;
}

}  // namespace xdna::kernels::npu
