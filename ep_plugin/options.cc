#include "options.h"

#include <cstdlib>
#include <cstring>
#include <map>
#include <stdexcept>
#include <vector>

namespace xdna::ep {
namespace {

[[noreturn]] void bad(const std::string& key, const std::string& value, const std::string& accepted) {
  throw OrtError(ORT_INVALID_ARGUMENT, std::string(kEpName) + ": bad value '" + value + "' for option '" + key +
                                           "' (accepted: " + accepted + ")");
}

std::string one_of(const std::string& key, const std::string& v, const std::vector<std::string>& allowed) {
  std::string list;
  for (const auto& a : allowed) {
    if (v == a) return v;
    list += (list.empty() ? "" : ", ") + a;
  }
  bad(key, v, list);
}

double number(const std::string& key, const std::string& v, double lo, double hi) {
  char* end = nullptr;
  const double d = std::strtod(v.c_str(), &end);
  if (v.empty() || end != v.c_str() + v.size() || !(d >= lo && d <= hi))
    bad(key, v, "a number in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return d;
}

}  // namespace

EpOptions parse_options(const OrtApi& api, const OrtSessionOptions* so) {
  EpOptions o;
  OrtKeyValuePairs* kvps = nullptr;
  check(api, api.GetSessionOptionsConfigEntries(so, &kvps));
  const char* const* keys = nullptr;
  const char* const* values = nullptr;
  size_t n = 0;
  api.GetKeyValuePairs(kvps, &keys, &values, &n);
  std::map<std::string, std::string> ours;
  std::string prefix = "ep.";
  for (const char* c = kEpName; *c; ++c) prefix += static_cast<char>(std::tolower(static_cast<unsigned char>(*c)));
  prefix += ".";
  for (size_t i = 0; i < n; ++i)
    if (std::strncmp(keys[i], prefix.c_str(), prefix.size()) == 0) ours[keys[i] + prefix.size()] = values[i];
  api.ReleaseKeyValuePairs(kvps);

  // ORT's intra-op workers busy-wait between nodes unless session.intra_op.allow_spinning=0, holding cores the
  // CPU path's threads could use (Whisper's encoder measured ~1.5x slower on 2 cores). Noted for the log.
  o.ort_threads_spin = config_entry(api, so, "session.intra_op.allow_spinning") != "0";
  o.context_enable = config_entry(api, so, "ep.context_enable") == "1";
  o.context_embed = config_entry(api, so, "ep.context_embed_mode") == "1";
  o.context_file_path = config_entry(api, so, "ep.context_file_path");
  o.context_node_prefix = config_entry(api, so, "ep.context_node_name_prefix");
  kernels::Precision precision = kernels::Precision::kBf16;
  std::string precision_rules;
  for (const auto& [key, v] : ours) {
    if (key == "backend") o.backend = one_of(key, v, {"auto", "emulator", "xrt"});
    else if (key == "min_mflop") o.min_mflop = number(key, v, 0, 1e12);
    else if (key == "threads") o.threads = static_cast<int>(number(key, v, 0, 1024));
    else if (key == "kernel_dir") o.kernel_dir = v;
    else if (key == "partition_report") o.partition_report = v;
    else if (key == "precision") kernels::parse_precision(one_of(key, v, {"bf16", "int8", "bf16x3"}).c_str(), &precision);
    else if (key == "precision_policy") precision_rules = v;
    else if (key == "fault_inject") o.fault_inject = one_of(key, v, {"", "upload", "run", "timeout", "result"});
    else if (key == "log_level") {
      static const std::map<std::string, OrtLoggingLevel> levels = {
          {"verbose", ORT_LOGGING_LEVEL_VERBOSE}, {"info", ORT_LOGGING_LEVEL_INFO},
          {"warning", ORT_LOGGING_LEVEL_WARNING}, {"error", ORT_LOGGING_LEVEL_ERROR}};
      auto it = levels.find(v);
      if (it == levels.end()) bad(key, v, "verbose, info, warning, error");
      o.log_level = it->second;
    } else {
      throw OrtError(ORT_INVALID_ARGUMENT,
                     std::string(kEpName) + ": unknown option '" + key +
                         "' (known: backend, min_mflop, threads, kernel_dir, log_level, precision, "
                         "precision_policy, partition_report, fault_inject)");
    }
  }
  try {
    o.precision = ops::PrecisionPolicy::parse(precision, precision_rules);
  } catch (const std::invalid_argument& e) {
    throw OrtError(ORT_INVALID_ARGUMENT, std::string(kEpName) + ": " + e.what());
  }
  return o;
}

std::string config_entry(const OrtApi& api, const OrtSessionOptions* so, const char* key) {
  int has = 0;
  check(api, api.HasSessionConfigEntry(so, key, &has));
  if (!has) return "";
  size_t size = 0;
  check(api, api.GetSessionConfigEntry(so, key, nullptr, &size));  // asks for the size, NUL included
  std::string value(size, '\0');
  check(api, api.GetSessionConfigEntry(so, key, value.data(), &size));
  value.resize(std::strlen(value.c_str()));
  return value;
}

}  // namespace xdna::ep
