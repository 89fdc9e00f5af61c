#include "ep_context.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "kernels/emulator/emulator.h"
#include "ort_api.h"

namespace xdna::ep {
namespace {

constexpr char kMagic[8] = {'X', 'D', 'N', 'A', 'E', 'P', 'C', '\0'};
// magic, version, total size, data offset, metadata checksum, data checksum
constexpr size_t kHeaderSize = 8 + 4 + 8 + 8 + 8 + 8;
constexpr size_t kMaxRank = 64;  // far beyond ONNX's use; bounds the reads of a corrupt payload

// A 64-bit hash over 8-byte words (fast enough to check hundreds of MB of weights at load; detects corruption,
// not tampering).
uint64_t checksum(const uint8_t* p, size_t n) {
  uint64_t h = 0x9e3779b97f4a7c15ull ^ n;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ (w * 0xff51afd7ed558ccdull)) * 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 29;
  }
  for (; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h ^ (h >> 32);
}

size_t align_up(size_t v) { return (v + kDataAlignment - 1) / kDataAlignment * kDataAlignment; }

class Writer {
 public:
  template <class T>
  void pod(T v) {
    out_.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  void str(const std::string& s) {
    pod<uint64_t>(s.size());
    out_ += s;
  }
  void i64s(const std::vector<int64_t>& v) {
    pod<uint64_t>(v.size());
    for (int64_t x : v) pod(x);
  }
  void f32s(const std::vector<float>& v) {
    pod<uint64_t>(v.size());
    out_.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
  }
  std::string& bytes() { return out_; }

 private:
  std::string out_;
};

class Reader {
 public:
  Reader(const uint8_t* p, size_t n, const std::string& where) : p_(p), n_(n), where_(where) {}
  [[noreturn]] void fail(const std::string& what) const {
    throw OrtError(ORT_INVALID_GRAPH, where_ + ": corrupt EPContext payload (" + what + " at byte " +
                                          std::to_string(pos_) + " of " + std::to_string(n_) + ")");
  }
  void need(size_t bytes, const char* what) {
    if (bytes > n_ - pos_) fail(std::string("truncated ") + what);
  }
  template <class T>
  T pod(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, p_ + pos_, sizeof v);
    pos_ += sizeof v;
    return v;
  }
  bool flag(const char* what) {
    const uint8_t v = pod<uint8_t>(what);
    if (v > 1) fail(std::string("bad flag ") + what);
    return v == 1;
  }
  uint64_t count(size_t element_size, const char* what) {
    const uint64_t n = pod<uint64_t>(what);
    if (n > (n_ - pos_) / element_size) fail(std::string("length of ") + what + " beyond the payload");
    return n;
  }
  std::string str(const char* what) {
    const uint64_t n = count(1, what);
    std::string s(reinterpret_cast<const char*>(p_ + pos_), n);
    pos_ += n;
    return s;
  }
  std::vector<int64_t> i64s(const char* what) {
    const uint64_t n = count(sizeof(int64_t), what);
    if (n > kMaxRank) fail(std::string("rank of ") + what);
    std::vector<int64_t> v(n);
    for (auto& x : v) x = pod<int64_t>(what);
    return v;
  }
  std::vector<float> f32s(const char* what) {
    const uint64_t n = count(sizeof(float), what);
    std::vector<float> v(n);
    if (n) std::memcpy(v.data(), p_ + pos_, n * sizeof(float));
    pos_ += n * sizeof(float);
    return v;
  }
  size_t pos() const { return pos_; }

