// Private module: kernel-level access for tests, benchmarks and `xdna info`. Users go through ONNX Runtime.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ep_plugin/ep_context.h"
#include "kernels/backend.h"
#include "kernels/ep_buffers.h"
#include "kernels/emulator/emulator.h"
#include "kernels/xrt/cost_model.h"
#include "kernels/xrt/dataflow_model.h"
#include "kernels/xrt/fake_device.h"
#include "kernels/xrt/manifest.h"
#include "kernels/xrt/npu_backend.h"
#include "kernels/xrt/xrt_loader.h"
#include "ops/precision_policy.h"

namespace py = pybind11;
namespace k = xdna::kernels;

namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

std::shared_ptr<k::PackedB> pack(F32Array b) {
  if (b.ndim() != 2) throw std::invalid_argument("B must be 2-D [K, N]");
  return std::make_shared<k::PackedB>(k::pack_b(b.data(), b.shape(0), b.shape(1), b.shape(1), 1));
}

// The epilogue's operands (gemm_contract.h, "Epilogue") for a C of M x N, checked; they must outlive the call.
k::GemmEpilogue make_epilogue(int64_t M, int64_t N, const std::optional<F32Array>& bias, bool gelu,
                              const std::optional<F32Array>& residual) {
  if (bias && (bias->ndim() != 1 || bias->shape(0) != N)) throw std::invalid_argument("bias must be [N]");
  if (residual && (residual->ndim() != 2 || residual->shape(0) != M || residual->shape(1) != N))
    throw std::invalid_argument("residual must be [M, N]");
  k::GemmEpilogue e;
  e.bias = bias ? bias->data() : nullptr;
  e.gelu = gelu;
  e.residual = residual ? residual->data() : nullptr;
  e.ldr = N;
  return e;
}

py::array_t<float> run_gemm(F32Array a, const k::PackedB& b, bool reference, int threads,
                            const k::GemmEpilogue& epilogue = {}) {
  if (a.ndim() != 2 || a.shape(1) != b.shape.K) throw std::invalid_argument("A must be [M, K] matching B");
  const int64_t M = a.shape(0), N = b.shape.N;
  py::array_t<float> c({M, N});
  k::GemmArgs args{a.data(), M, b.shape.K, c.mutable_data(), N};
  args.epilogue = epilogue;
  {
    py::gil_scoped_release release;
    if (reference) k::reference_gemm(args, b);
    else k::emulator_gemm(args, b, threads);
  }
  return c;
}

}  // namespace

// ---- NPU / XRT backend access (kernels/xrt): probe, fake device, fault injection, cost model ----
namespace {

// BackendFault -> _native.BackendFault(RuntimeError) with a `.step` attribute.
PyObject* g_backend_fault_type = nullptr;

struct NpuWeightHandle {
  std::shared_ptr<k::DeviceWeight> weight;
};

struct NpuBackendHandle {
  std::unique_ptr<k::Backend> backend;
  std::shared_ptr<k::npu::FakeStats> stats;  // fake device only

