#include "manifest.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>

#include "../gemm_contract.h"

namespace xdna::kernels::npu {
namespace {

// A small JSON reader: enough for the manifest (objects, arrays, strings, numbers, true/false/null).
struct Json {
  enum Type { null, boolean, number, string, array, object } type = null;
  bool b = false;
  double num = 0;
  std::string str;
  std::vector<Json> items;
  std::map<std::string, Json> fields;

  const Json* get(const std::string& key) const {
    auto it = fields.find(key);
    return type == object && it != fields.end() ? &it->second : nullptr;
  }
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : s_(text) {}
  Json parse() {
    Json v = value();
    skip_ws();
    if (pos_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error("invalid JSON at offset " + std::to_string(pos_) + ": " + what);
  }
  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t')) ++pos_;
  }
  bool eat(char c) {
    skip_ws();
    if (pos_ < s_.size() && s_[pos_] == c) { ++pos_; return true; }
    return false;
  }
  void expect(char c) {
    if (!eat(c)) fail(std::string("expected '") + c + "'");
  }
  bool literal(const char* word) {
    const size_t n = std::char_traits<char>::length(word);
    if (s_.compare(pos_, n, word) != 0) return false;
    pos_ += n;
    return true;
  }
  Json value() {
    if (++depth_ > 64) fail("nested too deeply");
    skip_ws();
    if (pos_ >= s_.size()) fail("unexpected end");
    Json v;
    const char c = s_[pos_];
    if (c == '{') {
      ++pos_;
      v.type = Json::object;
      if (!eat('}')) {
        do {
          skip_ws();
          std::string key = string_body();
          expect(':');
          v.fields[key] = value();
        } while (eat(','));
        expect('}');
      }
    } else if (c == '[') {
      ++pos_;
      v.type = Json::array;
      if (!eat(']')) {
        do v.items.push_back(value()); while (eat(','));
        expect(']');
      }
    } else if (c == '"') {
      v.type = Json::string;
      v.str = string_body();
    } else if (literal("true")) {
      v.type = Json::boolean, v.b = true;
    } else if (literal("false")) {
      v.type = Json::boolean;
    } else if (literal("null")) {
    } else {
      const char* begin = s_.c_str() + pos_;
      char* end = nullptr;
      v.num = std::strtod(begin, &end);
      if (end == begin) fail("unexpected character");
      v.type = Json::number;
      pos_ += static_cast<size_t>(end - begin);
    }
    --depth_;
    return v;
  }
  std::string string_body() {
    if (pos_ >= s_.size() || s_[pos_] != '"') fail("expected a string");
    ++pos_;
    std::string out;
    while (pos_ < s_.size() && s_[pos_] != '"') {
      char c = s_[pos_++];
      if (c == '\\') {
        if (pos_ >= s_.size()) break;
        const char e = s_[pos_++];
        switch (e) {
          case 'n': c = '\n'; break;
          case 't': c = '\t'; break;
          case 'r': c = '\r'; break;
          case 'b': c = '\b'; break;
          case 'f': c = '\f'; break;
          case 'u': fail("\\u escapes are not supported in the manifest");
          default: c = e;  // \" \\ \/
        }
      }
      out += c;
    }
    if (pos_ >= s_.size()) fail("unterminated string");
    ++pos_;
    return out;
  }