 private:
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
  std::string where_;
};

// Every OpPlan field, in order. A field added to OpPlan (ops/op.h) changes its size and stops the build here: add it
// to write_plan, read_plan and plan_roundtrip_problem, and bump kContextFormatVersion.
// (Sizes on x86-64 with libstdc++, the only target the EP builds for.)
static_assert(sizeof(ops::Operand) == 112, "ops::Operand changed: update the EPContext payload");
static_assert(sizeof(ops::ConvParams) == 56, "ops::ConvParams changed: update the EPContext payload");
static_assert(sizeof(ops::OpPlan) == 1336, "ops::OpPlan changed: serialise the new field and bump kContextFormatVersion");

void write_operand(Writer& w, const ops::Operand& o) {
  w.str(o.name);
  w.pod<uint8_t>(o.present);
  w.pod<uint8_t>(o.constant);
  w.pod<int32_t>(o.rank);
  w.i64s(o.dims);
  w.i64s(o.perm);
  w.i64s(o.split);
}

ops::Operand read_operand(Reader& r) {
  ops::Operand o;
  o.name = r.str("operand name");
  o.present = r.flag("operand present");
  o.constant = r.flag("operand constant");
  o.rank = r.pod<int32_t>("operand rank");
  o.dims = r.i64s("operand dims");
  o.perm = r.i64s("operand perm");
  o.split = r.i64s("operand split");
  if (o.rank < -1 || o.rank > static_cast<int>(kMaxRank) || (o.rank >= 0 && o.dims.size() != size_t(o.rank)))
    r.fail("operand rank and dims disagree");
  for (int64_t p : o.perm)
    if (p < 0 || static_cast<size_t>(p) >= o.perm.size()) r.fail("operand permutation out of range");
  if (o.split.size() == 1) r.fail("operand split into one dim");
  for (int64_t d : o.split)
    if (d <= 0) r.fail("operand split dim not positive");
  return o;
}

kernels::Precision read_precision(Reader& r, const char* what) {
  const int32_t v = r.pod<int32_t>(what);
  if (v < 0 || v > static_cast<int32_t>(kernels::Precision::kBf16x3)) r.fail(std::string("unknown ") + what);
  return static_cast<kernels::Precision>(v);
}

void write_plan(Writer& w, const ops::OpPlan& p) {
  w.pod<int32_t>(static_cast<int32_t>(p.op));
  w.str(p.node_name);
  w.str(p.output);
  write_operand(w, p.a);
  write_operand(w, p.b);
  write_operand(w, p.c);
  w.i64s(p.weight_shape);
  w.pod<uint8_t>(p.weight_transposed);
  w.pod<uint8_t>(p.trans_a);
  w.pod<uint8_t>(p.trans_b);
  w.pod<float>(p.alpha);
  w.pod<float>(p.beta);
  w.f32s(p.c_value);
  for (int64_t v : {p.conv.in_channels, p.conv.out_channels, p.conv.kernel, p.conv.stride, p.conv.dilation,
                    p.conv.pad_begin, p.conv.pad_end})
    w.pod<int64_t>(v);
  w.pod<double>(p.mflop);
  w.pod<uint8_t>(p.mflop_lower_bound);
  write_operand(w, p.v);
  w.pod<float>(p.attention_scale);
  w.pod<int32_t>(static_cast<int32_t>(p.precision));
  write_operand(w, p.bias);
  w.f32s(p.bias_value);
  w.pod<uint8_t>(p.epilogue_gelu);
  write_operand(w, p.residual);
  write_operand(w, p.attention_mask);
  w.pod<uint8_t>(p.attention_zero_nan);
  w.pod<uint8_t>(p.attention_merge_heads);
  w.pod<uint8_t>(p.output_bf16);
  write_operand(w, p.cache_past);
  w.pod<int64_t>(p.cache_heads);
  w.pod<int64_t>(p.cache_depth);
  w.str(p.layernorm_output);
  w.pod<float>(p.layernorm_epsilon);
  w.f32s(p.layernorm_scale);
  w.f32s(p.layernorm_bias);
  w.pod<uint8_t>(p.conv_time_major);
  w.f32s(p.residual_value);
  w.pod<int64_t>(p.head_split_heads);
  w.pod<int64_t>(p.head_split_depth);
  w.str(p.head_split_frames_first);
}

ops::OpPlan read_plan(Reader& r) {
  ops::OpPlan p;
  const int32_t op = r.pod<int32_t>("op");
  if (op < 0 || op > static_cast<int32_t>(ops::OpPlan::Op::kAttention)) r.fail("unknown op " + std::to_string(op));
  p.op = static_cast<ops::OpPlan::Op>(op);
  p.node_name = r.str("node name");
  p.output = r.str("output name");
  p.a = read_operand(r);
  p.b = read_operand(r);
  p.c = read_operand(r);
  p.weight_shape = r.i64s("weight shape");
  p.weight_transposed = r.flag("weight_transposed");
  p.trans_a = r.flag("trans_a");
  p.trans_b = r.flag("trans_b");
  p.alpha = r.pod<float>("alpha");
  p.beta = r.pod<float>("beta");
  p.c_value = r.f32s("C values");
  for (int64_t* v : {&p.conv.in_channels, &p.conv.out_channels, &p.conv.kernel, &p.conv.stride, &p.conv.dilation,
                     &p.conv.pad_begin, &p.conv.pad_end})
    *v = r.pod<int64_t>("conv parameter");
  p.mflop = r.pod<double>("mflop");
  p.mflop_lower_bound = r.flag("mflop_lower_bound");
  p.v = read_operand(r);
  p.attention_scale = r.pod<float>("attention_scale");
  p.precision = read_precision(r, "plan precision");
  p.bias = read_operand(r);
  p.bias_value = r.f32s("epilogue bias values");
  p.epilogue_gelu = r.flag("epilogue_gelu");
  p.residual = read_operand(r);
  p.attention_mask = read_operand(r);
  p.attention_zero_nan = r.flag("attention_zero_nan");
  p.attention_merge_heads = r.flag("attention_merge_heads");
  p.output_bf16 = r.flag("output_bf16");
  p.cache_past = read_operand(r);
  p.cache_heads = r.pod<int64_t>("cache_heads");
  p.cache_depth = r.pod<int64_t>("cache_depth");
  if (p.cache_past.present && (p.cache_heads <= 0 || p.cache_depth <= 0)) r.fail("cache append without heads");
  p.layernorm_output = r.str("layernorm_output");
  p.layernorm_epsilon = r.pod<float>("layernorm_epsilon");
  p.layernorm_scale = r.f32s("layernorm scale values");
  p.layernorm_bias = r.f32s("layernorm bias values");
  p.conv_time_major = r.flag("conv_time_major");
  p.residual_value = r.f32s("constant residual values");
  p.head_split_heads = r.pod<int64_t>("head_split_heads");
  p.head_split_depth = r.pod<int64_t>("head_split_depth");
  p.head_split_frames_first = r.str("head_split_frames_first");
  if (p.head_split_heads < 0 || p.head_split_depth < 0 || (p.head_split_heads > 0) != (p.head_split_depth > 0) ||
      (p.head_split_heads > 0 && !p.output_bf16))
    r.fail("head split without heads, depth or bf16 output");
  return p;
}

void write_identity(Writer& w, const ContextIdentity& id) {
  w.str(id.ep_version);
  w.str(id.contract);
  w.str(id.backend);
  w.str(id.precision);
}

// Checks the header; returns a reader positioned at the identity, the data offset and the checksums.
Reader open_payload(const PayloadBytes& b, const std::string& where, size_t* data_offset,
                    std::pair<uint64_t, uint64_t>* checksums) {
  Reader r(b.data, b.size, where);
  if (b.size < sizeof kMagic || std::memcmp(b.data, kMagic, sizeof kMagic) != 0)
    throw OrtError(ORT_INVALID_GRAPH, where + ": not an XDNAExecutionProvider EPContext payload (bad magic)");
  r.need(kHeaderSize, "header");
  for (size_t i = 0; i < sizeof kMagic; ++i) r.pod<char>("magic");
  const uint32_t version = r.pod<uint32_t>("format version");
  if (version != kContextFormatVersion)
    throw OrtError(ORT_INVALID_GRAPH, where + ": EPContext payload format version " + std::to_string(version) +
                                          ", this EP reads version " + std::to_string(kContextFormatVersion) +
                                          "; compile the model again with this EP");
  const uint64_t total = r.pod<uint64_t>("total size");
  const uint64_t data = r.pod<uint64_t>("data offset");
  const uint64_t meta_sum = r.pod<uint64_t>("metadata checksum");
  const uint64_t data_sum = r.pod<uint64_t>("data checksum");
  if (total != b.size)
    r.fail("payload of " + std::to_string(b.size) + " bytes, its header says " + std::to_string(total) +
           " (truncated or padded)");
  if (data < kHeaderSize || data > total || data % kDataAlignment) r.fail("bad data offset");
  *data_offset = data;
  *checksums = {meta_sum, data_sum};
  return r;
}

void verify_checksums(const Reader& r, const PayloadBytes& b, size_t data_offset, std::pair<uint64_t, uint64_t> sums) {
  if (checksum(b.data + kHeaderSize, data_offset - kHeaderSize) != sums.first) r.fail("metadata checksum mismatch");
  if (checksum(b.data + data_offset, b.size - data_offset) != sums.second) r.fail("weight data checksum mismatch");
}

ContextIdentity read_identity(Reader& r) {
  ContextIdentity id;
  id.ep_version = r.str("EP version");
  id.contract = r.str("contract");
  id.backend = r.str("backend");
  id.precision = r.str("precision");
  return id;
}

int64_t product(const std::vector<int64_t>& dims) {
  int64_t n = 1;
  for (int64_t d : dims)
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return -1;
  return n;
}

// The packed weights a plan's weight_shape gives (kernels::pack_weights): must match what the payload holds.
void check_weights(Reader& r, const ops::OpPlan& p, const kernels::PackedWeights& w) {
  if (p.weight_shape.empty()) {
    if (!w.mats.empty()) r.fail("weights for a plan without a constant B");
    if (!p.layernorm_output.empty()) r.fail("LayerNormalization prologue without a constant weight");
    if (p.b.constant) r.fail("constant B without weights");
    if (!p.bias_value.empty()) r.fail("epilogue bias without a constant weight");
    return;
  }
  if (!p.b.constant) r.fail("weights for a run-time B");
  std::vector<int64_t> shape = p.weight_shape;
  if (shape.size() == 1) shape = {shape[0], 1};
  const int64_t rows = shape[shape.size() - 2], cols = shape[shape.size() - 1];
  const int64_t K = p.weight_transposed ? cols : rows, N = p.weight_transposed ? rows : cols;
  const std::vector<int64_t> batch(shape.begin(), shape.end() - 2);
  if (w.batch_shape != batch || product(batch) != static_cast<int64_t>(w.mats.size()))
    r.fail("weight batch shape differs from the plan's weight shape");
  for (const auto& m : w.mats)
    if (m->shape.K != K || m->shape.N != N) r.fail("weight matrix shape differs from the plan's weight shape");
  if (p.op == ops::OpPlan::Op::kConv &&
      (K != p.conv.in_channels * p.conv.kernel || N != p.conv.out_channels))
    r.fail("convolution parameters differ from its weight");
  if (p.c.present && p.c.constant && product(p.c.dims) != static_cast<int64_t>(p.c_value.size()))
    r.fail("constant C values differ from its shape");
  if (!p.bias_value.empty() && (p.op != ops::OpPlan::Op::kMatMul || p.weight_shape.size() != 2 ||
                                static_cast<int64_t>(p.bias_value.size()) != N))
    r.fail("epilogue bias differs from the plan's weight");
  if (!p.residual_value.empty() &&
      (p.op != ops::OpPlan::Op::kConv || !p.conv_time_major || !p.residual.constant ||
       product(p.residual.dims) != static_cast<int64_t>(p.residual_value.size()) || p.residual.dims.empty() ||
       p.residual.dims.back() != N))
    r.fail("constant residual differs from the plan's output");
  if (!p.layernorm_output.empty() &&
      (p.op != ops::OpPlan::Op::kMatMul || p.weight_shape.size() != 2 ||
       static_cast<int64_t>(p.layernorm_scale.size()) != K ||
       (!p.layernorm_bias.empty() && p.layernorm_bias.size() != p.layernorm_scale.size()) ||
       !(p.layernorm_epsilon >= 0.f)))
    r.fail("LayerNormalization prologue differs from the plan's weight");
}

}  // namespace

