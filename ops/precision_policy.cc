#include "ops/precision_policy.h"

#include <fnmatch.h>

#include <stdexcept>


namespace xdna::ops {
namespace {

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t i = 0; i <= s.size(); ++i)
    if (i == s.size() || s[i] == sep) {
      parts.push_back(trim(s.substr(start, i - start)));
      start = i + 1;
    }
  return parts;
}

bool glob(const std::string& pattern, const std::string& text) { return fnmatch(pattern.c_str(), text.c_str(), 0) == 0; }

[[noreturn]] void bad_rule(const std::string& rule, const std::string& why) {
  throw std::invalid_argument("bad rule '" + rule + "' in precision_policy: " + why +
                              " (a rule is MODE:SELECTOR[,SELECTOR...] with MODE bf16|int8|bf16x3 and SELECTOR "
                              "op=GLOB, name=GLOB, weight=constant|runtime or *; rules are separated by ';')");
}

}  // namespace

PrecisionPolicy PrecisionPolicy::parse(kernels::Precision fallback, const std::string& rules) {
  PrecisionPolicy policy;
  policy.fallback = fallback;
  if (trim(rules).empty()) return policy;
  for (const std::string& text : split(rules, ';')) {
    if (text.empty()) continue;  // a trailing ';'
    const auto colon = text.find(':');
    if (colon == std::string::npos) bad_rule(text, "no ':' between the mode and the selectors");
    PrecisionRule rule;
    rule.text = text;
    const std::string mode = trim(text.substr(0, colon));
    if (!kernels::parse_precision(mode.c_str(), &rule.precision)) bad_rule(text, "unknown mode '" + mode + "'");
    const std::string selectors = trim(text.substr(colon + 1));
    if (selectors.empty()) bad_rule(text, "no selector");
    for (const std::string& sel : split(selectors, ',')) {
      if (sel == "*") continue;
      const auto eq = sel.find('=');
      if (eq == std::string::npos) bad_rule(text, "selector '" + sel + "' is not KEY=VALUE");
      const std::string key = trim(sel.substr(0, eq)), value = trim(sel.substr(eq + 1));
      if (value.empty()) bad_rule(text, "selector '" + sel + "' has no value");
      if (key == "op") rule.op_glob = value;
      else if (key == "name") rule.name_glob = value;
      else if (key == "weight") {
        if (value == "constant") rule.weight = 1;
        else if (value == "runtime") rule.weight = 0;
        else bad_rule(text, "weight=" + value + " (accepted: constant, runtime)");
      } else {
        bad_rule(text, "unknown selector key '" + key + "'");
      }
    }
    policy.rules.push_back(std::move(rule));
  }
  return policy;
}

kernels::Precision PrecisionPolicy::choose(const std::string& op_type, const std::string& name, bool constant_b,
                                           std::string* rule) const {
  for (const PrecisionRule& r : rules) {
    if (r.weight >= 0 && (r.weight == 1) != constant_b) continue;
    if (!glob(r.op_glob, op_type) || !glob(r.name_glob, name)) continue;
    if (rule) *rule = r.text;
    return r.precision;
  }
  if (rule) rule->clear();
  return fallback;
}

std::string PrecisionPolicy::describe() const {
  std::string s = std::string("precision ") + kernels::precision_name(fallback);
  for (const PrecisionRule& r : rules) s += (&r == &rules.front() ? ", rules: " : "; ") + r.text;
  return s;
}

}  // namespace xdna::ops