  py::tuple can_run(int64_t M, int64_t K, int64_t N) const {
    std::string why;
    const bool ok = backend->can_run(M, K, N, &why);
    return py::make_tuple(ok, why);
  }
  NpuWeightHandle upload(std::shared_ptr<k::PackedB> b) {
    py::gil_scoped_release release;
    return {backend->upload(std::move(b))};
  }
  py::array_t<float> gemm(F32Array a, const NpuWeightHandle& w) {
    const k::PackedB& b = w.weight->host();
    if (a.ndim() != 2 || a.shape(1) != b.shape.K) throw std::invalid_argument("A must be [M, K] matching B");
    const int64_t M = a.shape(0), N = b.shape.N;
    py::array_t<float> c({M, N});
    k::GemmArgs args{a.data(), M, b.shape.K, c.mutable_data(), N};
    {
      py::gil_scoped_release release;
      backend->gemm(args, *w.weight);
    }
    return c;
  }
  // C written into `c` (the caller's memory, e.g. an ep_buffer_array: the EP's own memory).
  void gemm_into(F32Array a, const NpuWeightHandle& w, py::array_t<float> c) {
    const k::PackedB& b = w.weight->host();
    if (a.ndim() != 2 || a.shape(1) != b.shape.K) throw std::invalid_argument("A must be [M, K] matching B");
    if (c.ndim() != 2 || c.shape(0) != a.shape(0) || c.shape(1) != b.shape.N || !(c.flags() & py::array::c_style) ||
        !c.writeable())
      throw std::invalid_argument("C must be a writable C-contiguous float32 [M, N]");
    k::GemmArgs args{a.data(), a.shape(0), b.shape.K, c.mutable_data(), b.shape.N};
    py::gil_scoped_release release;
    backend->gemm(args, *w.weight);
  }
  py::list gemm_batch(const py::list& items) {
    std::vector<F32Array> as;
    std::vector<py::array_t<float>> cs;
    std::vector<k::BatchItem> batch;
    for (auto item : items) {
      auto pair = item.cast<py::tuple>();
      F32Array a = pair[0].cast<F32Array>();
      const auto& w = pair[1].cast<const NpuWeightHandle&>();
      const k::PackedB& b = w.weight->host();
      if (a.ndim() != 2 || a.shape(1) != b.shape.K) throw std::invalid_argument("A must be [M, K] matching B");
      py::array_t<float> c({a.shape(0), static_cast<py::ssize_t>(b.shape.N)});
      batch.push_back({k::GemmArgs{a.data(), a.shape(0), b.shape.K, c.mutable_data(), b.shape.N}, w.weight.get()});
      as.push_back(std::move(a));
      cs.push_back(std::move(c));
    }
    {
      py::gil_scoped_release release;
      backend->gemm_batch(batch.data(), batch.size());
    }
    py::list out;
    for (auto& c : cs) out.append(c);
    return out;
  }
  py::dict fake_stats() const {
    if (!stats) throw std::runtime_error("not a fake-device backend");
    return py::dict(py::arg("contexts") = stats->contexts.load(), py::arg("runs") = stats->runs.load(),
                    py::arg("instr_buffers") = stats->buffers[0].load(), py::arg("a_buffers") = stats->buffers[1].load(),
                    py::arg("b_buffers") = stats->buffers[2].load(), py::arg("c_buffers") = stats->buffers[3].load(),
                    py::arg("d_buffers") = stats->buffers[4].load(),
                    py::arg("submissions") = stats->submissions.load(), py::arg("imports") = stats->imports.load(),
                    py::arg("sub_buffers") = stats->sub_buffers.load());
  }
};

// Model parameters by name (NpuModelParams' fields), for `xdna partition --npu-model` overrides.
k::NpuModelParams model_params(const py::dict& overrides) {
  k::NpuModelParams p;
  for (auto item : overrides) {
    const std::string key = py::str(item.first);
    const double v = py::cast<double>(item.second);
    if (!(v > 0)) throw std::invalid_argument("model parameter " + key + " must be > 0");
    if (key == "aie_ghz") p.aie_ghz = v;
    else if (key == "gemm_efficiency") p.gemm_efficiency = v;
    else if (key == "submit_us") p.submit_us = v;
    else if (key == "chain_us") p.chain_us = v;
    else if (key == "ddr_gbps") p.ddr_gbps = v;
    else if (key == "host_gbps") p.host_gbps = v;
    else if (key == "sync_gbps") p.sync_gbps = v;
    else if (key == "pin_gbps") p.pin_gbps = v;
    else if (key == "bf16_macs") p.bf16_macs = v;  // e.g. 256: int8's MAC rate, for the int8 route
    else if (key == "import_us") p.import_us = v;
    else if (key == "cpu_gflops") p.cpu_gflops = v;
    else if (key == "int8_macs") p.int8_macs = v;
    else if (key == "cpu_int8_gflops") p.cpu_int8_gflops = v;
    else if (key == "cpu_gbps") p.cpu_gbps = v;
    else if (key == "softmax_cycles_per_elem") p.softmax_cycles_per_elem = v;
    else throw std::invalid_argument("unknown model parameter " + key);
  }
  return p;
}

py::dict cost_dict(const k::NodeCost& c) {
  return py::dict(py::arg("dispatch_us") = c.dispatch_us, py::arg("host_us") = c.host_us,
                  py::arg("dma_us") = c.dma_us, py::arg("compute_us") = c.compute_us, py::arg("npu_us") = c.npu_us,
                  py::arg("cpu_us") = c.cpu_us, py::arg("commands") = c.commands, py::arg("npu") = c.npu,
                  py::arg("dataflow") = c.dataflow);
}

void register_npu_bindings(py::module_& m) {
  g_backend_fault_type = PyErr_NewException("_native.BackendFault", PyExc_RuntimeError, nullptr);
  m.add_object("BackendFault", py::handle(g_backend_fault_type));
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const k::BackendFault& e) {
      py::object exc = py::reinterpret_borrow<py::object>(g_backend_fault_type)(e.what());
      exc.attr("step") = e.step();
      PyErr_SetObject(g_backend_fault_type, exc.ptr());
    }
  });

  py::class_<NpuWeightHandle>(m, "NpuWeight");
  py::class_<NpuBackendHandle>(m, "NpuBackend")
      .def_property_readonly("name", [](const NpuBackendHandle& h) { return h.backend->name(); })
      .def_property_readonly("description", [](const NpuBackendHandle& h) { return h.backend->device_description(); })
      .def("can_run", &NpuBackendHandle::can_run, py::arg("M"), py::arg("K"), py::arg("N"))
      .def("has_int8_kernel", [](const NpuBackendHandle& h, int64_t K, int64_t N) {
            std::string why;
            const bool ok = h.backend->has_int8_kernel(K, N, &why);
            return py::make_tuple(ok, why);
          }, py::arg("K"), py::arg("N"))
      .def("can_run_in", [](const NpuBackendHandle& h, const std::string& precision, int64_t M, int64_t K, int64_t N) {
            k::Precision p;
            if (!k::parse_precision(precision.c_str(), &p)) throw std::invalid_argument("bad precision");
            std::string why;
            const bool ok = h.backend->can_run_in(p, M, K, N, &why);
            return py::make_tuple(ok, why);
          }, py::arg("precision"), py::arg("M"), py::arg("K"), py::arg("N"))
      .def("supports", [](const NpuBackendHandle& h, const std::string& precision) {
            k::Precision p;
            if (!k::parse_precision(precision.c_str(), &p)) throw std::invalid_argument("bad precision");
            std::string why;
            const bool ok = h.backend->supports(p, &why);
            return py::make_tuple(ok, why);
          }, py::arg("precision"))
      .def("upload", &NpuBackendHandle::upload, py::arg("b"), py::keep_alive<0, 1>())
      .def("gemm", &NpuBackendHandle::gemm, py::arg("a"), py::arg("weight"))
      .def("gemm_into", &NpuBackendHandle::gemm_into, py::arg("a"), py::arg("weight"), py::arg("c"))
      .def("gemm_batch", &NpuBackendHandle::gemm_batch, py::arg("items"), "[(a, weight), ...] -> [c, ...]")
      .def("fake_stats", &NpuBackendHandle::fake_stats);

  // The EP's own memory (kernels/ep_buffers.h) as numpy arrays, for the tests of its protocol.
  m.def("ep_buffer_array", [](int64_t rows, int64_t cols) {
        if (rows < 1 || cols < 1 || rows > (int64_t{1} << 40) / cols) throw std::invalid_argument("bad shape");
        void* p = k::ep_buffer_alloc(static_cast<size_t>(rows * cols) * sizeof(float));
        if (!p) throw std::bad_alloc();
        py::capsule owner(p, [](void* q) { k::ep_buffer_free(q); });
        return py::array_t<float>({rows, cols}, static_cast<float*>(p), owner);
      }, py::arg("rows"), py::arg("cols"), "float32 [rows, cols] in the EP's own memory (pooled when freed)");
  m.def("ep_buffer_stats", [] {
        const k::EpBufferStats s = k::ep_buffer_stats();
        return py::dict(py::arg("allocs") = s.allocs, py::arg("frees") = s.frees, py::arg("fresh_blocks") = s.fresh_blocks,
                        py::arg("released_blocks") = s.released_blocks, py::arg("live_bytes") = s.live_bytes,
                        py::arg("pooled_bytes") = s.pooled_bytes);
      });
  m.def("ep_buffer_trim", &k::ep_buffer_trim, "gives every pooled block back to the system (backends told first)");
  m.def("ep_context_plan_roundtrip_problem", &xdna::ep::plan_roundtrip_problem,
        "The first OpPlan field the EPContext payload does not round-trip, or \"\".");
  m.def("npu_fake_backend", [](const std::string& kernel_dir, const std::string& fail_at, int max_contexts,
                               int timeout_ms) {
        k::npu::Manifest manifest;
        std::string why;
        if (!k::npu::load_manifest(kernel_dir, &manifest, &why)) throw std::runtime_error(why);
        k::npu::FakeOptions options;
        options.fail_at = fail_at;
        k::npu::NpuBackendOptions backend_options =
            k::npu::NpuBackendOptions::from_config(k::BackendConfig().with_environment());  // XDNA_XRT_COST_MODEL
        backend_options.max_contexts = max_contexts;
        backend_options.timeout = std::chrono::milliseconds(timeout_ms);
        std::unique_ptr<k::npu::NpuDevice> device;
        try {
          device = k::npu::make_fake_device(options);
        } catch (const std::exception& e) {
          throw k::BackendFault("open", e.what());
        }
        return NpuBackendHandle{k::npu::make_npu_backend(std::move(device), std::move(manifest), backend_options),
                                options.stats};
      }, py::arg("kernel_dir"), py::arg("fail_at") = "", py::arg("max_contexts") = 6, py::arg("timeout_ms") = 10000,
      "The xrt backend's protocol over the fake device (tests only)");
  m.def("xrt_backend", [](const std::string& kind, const std::string& kernel_dir, const std::string& plugin_dir,
                          const std::string& fault_inject) {
        k::BackendConfig cfg;
        cfg.with_environment();
        cfg.kind = kind;
        cfg.kernel_dir = kernel_dir;
        cfg.plugin_dir = plugin_dir;
        cfg.fault_inject = fault_inject;
        std::string why;
        auto backend = k::make_backend(cfg, &why);
        return py::make_tuple(NpuBackendHandle{std::move(backend), nullptr}, why);
      }, py::arg("kind") = "auto", py::arg("kernel_dir") = "", py::arg("plugin_dir") = "", py::arg("fault_inject") = "",
      "make_backend() as the EP calls it: returns (backend, why)");
  m.def("xrt_probe", [](const std::string& kernel_dir, const std::string& plugin_dir) {
        k::BackendConfig cfg;
        cfg.with_environment();
        cfg.kernel_dir = kernel_dir;
        cfg.plugin_dir = plugin_dir;
        const k::XrtProbe probe = k::probe_xrt(cfg);
        py::list pieces;
        for (const auto& p : probe.pieces)
          pieces.append(py::dict(py::arg("name") = p.name, py::arg("ok") = p.ok, py::arg("detail") = p.detail));
        return py::dict(py::arg("ready") = probe.ready(), py::arg("pieces") = pieces,
                        py::arg("summary") = probe.summary(),
                        py::arg("kernel_dir") = k::npu::resolve_kernel_dir(kernel_dir, cfg.env_value("XDNA_KERNEL_DIR")));
      }, py::arg("kernel_dir") = "", py::arg("plugin_dir") = "", "Every piece the NPU path needs, for `xdna info`");
  m.def("npu_fake_insts", [](int64_t m_rows, int64_t Kpad, int64_t Npad, bool a_f32) {
        const auto words = k::npu::fake_insts(m_rows, Kpad, Npad, a_f32);
        return py::array_t<uint32_t>(words.size(), words.data());
      }, py::arg("m_rows"), py::arg("Kpad"), py::arg("Npad"), py::arg("a_f32") = false);
  m.def("npu_fake_insts_attention", [](int64_t T, int64_t H, int64_t ld, int64_t ldo, int64_t o_head, float scale) {
        const auto words = k::npu::fake_insts_attention(T, H, ld, ldo, o_head, scale);
        return py::array_t<uint32_t>(words.size(), words.data());
      }, py::arg("T"), py::arg("H"), py::arg("ld"), py::arg("ldo"), py::arg("o_head"), py::arg("scale"));
  m.def("npu_fake_insts_i8", [](int64_t m_rows, int64_t Kpad, int64_t Npad) {
        const auto words = k::npu::fake_insts_i8(m_rows, Kpad, Npad);
        return py::array_t<uint32_t>(words.size(), words.data());
      }, py::arg("m_rows"), py::arg("Kpad"), py::arg("Npad"));
  m.def("npu_plan_row_chunks", &k::npu::plan_row_chunks, py::arg("M"), py::arg("heights"));
  m.def("npu_cost", [](int64_t M, int64_t K, int64_t N, double cpu_gflops, int64_t m_rows) {
        k::NpuCostParams p;
        if (cpu_gflops > 0) p.cpu_gflops = cpu_gflops;
        if (m_rows > 0) p.m_rows = m_rows;
        const k::GemmCost c = k::predict_gemm_cost(M, K, N, p);
        return py::dict(py::arg("npu_us") = c.npu_us, py::arg("cpu_us") = c.cpu_us, py::arg("runs") = c.runs,
                        py::arg("npu_wins") = c.npu_wins());
      }, py::arg("M"), py::arg("K"), py::arg("N"), py::arg("cpu_gflops") = 0.0, py::arg("m_rows") = 0,
      "kernels/xrt/cost_model.h: predicted NPU vs CPU time (estimates, not silicon measurements)");
  m.def("npu_model", [](int64_t M, int64_t K, int64_t N, int64_t batches, bool runtime_b, bool a_gather, bool conv,
                        const std::string& dataflow, const py::dict& params, bool int8, bool a_ep_memory,
                        bool c_ep_memory, bool chained, bool a_shared) {
        k::NodeWork w{batches, M, K, N, runtime_b, a_gather, conv, int8, a_ep_memory, c_ep_memory, chained, a_shared};
        if (M < 0 || K < 0 || N < 0 || batches < 1) throw std::invalid_argument("bad GEMM shape");
        const k::NpuModelParams p = model_params(params);
        if (dataflow == "v1") return cost_dict(k::model_node_v1(w, p));
        if (dataflow == "v2") return cost_dict(k::model_node_v2(w, p));
        throw std::invalid_argument("dataflow must be v1 or v2");
      }, py::arg("M"), py::arg("K"), py::arg("N"), py::arg("batches") = 1, py::arg("runtime_b") = false,
      py::arg("a_gather") = false, py::arg("conv") = false, py::arg("dataflow") = "v2", py::arg("params") = py::dict(),
      py::arg("int8") = false, py::arg("a_ep_memory") = false, py::arg("c_ep_memory") = false,
      py::arg("chained") = false, py::arg("a_shared") = false,
      "kernels/xrt/dataflow_model.h: modelled Phoenix time of one node (a model, not a measurement)");
  m.def("npu_model_attention", [](int64_t heads, int64_t Tq, int64_t Tk, int64_t d, const py::dict& params,
                                  bool io_ep_memory) {
        if (heads < 1 || Tq < 1 || Tk < 1 || d < 1) throw std::invalid_argument("bad attention shape");
        return cost_dict(k::model_attention_v2(heads, Tq, Tk, d, model_params(params), io_ep_memory));
      }, py::arg("heads"), py::arg("Tq"), py::arg("Tk"), py::arg("d"), py::arg("params") = py::dict(),
      py::arg("io_ep_memory") = false);
  m.def("npu_model_assumptions", [](const py::dict& params) {
        py::list out;
        for (const auto& a : k::npu_model_assumptions(model_params(params)))
          out.append(py::make_tuple(a.name, a.value, a.source));
        return out;
      }, py::arg("params") = py::dict());
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "private: onnxruntime_ep_xdna kernel access (not a public API)";
  py::class_<k::PackedB, std::shared_ptr<k::PackedB>>(m, "PackedB")
      .def_property_readonly("K", [](const k::PackedB& p) { return p.shape.K; })
      .def_property_readonly("N", [](const k::PackedB& p) { return p.shape.N; })
      .def_property_readonly("Kpad", [](const k::PackedB& p) { return p.shape.Kpad; })
      .def_property_readonly("Npad", [](const k::PackedB& p) { return p.shape.Npad; })
      .def_property_readonly("data", [](const k::PackedB& p) {
        return py::array_t<uint16_t>(p.size(), p.bits());
      });
  m.def("pack_b", &pack, py::arg("b"), "Pack fp32 B[K,N] into the contract's bf16 tiled layout");
  m.def("pack_b_in", [](F32Array b, const std::string& precision) {
        k::Precision p;
        if (b.ndim() != 2 || !k::parse_precision(precision.c_str(), &p))
          throw std::invalid_argument("B must be 2-D [K, N] and precision one of bf16, int8, bf16x3");
        return std::make_shared<k::PackedB>(k::pack_b_in(p, b.data(), b.shape(0), b.shape(1), b.shape(1), 1));
      }, py::arg("b"), py::arg("precision"), "A weight packed in a precision mode, as the EP packs it (for upload)");
  m.def("emulator_gemm", [](F32Array a, const k::PackedB& b, int threads, std::optional<F32Array> bias, bool gelu,
                            std::optional<F32Array> residual) {
        const int64_t M = a.ndim() == 2 ? a.shape(0) : 0;
        return run_gemm(a, b, false, threads, make_epilogue(M, b.shape.N, bias, gelu, residual));
      }, py::arg("a"), py::arg("b"), py::arg("threads") = 0, py::arg("bias") = py::none(), py::arg("gelu") = false,
      py::arg("residual") = py::none(), "The bf16 contract, with the epilogue run inside the product when given");
  m.def("apply_epilogue", [](F32Array c, std::optional<F32Array> bias, bool gelu, std::optional<F32Array> residual) {
        if (c.ndim() != 2) throw std::invalid_argument("C must be [M, N]");
        const int64_t M = c.shape(0), N = c.shape(1);
        const k::GemmEpilogue e = make_epilogue(M, N, bias, gelu, residual);
        py::array_t<float> out({M, N});
        std::copy(c.data(), c.data() + M * N, out.mutable_data());
        k::apply_epilogue(e, out.mutable_data(), N, 0, M, 0, N);
        return out;
      }, py::arg("c"), py::arg("bias") = py::none(), py::arg("gelu") = false, py::arg("residual") = py::none(),
      "The GEMM epilogue's arithmetic (gemm_contract.h, \"Epilogue\") on a copy of C, as every CPU path applies it");
  m.def("emulator_pair_b", [](const k::PackedB& b) {
        std::vector<uint32_t> pairs = k::emulator_pair_b(b);
        return py::array_t<uint32_t>(static_cast<py::ssize_t>(pairs.size()), pairs.data());
      }, py::arg("b"), "B re-laid for the AMX tiles (empty where the kernel set has no use for it)");
  m.def("emulator_wants_paired_b", &k::emulator_wants_paired_b, py::arg("M"));
  m.def("emulator_gemm_paired", [](F32Array a, const k::PackedB& b, py::array_t<uint32_t, py::array::c_style> pairs,
                                   int threads, std::optional<F32Array> bias, bool gelu,
                                   std::optional<F32Array> residual) {
        if (a.ndim() != 2 || a.shape(1) != b.shape.K) throw std::invalid_argument("A must be [M, K] matching B");
        if (pairs.size() != 0 && pairs.size() != b.shape.Kpad * b.shape.Npad / 2)
          throw std::invalid_argument("pairs must come from emulator_pair_b(b)");
        const int64_t M = a.shape(0), N = b.shape.N;
        py::array_t<float> c({M, N});
        k::GemmArgs args{a.data(), M, b.shape.K, c.mutable_data(), N};
        args.epilogue = make_epilogue(M, N, bias, gelu, residual);
        {
          py::gil_scoped_release release;
          k::emulator_gemm(args, b, threads, pairs.size() ? pairs.data() : nullptr);
        }
        return c;
      }, py::arg("a"), py::arg("b"), py::arg("pairs"), py::arg("threads") = 0, py::arg("bias") = py::none(),
      py::arg("gelu") = false, py::arg("residual") = py::none(),
      "emulator_gemm with B's tile-paired copy (what the EP's emulator backend runs for few rows on AMX)");
  // The optional additive mask [H, M, T] (or [M, T] for one head) of the attention bindings, set on their heads.
  const auto set_mask = [](std::vector<k::AttentionHead>& heads, const k::AttentionShape& shape,
                           const std::optional<F32Array>& mask) {
    if (!mask) return;
    const int64_t H = static_cast<int64_t>(heads.size());
    const bool one = mask->ndim() == 2 && H == 1;
    if (!(one || (mask->ndim() == 3 && mask->shape(0) == H)) || mask->shape(mask->ndim() - 2) != shape.M ||
        mask->shape(mask->ndim() - 1) != shape.T)
      throw std::invalid_argument("mask must be [H, M, T] (or [M, T] for one head)");
    for (int64_t h = 0; h < H; ++h) {
      heads[h].mask = mask->data() + h * shape.M * shape.T;
      heads[h].mask_stride_m = shape.T;
    }
  };
  m.def("emulator_attention", [set_mask](F32Array q, F32Array k, F32Array v, float scale, int threads,
                                         bool k_transposed, bool v_transposed, std::optional<F32Array> mask,
                                         bool zero_nan_rows) {
        // The fused attention contract (attention_contract.h), all heads in one call: q [H, M, D], k [H, T, D] and
        // v [H, T, Dv] (or one head: 2-D). k_transposed: k holds K^T [H, D, T]; v_transposed: v holds V^T
        // [H, Dv, T] (the contract's strided layouts).
        const auto nd = q.ndim();
        if ((nd != 2 && nd != 3) || k.ndim() != nd || v.ndim() != nd)
          throw std::invalid_argument("q, k and v must all be [M, D], [T, D], [T, Dv] or all [H, ...]");
        const int64_t H = nd == 3 ? q.shape(0) : 1, a = nd - 2, b = nd - 1;
        k::AttentionShape shape;
        shape.M = q.shape(a);
        shape.D = q.shape(b);
        shape.T = k_transposed ? k.shape(b) : k.shape(a);
        shape.Dv = v_transposed ? v.shape(a) : v.shape(b);
        shape.scale = scale;
        shape.zero_nan_rows = zero_nan_rows;
        const int64_t k_depth = k_transposed ? k.shape(a) : k.shape(b), v_keys = v_transposed ? v.shape(b) : v.shape(a);
        if (k_depth != shape.D || v_keys != shape.T || (nd == 3 && (k.shape(0) != H || v.shape(0) != H)))
          throw std::invalid_argument("q must be [M, D], k [T, D] (or [D, T]) and v [T, Dv] (or [Dv, T]), per head");
        py::array_t<float> o(nd == 3 ? std::vector<py::ssize_t>{H, shape.M, shape.Dv}
                                     : std::vector<py::ssize_t>{shape.M, shape.Dv});
        std::vector<k::AttentionHead> heads(H);
        const int64_t T = shape.T, D = shape.D, Dv = shape.Dv;
        for (int64_t h = 0; h < H; ++h)
          heads[h] = k::AttentionHead{q.data() + h * shape.M * D, D,
                                      k.data() + h * T * D, k_transposed ? T : 1, k_transposed ? 1 : D,
                                      v.data() + h * T * Dv, v_transposed ? 1 : Dv, v_transposed ? T : 1,
                                      o.mutable_data() + h * shape.M * Dv, Dv};
        set_mask(heads, shape, mask);
        {
          py::gil_scoped_release release;
          k::emulator_attention(shape, heads.data(), heads.size(), threads);
        }
        return o;
      }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("threads") = 0,
      py::arg("k_transposed") = false, py::arg("v_transposed") = false, py::arg("mask") = py::none(),
      py::arg("zero_nan_rows") = false,
      "Fused attention on the emulator (the contract's reference), one head or [H, ...] heads in one call; mask: "
      "the additive mask [H, M, T], zero_nan_rows: the NaN rule (attention_contract.h)");
  m.def("emulator_attention_exp", [](F32Array x, const std::string& form) -> py::object {
        const int f = form == "scalar" ? 0 : form == "fma" ? 1 : form == "fma_base2" ? 2 : -1;
        if (f < 0) throw std::invalid_argument("form must be scalar, fma or fma_base2");
        py::array_t<float> out(x.request().shape);
        if (!k::emulator_attention_exp(x.data(), out.mutable_data(), x.size(), f)) return py::none();
        return std::move(out);
      }, py::arg("x"), py::arg("form"),
      "The fused attention softmax's exp on floats <= 0: scalar (the sets without AVX512-BF16), fma (the AVX-512 "
      "form of the amx / avx512bf16 sets), fma_base2 (2^x there, unmasked rows); None on a CPU without AVX512-BF16");
  m.def("emulator_attention_few_row_kernel", &k::emulator_attention_few_row_kernel,
        "The per-head kernel the fused attention runs for few query rows with K and V as rows: avx512bf16, avx512, "
        "avx2 or unpacked (the generic kernel set's per-product path)");
  m.def("emulator_attention_bf16_kv", [set_mask](F32Array q, py::array_t<uint16_t, py::array::c_style> k,
                                                 py::array_t<uint16_t, py::array::c_style> v, float scale, int threads,
                                                 std::optional<F32Array> mask, bool zero_nan_rows,
                                                 bool k_frames_first) {
        // emulator_attention with K and V given as bf16 bits (a graph's Cast to bfloat16, read as it lies): q
        // [H, M, D], k [H, T, D], v [H, T, Dv] (K and V as rows: the decoder's cross-attention layout).
        // k_frames_first: k is [T, H, D] (the prompt run's frames-first copy), each head's key rows H * D apart.
        const int64_t kh = k_frames_first ? 1 : 0, kt = k_frames_first ? 0 : 1;
        if (q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3 || k.shape(kh) != q.shape(0) || v.shape(0) != q.shape(0) ||
            k.shape(2) != q.shape(2) || v.shape(1) != k.shape(kt))
          throw std::invalid_argument("q must be [H, M, D], k [H, T, D] (or [T, H, D]) and v [H, T, Dv]");
        k::AttentionShape shape;
        const int64_t H = q.shape(0);
        shape.M = q.shape(1);
        shape.D = q.shape(2);
        shape.T = k.shape(kt);
        shape.Dv = v.shape(2);
        shape.scale = scale;
        shape.zero_nan_rows = zero_nan_rows;
        const int64_t M = shape.M, T = shape.T, D = shape.D, Dv = shape.Dv;
        py::array_t<float> o(std::vector<py::ssize_t>{H, M, Dv});
        std::vector<k::AttentionHead> heads(H);
        for (int64_t h = 0; h < H; ++h) {
          heads[h] = k::AttentionHead{q.data() + h * M * D, D, nullptr, 1, k_frames_first ? H * D : D, nullptr, Dv, 1,
                                      o.mutable_data() + h * M * Dv, Dv};
          heads[h].kt_bf16 = k.data() + (k_frames_first ? h * D : h * T * D);
          heads[h].v_bf16 = v.data() + h * T * Dv;
        }
        set_mask(heads, shape, mask);
        {
          py::gil_scoped_release release;
          k::emulator_attention(shape, heads.data(), heads.size(), threads);
        }
        return o;
      }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("threads") = 0,
      py::arg("mask") = py::none(), py::arg("zero_nan_rows") = false, py::arg("k_frames_first") = false,
      "emulator_attention with bf16 K and V (uint16 bits) as rows, all heads in one call; k_frames_first: k is "
      "[T, H, D]");
  m.def("emulator_gemm_unpacked", [](F32Array a, F32Array b, int threads, bool b_transposed) {
        // b_transposed: `b` holds B^T [N, K] (B read as it lies, column by column).
        const int64_t Kb = b.ndim() == 2 ? b.shape(b_transposed ? 1 : 0) : -1;
        if (a.ndim() != 2 || b.ndim() != 2 || a.shape(1) != Kb)
          throw std::invalid_argument("A must be [M, K] and B [K, N] (or [N, K] with b_transposed)");
        const int64_t M = a.shape(0), K = a.shape(1), N = b.shape(b_transposed ? 0 : 1);
        py::array_t<float> c({M, N});
        k::GemmArgs args{a.data(), M, K, c.mutable_data(), N};
        {
          py::gil_scoped_release release;
          const k::UnpackedGemm call{args, b.data(), b_transposed ? K : N, b_transposed};
          k::emulator_gemm_unpacked(&call, 1, K, N, threads);
        }
        return c;
      }, py::arg("a"), py::arg("b"), py::arg("threads") = 0, py::arg("b_transposed") = false,
      "The contract on an unpacked run-time B (small M)");
  m.attr("UNPACKED_MAX_M") = k::kUnpackedMaxM;
  // Precision modes (gemm_contract.h): weight preparation and GEMM, kernel level only.
  py::class_<k::QuantizedB, std::shared_ptr<k::QuantizedB>>(m, "QuantizedB")
      .def_property_readonly("scale", [](const k::QuantizedB& q) { return py::array_t<float>(q.scale.size(), q.scale.data()); })
      .def_property_readonly("q", [](const k::QuantizedB& q) {  // [N, Kpad]: column n's int8 values, K contiguous
        // The emulator stores 16-column panels (emulator.cc quantize_b_int8); unpanel into the plain layout.
        py::array_t<int8_t> out({static_cast<py::ssize_t>(q.N), static_cast<py::ssize_t>(q.Kpad)});
        int8_t* dst = out.mutable_data();
        for (int64_t n = 0; n < q.N; ++n) {
          const int8_t* panel = q.q.data() + (n / 16) * q.Kpad * 16 + (n % 16) * 4;
          for (int64_t k = 0; k < q.Kpad; ++k) dst[n * q.Kpad + k] = panel[(k / 4) * 64 + k % 4];
        }
        return out;
      });
  py::class_<k::SplitB, std::shared_ptr<k::SplitB>>(m, "SplitB");
  m.def("quantize_b_int8", [](F32Array b) {
        if (b.ndim() != 2) throw std::invalid_argument("B must be 2-D [K, N]");
        return std::make_shared<k::QuantizedB>(k::quantize_b_int8(b.data(), b.shape(0), b.shape(1), b.shape(1), 1));
      }, py::arg("b"));
  m.def("emulator_gemm_int8", [](F32Array a, const k::QuantizedB& b, int threads, std::optional<F32Array> bias,
                                 bool gelu, std::optional<F32Array> residual) {
        if (a.ndim() != 2 || a.shape(1) != b.K) throw std::invalid_argument("A must be [M, K] matching B");
        py::array_t<float> c({a.shape(0), static_cast<py::ssize_t>(b.N)});
        k::GemmArgs args{a.data(), a.shape(0), b.K, c.mutable_data(), b.N};
        args.epilogue = make_epilogue(a.shape(0), b.N, bias, gelu, residual);
        py::gil_scoped_release release;
        k::emulator_gemm_int8(args, b, threads);
        return c;
      }, py::arg("a"), py::arg("b"), py::arg("threads") = 0, py::arg("bias") = py::none(), py::arg("gelu") = false,
      py::arg("residual") = py::none(), "The int8 contract, with the epilogue run inside the product when given");
  m.def("emulator_int8_kernel_name", &k::emulator_int8_kernel_name);
  m.attr("INT8_MAX_K") = k::kInt8MaxK;
  m.def("pack_b_bf16x3", [](F32Array b) {
        if (b.ndim() != 2) throw std::invalid_argument("B must be 2-D [K, N]");
        return std::make_shared<k::SplitB>(k::pack_b_bf16x3(b.data(), b.shape(0), b.shape(1), b.shape(1), 1));
      }, py::arg("b"));
  m.def("emulator_gemm_bf16x3", [](F32Array a, const k::SplitB& b, int threads) {
        if (a.ndim() != 2 || a.shape(1) != b.hi.shape.K) throw std::invalid_argument("A must be [M, K] matching B");
        py::array_t<float> c({a.shape(0), static_cast<py::ssize_t>(b.hi.shape.N)});
        k::GemmArgs args{a.data(), a.shape(0), b.hi.shape.K, c.mutable_data(), b.hi.shape.N};
        py::gil_scoped_release release;
        k::emulator_gemm_bf16x3(args, b, threads);
        return c;
      }, py::arg("a"), py::arg("b"), py::arg("threads") = 0);
  m.attr("VERSION") = XDNA_VERSION;  // the EP library's, from pyproject.toml
  m.def("precision_policy", [](const std::string& precision, const std::string& rules) {
        k::Precision p;
        if (!k::parse_precision(precision.c_str(), &p))
          throw std::invalid_argument("bad precision '" + precision + "' (accepted: bf16, int8, bf16x3)");
        return xdna::ops::PrecisionPolicy::parse(p, rules).describe();  // std::invalid_argument -> ValueError
      }, py::arg("precision"), py::arg("rules") = "",
      "Checks the `precision` and `precision_policy` provider options as the EP does; returns their description");
  m.def("emulator_kernel_name", &k::emulator_kernel_name, "amx | avx512bf16 | avx512 | avx2 | generic: the kernel set in use");
  m.def("reference_gemm", [](F32Array a, const k::PackedB& b) { return run_gemm(a, b, true, 1); },
        py::arg("a"), py::arg("b"));
  m.def("backend_probe", [](const std::string& kind, const std::string& kernel_dir) {
        k::BackendConfig cfg;
        cfg.with_environment();
        cfg.kind = kind;
        cfg.kernel_dir = kernel_dir;
        std::string why;
        auto backend = k::make_backend(cfg, &why);
        return py::dict(py::arg("backend") = backend->name(), py::arg("device") = backend->device_description(),
                        py::arg("why") = why);
      }, py::arg("kind") = "auto", py::arg("kernel_dir") = "");
  m.attr("TILE_M") = k::kTileM;
  m.attr("TILE_K") = k::kTileK;
  m.attr("TILE_N") = k::kTileN;
  m.attr("BLOCK_M") = k::kBlockM;
  m.attr("BLOCK_N") = k::kBlockN;
  register_npu_bindings(m);  // keep last: NPU/XRT hooks (kernels/xrt)
}