std::string contract_id() {
  using namespace kernels;
  return "bf16-gemm/packed-b tiles " + std::to_string(kTileK) + "x" + std::to_string(kTileN) + ", block N " +
         std::to_string(kBlockN) + "; int8 per-column scales, 16-column panels";
}

std::string write_context(const ContextIdentity& id, const std::vector<CompiledNode>& nodes) {
  Writer meta;
  write_identity(meta, id);
  meta.pod<uint32_t>(static_cast<uint32_t>(nodes.size()));
  // Data offsets are relative to the data section, which starts after the metadata.
  uint64_t data_size = 0;
  struct Blob {
    const void* p;
    size_t bytes;
  };
  std::vector<Blob> blobs;  // in data order
  auto place = [&](const void* p, size_t bytes) {
    data_size = align_up(data_size);
    meta.pod<uint64_t>(data_size);
    meta.pod<uint64_t>(bytes);
    blobs.push_back({p, bytes});
    data_size += bytes;
  };
  for (const auto& n : nodes) {
    write_plan(meta, n.plan);
    meta.i64s(n.weights.batch_shape);
    meta.pod<uint64_t>(n.weights.mats.size());
    for (const auto& m : n.weights.mats) {
      const bool complete = m->precision == n.plan.precision &&
                            (m->precision != kernels::Precision::kInt8 || m->int8) &&
                            (m->precision != kernels::Precision::kBf16x3 || m->bf16x3);
      if (!complete)  // pack_weights packs in the plan's precision: anything else is a bug, never written
        throw OrtError(ORT_EP_FAIL, "EPContext: node '" + n.plan.node_name + "' (" +
                                        kernels::precision_name(n.plan.precision) + ") holds a weight packed as " +
                                        kernels::precision_name(m->precision));
      meta.pod<int32_t>(static_cast<int32_t>(m->precision));
      for (int64_t v : {m->shape.K, m->shape.N, m->shape.Kpad, m->shape.Npad}) meta.pod<int64_t>(v);
      switch (m->precision) {
        case kernels::Precision::kBf16:
          place(m->bits(), m->size() * sizeof(uint16_t));
          break;
        case kernels::Precision::kBf16x3:  // hi, lo: each in the packed bf16 layout
          place(m->bf16x3->hi.bits(), m->bf16x3->hi.size() * sizeof(uint16_t));
          place(m->bf16x3->lo.bits(), m->bf16x3->lo.size() * sizeof(uint16_t));
          break;
        case kernels::Precision::kInt8: {  // q (16-column panels), scales, column sums
          const kernels::QuantizedB& q = *m->int8;
          meta.pod<int64_t>(q.Kpad);
          meta.pod<int64_t>(q.Npad);
          place(q.q.data(), q.q.size());
          place(q.scale.data(), q.scale.size() * sizeof(float));
          place(q.colsum.data(), q.colsum.size() * sizeof(int32_t));
          break;
        }
      }
    }
  }
  const size_t data_offset = align_up(kHeaderSize + meta.bytes().size());
  const size_t total = data_offset + align_up(data_size);
  std::string out(total, '\0');
  auto* p = reinterpret_cast<uint8_t*>(out.data());
  std::memcpy(p + kHeaderSize, meta.bytes().data(), meta.bytes().size());
  size_t at = 0;
  for (const Blob& b : blobs) {
    at = align_up(at);
    if (b.bytes) std::memcpy(p + data_offset + at, b.p, b.bytes);
    at += b.bytes;
  }
  Writer head;
  head.bytes().append(kMagic, sizeof kMagic);
  head.pod<uint32_t>(kContextFormatVersion);
  head.pod<uint64_t>(total);
  head.pod<uint64_t>(data_offset);
  head.pod<uint64_t>(checksum(p + kHeaderSize, data_offset - kHeaderSize));
  head.pod<uint64_t>(checksum(p + data_offset, total - data_offset));
  std::memcpy(p, head.bytes().data(), kHeaderSize);
  return out;
}

