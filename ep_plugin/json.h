// The one JSON writer of the partition report (claim decisions and run-time statistics): every string goes through
// json_string, every number through json_number.
#pragma once

#include <cmath>
#include <cstdio>
#include <string>

namespace xdna::ep {

// `s` as a quoted JSON string: quotes, backslashes and all control characters escaped.
inline std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (u < 0x20 || u == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", u);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

// A finite number as JSON; NaN and infinities (e.g. the FLOPs of huge declared dims) have no JSON form: null.
inline std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

}  // namespace xdna::ep