  const std::string& s_;
  size_t pos_ = 0;
  int depth_ = 0;
};

// Where `name` (from the manifest) points: a regular file inside `dir`, at most max_bytes. Empty + *why if not.
std::string file_in_dir(const std::string& dir, const std::string& name, int64_t max_bytes, std::string* why) {
  if (name.empty() || name[0] == '/') {
    *why = "'" + name + "' is not a path relative to the kernel directory";
    return "";
  }
  for (size_t begin = 0; begin <= name.size();) {
    const size_t end = std::min(name.find('/', begin), name.size());
    if (name.compare(begin, end - begin, "..") == 0 && end - begin == 2) {
      *why = "'" + name + "' leaves the kernel directory";
      return "";
    }
    begin = end + 1;
  }
  const std::string path = dir + "/" + name;
  char real_dir[PATH_MAX], real_file[PATH_MAX];
  if (!::realpath(dir.c_str(), real_dir) || !::realpath(path.c_str(), real_file)) {
    *why = "missing " + path;
    return "";
  }
  if (std::string(real_file).rfind(std::string(real_dir) + "/", 0) != 0) {
    *why = "'" + name + "' resolves to " + real_file + ", outside the kernel directory";
    return "";
  }
  struct stat st {};
  if (::stat(real_file, &st) != 0 || !S_ISREG(st.st_mode)) {
    *why = path + " is not a regular file";
    return "";
  }
  if (st.st_size > max_bytes) {
    *why = path + " is larger than " + std::to_string(max_bytes) + " bytes";
    return "";
  }
  return path;
}

// An integer-valued JSON number in [lo, hi]. Range-checked as a double first: casting 1e30, inf or nan is undefined.
bool int_field(const Json& obj, const char* key, int64_t* out, int64_t lo = INT32_MIN, int64_t hi = INT32_MAX) {
  const Json* v = obj.get(key);
  if (!v || v->type != Json::number || !std::isfinite(v->num) || v->num < static_cast<double>(lo) ||
      v->num > static_cast<double>(hi) || v->num != std::floor(v->num))
    return false;
  *out = static_cast<int64_t>(v->num);
  return true;
}

std::string str_field(const Json& obj, const char* key, const std::string& dflt = "") {
  const Json* v = obj.get(key);
  return v && v->type == Json::string ? v->str : dflt;
}

// Checks the contract parameters the kernels were built for against this build's gemm_contract.h.
bool check_geometry(const Json& root, std::string* why) {
  const Json* tile = root.get("tile");
  const Json* array = root.get("array");
  int64_t m = 0, k = 0, n = 0, rows = 0, cols = 0;
  if (!tile || !array || !int_field(*tile, "m", &m) || !int_field(*tile, "k", &k) || !int_field(*tile, "n", &n) ||
      !int_field(*array, "rows", &rows) || !int_field(*array, "cols", &cols)) {
    *why = "manifest lacks tile {m,k,n} / array {rows,cols}";
    return false;
  }
  if (m != kTileM || k != kTileK || n != kTileN || rows != kArrayRows || cols != kArrayCols) {
    std::ostringstream os;
    os << "kernels were built for tile " << m << "x" << k << "x" << n << " on " << rows << "x" << cols
       << " cores, this build expects " << kTileM << "x" << kTileK << "x" << kTileN << " on " << kArrayRows << "x"
       << kArrayCols;
    *why = os.str();
    return false;
  }
  return true;
}

}  // namespace

std::string resolve_kernel_dir(const std::string& configured, const std::string& from_env) {
  if (!configured.empty()) return configured;
  if (!from_env.empty()) return from_env;
  const char* home = std::getenv("HOME");
  return std::string(home && *home ? home : ".") + "/.cache/onnxruntime-ep-xdna/kernels";
}

bool read_regular_file(const std::string& path, int64_t max_bytes, std::string* data, std::string* why) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    *why = path + ": " + std::strerror(errno);
    return false;
  }
  struct stat st {};
  bool ok = ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
  if (!ok) *why = path + " is not a regular file";
  else if (st.st_size > max_bytes) *why = path + " is larger than " + std::to_string(max_bytes) + " bytes", ok = false;
  if (ok) {
    data->clear();
    char buf[65536];
    for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) != 0;) {
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 || static_cast<int64_t>(data->size()) + n > max_bytes) {
        *why = n < 0 ? path + ": " + std::strerror(errno) : path + " grew past " + std::to_string(max_bytes) + " bytes";
        ok = false;
        break;
      }
      data->append(buf, static_cast<size_t>(n));
    }
  }
  ::close(fd);
  return ok;
}