ContextIdentity read_identity(const PayloadBytes& bytes, const std::string& where) {
  size_t data_offset = 0;
  std::pair<uint64_t, uint64_t> sums;
  Reader r = open_payload(bytes, where, &data_offset, &sums);
  return read_identity(r);
}

std::vector<CompiledNode> read_context(const PayloadBytes& bytes, const ContextIdentity& expected,
                                       const std::string& where) {
  size_t data_offset = 0;
  std::pair<uint64_t, uint64_t> sums;
  Reader r = open_payload(bytes, where, &data_offset, &sums);
  const ContextIdentity id = read_identity(r);  // bounds-checked reads: compared before the checksums, so that a
                                               // payload of another version is named as such
  std::string differs;
  auto compare = [&](const char* what, const std::string& have, const std::string& want) {
    if (have != want)
      differs += std::string(differs.empty() ? "" : "; ") + what + " '" + have + "' (this session: '" + want + "')";
  };
  compare("EP version", id.ep_version, expected.ep_version);
  compare("contract", id.contract, expected.contract);
  compare("backend", id.backend, expected.backend);
  compare("precision", id.precision, expected.precision);
  if (!differs.empty())
    throw OrtError(ORT_INVALID_GRAPH, where + ": compiled for another configuration: " + differs +
                                          ". Compile the model again (xdna compile) for this one.");
  verify_checksums(r, bytes, data_offset, sums);
  const uint32_t count = r.pod<uint32_t>("node count");
  if (count == 0) r.fail("no nodes");
  std::vector<CompiledNode> nodes;
  const uint64_t data_size = bytes.size - data_offset;
  for (uint32_t i = 0; i < count; ++i) {
    CompiledNode n;
    n.plan = read_plan(r);
    n.weights.batch_shape = r.i64s("weight batch shape");
    const uint64_t mats = r.count(5 * sizeof(int64_t), "weight matrices");
    for (uint64_t j = 0; j < mats; ++j) {
      auto m = std::make_shared<kernels::PackedB>();
      const kernels::Precision precision = read_precision(r, "weight precision");
      const int64_t K = r.pod<int64_t>("K"), N = r.pod<int64_t>("N");
      const int64_t Kpad = r.pod<int64_t>("Kpad"), Npad = r.pod<int64_t>("Npad");
      if (K < 0 || N < 0 || K > (int64_t(1) << 31) || N > (int64_t(1) << 31)) r.fail("weight shape out of range");
      m->shape = kernels::padded_shape(0, K, N);
      if (m->shape.Kpad != Kpad || m->shape.Npad != Npad) r.fail("weight padding differs from the contract's");
      m->precision = precision;
      if (precision != n.plan.precision) r.fail("weight precision differs from its plan's");
      const uint64_t values = static_cast<uint64_t>(Kpad) * static_cast<uint64_t>(Npad);
      // The next blob's offset and size, checked against `expected` bytes and the data section.
      auto blob = [&](uint64_t expected, const char* what) {
        const uint64_t offset = r.pod<uint64_t>(what), size = r.pod<uint64_t>(what);
        if (size != expected) r.fail(std::string(what) + " size differs from its shape");
        if (offset % kDataAlignment || offset > data_size || size > data_size - offset)
          r.fail(std::string(what) + " beyond the payload");
        return bytes.data + data_offset + offset;
      };
      // bf16 layouts are used in place (from the mapping); int8's arrays are copied into its QuantizedB.
      auto in_place = [&](kernels::PackedB* b, const char* what) {
        b->shape = m->shape;
        b->external = reinterpret_cast<const uint16_t*>(blob(values * sizeof(uint16_t), what));
        b->keep_alive = bytes.owner;
      };
      switch (precision) {
        case kernels::Precision::kBf16:
          in_place(m.get(), "weight matrix");
          break;
        case kernels::Precision::kBf16x3: {
          auto split = std::make_shared<kernels::SplitB>();
          in_place(&split->hi, "bf16x3 hi matrix");
          in_place(&split->lo, "bf16x3 lo matrix");
          m->bf16x3 = std::move(split);
          break;
        }
        case kernels::Precision::kInt8: {
          auto q = std::make_shared<kernels::QuantizedB>();
          q->K = K, q->N = N;
          q->Kpad = r.pod<int64_t>("int8 Kpad");
          q->Npad = r.pod<int64_t>("int8 Npad");
          if (q->Kpad != kernels::round_up(std::max<int64_t>(K, 1), kernels::kTileK) ||
              q->Npad != kernels::round_up(std::max<int64_t>(N, 1), 16))
            r.fail("int8 weight padding differs from the emulator's layout");
          const uint64_t q_bytes = static_cast<uint64_t>(q->Kpad) * static_cast<uint64_t>(q->Npad);
          const uint8_t* qp = blob(q_bytes, "int8 matrix");
          const uint8_t* sp = blob(static_cast<uint64_t>(N) * sizeof(float), "int8 scales");
          const uint8_t* cp = blob(static_cast<uint64_t>(N) * sizeof(int32_t), "int8 column sums");
          q->q.assign(reinterpret_cast<const int8_t*>(qp), reinterpret_cast<const int8_t*>(qp) + q_bytes);
          q->scale.resize(N);
          q->colsum.resize(N);
          if (N) {
            std::memcpy(q->scale.data(), sp, N * sizeof(float));
            std::memcpy(q->colsum.data(), cp, N * sizeof(int32_t));
          }
          m->int8 = std::move(q);
          break;
        }
      }
      n.weights.mats.push_back(std::move(m));
    }
    check_weights(r, n.plan, n.weights);
    nodes.push_back(std::move(n));
  }
  if (r.pos() > data_offset) r.fail("metadata overlaps the weight data");
  return nodes;
}

