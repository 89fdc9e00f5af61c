// A tiny toolbox over the ORT C API: every call goes through the OrtApi* table from GetApi(ORT_API_VERSION),
// C++ code throws OrtError, and every C entry point converts exceptions back to OrtStatus* (nothing crosses the ABI).
#pragma once

#include <onnxruntime_c_api.h>
// onnxruntime_c_api.h includes onnxruntime_ep_c_api.h itself (which has no include guard).

#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>

namespace xdna::ep {

struct ApiPtrs {
  const OrtApi& ort;
  const OrtEpApi& ep;
};

class OrtError : public std::runtime_error {
 public:
  OrtError(OrtErrorCode code, const std::string& msg) : std::runtime_error(msg), code_(code) {}
  OrtErrorCode code() const { return code_; }

 private:
  OrtErrorCode code_;
};

// Throws OrtError if `status` is an error (and releases it).
inline void check(const OrtApi& api, OrtStatus* status) {
  if (status == nullptr) return;
  std::string msg = api.GetErrorMessage(status);
  OrtErrorCode code = api.GetErrorCode(status);
  api.ReleaseStatus(status);
  throw OrtError(code, msg);
}

// Runs `fn` and converts any exception into an OrtStatus*. Used by every noexcept *Impl trampoline.
template <typename Fn>
OrtStatus* guard(const OrtApi& api, Fn&& fn) noexcept {
  try {
    fn();
    return nullptr;
  } catch (const OrtError& e) {
    return api.CreateStatus(e.code(), e.what());
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_EP_FAIL, e.what());
  } catch (...) {
    return api.CreateStatus(ORT_EP_FAIL, "XDNAExecutionProvider: unknown C++ exception");
  }
}

// Logging through ORT's logger, filtered by the EP's own `log_level` option. ORT hands plugin EPs its default
// logger, whose severity is the process-wide one (WARNING unless set_default_logger_severity was called); lines the
// user asked for with `log_level` but ORT's logger would drop go to stderr directly, so the option always works.
class Log {
 public:
  Log(const OrtApi& api, const OrtLogger* logger, OrtLoggingLevel min_level)
      : api_(&api), logger_(logger), min_level_(min_level) {}
  void operator()(OrtLoggingLevel level, const std::string& msg, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE(), const char* func = __builtin_FUNCTION()) const noexcept {
    if (level < min_level_) return;
    OrtLoggingLevel ort_level = ORT_LOGGING_LEVEL_WARNING;
    if (logger_ != nullptr) {
      OrtStatus* st = api_->Logger_GetLoggingSeverityLevel(logger_, &ort_level);
      if (st) api_->ReleaseStatus(st);
    }
    if (logger_ != nullptr && level >= ort_level) {
      try {  // the prefixed copy allocates; out of memory, the line goes to stderr below instead
        OrtStatus* st = api_->Logger_LogMessage(logger_, level, ("[XDNA] " + msg).c_str(), file, line, func);
        if (st) api_->ReleaseStatus(st);
        return;
      } catch (...) {
      }
    }
    std::fprintf(stderr, "[XDNA] %s\n", msg.c_str());
  }

 private:
  const OrtApi* api_;
  const OrtLogger* logger_;
  OrtLoggingLevel min_level_;
};

}  // namespace xdna::ep
