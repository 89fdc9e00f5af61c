// Private module: kernel-level access for tests, benchmarks and `xdna info`. Users go through ONNX Runtime.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "kernels/backend.h"
#include "kernels/emulator/emulator.h"

namespace py = pybind11;
namespace k = xdna::kernels;

namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

std::shared_ptr<k::PackedB> pack(F32Array b) {
  if (b.ndim() != 2) throw std::invalid_argument("B must be 2-D [K, N]");
  return std::make_shared<k::PackedB>(k::pack_b(b.data(), b.shape(0), b.shape(1), b.shape(1), 1));
}

py::array_t<float> run_gemm(F32Array a, const k::PackedB& b, bool reference, int threads) {
  if (a.ndim() != 2 || a.shape(1) != b.shape.K) throw std::invalid_argument("A must be [M, K] matching B");
  const int64_t M = a.shape(0), N = b.shape.N;
  py::array_t<float> c({M, N});
  k::GemmArgs args{a.data(), M, b.shape.K, c.mutable_data(), N};
  {
    py::gil_scoped_release release;
    if (reference) k::reference_gemm(args, b);
    else k::emulator_gemm(args, b, threads);
  }
  return c;
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
        return py::array_t<uint16_t>(p.data.size(), p.data.data());
      });
  m.def("pack_b", &pack, py::arg("b"), "Pack fp32 B[K,N] into the contract's bf16 tiled layout");
  m.def("emulator_gemm", [](F32Array a, const k::PackedB& b, int threads) { return run_gemm(a, b, false, threads); },
        py::arg("a"), py::arg("b"), py::arg("threads") = 0);
  m.def("reference_gemm", [](F32Array a, const k::PackedB& b) { return run_gemm(a, b, true, 1); },
        py::arg("a"), py::arg("b"));
  m.def("backend_probe", [](const std::string& kind, const std::string& kernel_dir) {
        k::BackendConfig cfg;
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
}