PayloadBytes map_file(const std::string& path, const std::string& where) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    throw OrtError(ORT_NO_SUCHFILE, where + ": EPContext side file '" + path + "' cannot be opened: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw OrtError(ORT_NO_SUCHFILE, where + ": EPContext side file '" + path + "' is not a regular file");
  }
  PayloadBytes b;
  b.size = static_cast<size_t>(st.st_size);
  if (b.size == 0) {
    ::close(fd);
    throw OrtError(ORT_INVALID_GRAPH, where + ": EPContext side file '" + path + "' is empty");
  }
  void* p = ::mmap(nullptr, b.size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);  // the mapping keeps the file
  if (p == MAP_FAILED)
    throw OrtError(ORT_EP_FAIL, where + ": EPContext side file '" + path + "' cannot be mapped: " + std::strerror(errno));
  const size_t size = b.size;
  b.data = static_cast<const uint8_t*>(p);
  b.owner = std::shared_ptr<const void>(p, [size](const void* q) { ::munmap(const_cast<void*>(q), size); });
  return b;
}

PayloadBytes allocate_payload(size_t size) {
  void* p = std::aligned_alloc(kDataAlignment, align_up(size ? size : 1));
  if (!p) throw OrtError(ORT_EP_FAIL, "out of memory for an EPContext payload of " + std::to_string(size) + " bytes");
  PayloadBytes b;
  b.data = static_cast<const uint8_t*>(p);
  b.size = size;
  b.owner = std::shared_ptr<const void>(p, [](const void* q) { std::free(const_cast<void*>(q)); });
  return b;
}