bool load_manifest(const std::string& dir, Manifest* out, std::string* why) {
  const std::string path = dir + "/manifest.json";
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    *why = "no kernels built: " + path + " not found (build them with kernels/aie/build_kernels.py, or set "
           "XDNA_KERNEL_DIR / the kernel_dir provider option)";
    return false;
  }
  std::string text;
  if (!read_regular_file(path, kMaxManifestBytes, &text, why)) return false;
  Json root;
  try {
    root = JsonParser(text).parse();
  } catch (const std::exception& e) {
    *why = path + ": " + e.what();
    return false;
  }
  if (root.type != Json::object || str_field(root, "format") != kManifestFormat) {
    *why = path + ": not an onnxruntime-ep-xdna kernel manifest (\"format\" must be \"" + kManifestFormat + "\")";
    return false;
  }
  int64_t version = 0;
  if (!int_field(root, "contract_version", &version) || version != kContractVersion) {
    *why = path + ": contract_version " + (version ? std::to_string(version) : std::string("missing")) +
           ", this build implements version " + std::to_string(kContractVersion) + " (rebuild the kernels)";
    return false;
  }
  std::string geometry_why;
  if (!check_geometry(root, &geometry_why)) {
    *why = path + ": " + geometry_why;
    return false;
  }
  const Json* kernels = root.get("kernels");
  if (!kernels || kernels->type != Json::array) {
    *why = path + ": \"kernels\" must be an array";
    return false;
  }

  Manifest m;
  m.dir = dir;
  for (size_t i = 0; i < kernels->items.size(); ++i) {
    const Json& item = kernels->items[i];
    const std::string where = "kernels[" + std::to_string(i) + "]";
    if (item.type == Json::object && str_field(item, "dtype") == "attn_f32") {
      AttentionEntry a;
      const Json* scale = item.get("scale");
      if (!int_field(item, "T", &a.T, 32, kMaxKernelRows) || !int_field(item, "H", &a.H, 1, 1024) ||
          !int_field(item, "ld", &a.ld, a.H * 64, kMaxKernelN) || !int_field(item, "ldo", &a.ldo, 64, kMaxKernelN) ||
          !int_field(item, "o_head", &a.o_head, 0, int64_t{1} << 30) || !scale || scale->type != Json::number ||
          !(std::abs(scale->num) < 1e30)) {
        m.skipped.push_back(where + ": attn_f32 needs integer T in [32, " + std::to_string(kMaxKernelRows) +
                            "], H in [1, 1024], ld >= H * 64, ldo >= 64, o_head >= 0 and a finite scale");
        continue;
      }
      a.scale = static_cast<float>(scale->num);
      std::string file_why;
      a.xclbin = file_in_dir(dir, str_field(item, "xclbin"), kMaxXclbinBytes, &file_why);
      if (!a.xclbin.empty()) a.insts = file_in_dir(dir, str_field(item, "insts"), kMaxInstsBytes, &file_why);
      a.kernel_name = str_field(item, "kernel", "MLIR_AIE");
      if (a.xclbin.empty() || a.insts.empty()) {
        m.skipped.push_back(where + ": " + file_why);
        continue;
      }
      m.attention_kernels.push_back(std::move(a));
      continue;
    }
    KernelEntry e;
    if (item.type != Json::object || !int_field(item, "K", &e.K, 1, kMaxKernelK) ||
        !int_field(item, "N", &e.N, 1, kMaxKernelN) || !int_field(item, "m_rows", &e.m_rows, 1, kMaxKernelRows)) {
      m.skipped.push_back(where + ": needs integer K in [1, " + std::to_string(kMaxKernelK) + "], N in [1, " +
                          std::to_string(kMaxKernelN) + "], m_rows in [1, " + std::to_string(kMaxKernelRows) + "]");
      continue;
    }
    const std::string dtype = str_field(item, "dtype");
    const bool int8 = dtype == "i8_f32";
    if (dtype != "bf16_f32" && dtype != "f32_f32" && !int8) {
      m.skipped.push_back(where + ": dtype '" + dtype + "' (only bf16_f32, f32_f32 and i8_f32 implement the contract)");
      continue;
    }
    e.a_f32 = dtype == "f32_f32";
    e.int8 = int8;  // issue 15: fp32 A, converted in the core; exact heights allowed
    if (e.K <= 0 || e.K % kTileK || e.N <= 0 || e.N % kBlockN || e.m_rows <= 0 ||
        (e.m_rows % kBlockM && !e.a_f32)) {  // i8_f32 too: its A layout is whole 256-row blocks
      m.skipped.push_back(where + ": K must be a multiple of " + std::to_string(kTileK) + ", N of " +
                          std::to_string(kBlockN) + ", m_rows of " + std::to_string(kBlockM));
      continue;
    }
    std::string file_why;
    e.xclbin = file_in_dir(dir, str_field(item, "xclbin"), kMaxXclbinBytes, &file_why);
    if (!e.xclbin.empty()) e.insts = file_in_dir(dir, str_field(item, "insts"), kMaxInstsBytes, &file_why);
    e.kernel_name = str_field(item, "kernel", "MLIR_AIE");
    if (e.xclbin.empty() || e.insts.empty()) {
      m.skipped.push_back(where + ": " + file_why);
      continue;
    }
    (int8 ? m.int8_kernels : m.kernels).push_back(std::move(e));
  }
  if (m.kernels.empty() && m.int8_kernels.empty() && m.attention_kernels.empty()) {
    *why = path + ": no usable kernels" + (m.skipped.empty() ? std::string() : " (" + m.skipped.front() + ")");
    return false;
  }
  *out = std::move(m);
  return true;
}

}  // namespace xdna::kernels::npu