std::string plan_roundtrip_problem() {
  ops::OpPlan p;
  p.op = ops::OpPlan::Op::kAttention;  // the last op, so that a bound check on the op is tested
  p.node_name = "node";
  p.output = "out";
  auto operand = [](const std::string& name, int seed) {
    ops::Operand o;
    o.name = name;
    o.present = true;
    o.constant = seed % 2 == 1;
    o.rank = 3;
    o.dims = {seed, -1, seed + 2};
    o.perm = {2, 0, 1};
    o.split = {seed, 4};
    return o;
  };
  p.a = operand("a", 2);
  p.b = operand("b", 3);
  p.c = operand("c", 5);
  p.weight_shape = {4, 3, 2};
  p.weight_transposed = true;
  p.trans_a = true;
  p.trans_b = true;
  p.alpha = 0.25f;
  p.beta = -3.5f;
  p.c_value = {1.f, -2.f, 3.5f};
  p.conv = {7, 8, 9, 10, 11, 12, 13};
  p.mflop = 123.25;
  p.mflop_lower_bound = true;
  p.v = operand("v", 7);
  p.attention_scale = 0.125f;
  p.precision = kernels::Precision::kBf16x3;
  p.bias = operand("bias", 9);
  p.bias_value = {0.5f, -1.25f};
  p.epilogue_gelu = true;
  p.residual = operand("residual", 11);
  p.attention_mask = operand("mask", 13);
  p.attention_zero_nan = true;
  p.attention_merge_heads = true;
  p.output_bf16 = true;
  p.cache_past = operand("past", 15);
  p.cache_heads = 8;
  p.cache_depth = 64;
  p.layernorm_output = "ln_out";
  p.layernorm_epsilon = 3e-6f;
  p.layernorm_scale = {1.5f, -0.25f};
  p.layernorm_bias = {0.125f, 2.f};
  p.conv_time_major = true;
  p.residual_value = {0.75f, -4.f, 8.5f};
  p.head_split_heads = 8;
  p.head_split_depth = 64;
  p.head_split_frames_first = "frames_first";
  Writer w;
  write_plan(w, p);
  const std::string bytes = w.bytes();
  const std::string where = "round trip";
  Reader r(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), where);
  const ops::OpPlan q = read_plan(r);
  auto same_operand = [](const ops::Operand& x, const ops::Operand& y) {
    return x.name == y.name && x.present == y.present && x.constant == y.constant && x.rank == y.rank &&
           x.dims == y.dims && x.perm == y.perm &&
           x.split == y.split;
  };
  if (r.pos() != bytes.size()) return "bytes left after the plan";
  if (q.op != p.op) return "op";
  if (q.node_name != p.node_name) return "node_name";
  if (q.output != p.output) return "output";
  if (!same_operand(q.a, p.a)) return "a";
  if (!same_operand(q.b, p.b)) return "b";
  if (!same_operand(q.c, p.c)) return "c";
  if (q.weight_shape != p.weight_shape) return "weight_shape";
  if (q.weight_transposed != p.weight_transposed) return "weight_transposed";
  if (q.trans_a != p.trans_a) return "trans_a";
  if (q.trans_b != p.trans_b) return "trans_b";
  if (q.alpha != p.alpha) return "alpha";
  if (q.beta != p.beta) return "beta";
  if (q.c_value != p.c_value) return "c_value";
  const auto& a = q.conv;
  const auto& b = p.conv;
  if (a.in_channels != b.in_channels || a.out_channels != b.out_channels || a.kernel != b.kernel ||
      a.stride != b.stride || a.dilation != b.dilation || a.pad_begin != b.pad_begin || a.pad_end != b.pad_end)
    return "conv";
  if (q.mflop != p.mflop) return "mflop";
  if (q.mflop_lower_bound != p.mflop_lower_bound) return "mflop_lower_bound";
  if (!same_operand(q.v, p.v)) return "v";
  if (q.attention_scale != p.attention_scale) return "attention_scale";
  if (q.precision != p.precision) return "precision";
  if (!same_operand(q.bias, p.bias)) return "bias";
  if (q.bias_value != p.bias_value) return "bias_value";
  if (q.epilogue_gelu != p.epilogue_gelu) return "epilogue_gelu";
  if (!same_operand(q.residual, p.residual)) return "residual";
  if (!same_operand(q.attention_mask, p.attention_mask)) return "attention_mask";
  if (q.attention_zero_nan != p.attention_zero_nan) return "attention_zero_nan";
  if (q.attention_merge_heads != p.attention_merge_heads) return "attention_merge_heads";
  if (q.output_bf16 != p.output_bf16) return "output_bf16";
  if (!same_operand(q.cache_past, p.cache_past)) return "cache_past";
  if (q.cache_heads != p.cache_heads) return "cache_heads";
  if (q.cache_depth != p.cache_depth) return "cache_depth";
  if (q.layernorm_output != p.layernorm_output) return "layernorm_output";
  if (q.layernorm_epsilon != p.layernorm_epsilon) return "layernorm_epsilon";
  if (q.layernorm_scale != p.layernorm_scale) return "layernorm_scale";
  if (q.layernorm_bias != p.layernorm_bias) return "layernorm_bias";
  if (q.conv_time_major != p.conv_time_major) return "conv_time_major";
  if (q.residual_value != p.residual_value) return "residual_value";
  if (q.head_split_heads != p.head_split_heads) return "head_split_heads";
  if (q.head_split_depth != p.head_split_depth) return "head_split_depth";
  if (q.head_split_frames_first != p.head_split_frames_first) return "head_split_frames_first";
  return "";
}

}  // namespace xdna::ep
