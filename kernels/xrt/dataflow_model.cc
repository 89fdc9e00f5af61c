#include "dataflow_model.h"

#include <cmath>
#include <sstream>

#include "cost_model.h"

namespace xdna::kernels {
namespace {

double peak_gflops(const NpuModelParams& p) { return p.cores * p.bf16_macs * 2.0 * p.aie_ghz; }
double peak_int8_gops(const NpuModelParams& p) { return p.cores * p.int8_macs * 2.0 * p.aie_ghz; }
double us_for_flop(double flop, double gflops) { return flop / (gflops * 1e3); }
double us_for_bytes(double bytes, double gbps) { return bytes / (gbps * 1e3); }
double ceil_div(double a, double b) { return std::ceil(a / b); }

std::string fmt(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

}  // namespace

std::vector<ModelAssumption> npu_model_assumptions(const NpuModelParams& p) {
  return {
      {"AIE clock", fmt(p.aie_ghz) + " GHz",
       "AIEFrequency 1000 MHz in Phoenix xclbin metadata (RyzenAI-SW); the driver's DPM table (xdna-driver "
       "npu1_regs.c) reaches 1.6 GHz H-clock only in turbo, not assumed"},
      {"cores", fmt(p.cores) + " AIE-ML cores (4 columns x 4 rows)",
       "mlir-aie AIETargetModel npu1 (4 app columns; amdxdna npu1_regs.c first_col = 1)"},
      {"bf16 MACs", fmt(p.bf16_macs) + " per core per cycle -> peak " + fmt(peak_gflops(p)) + " GFLOPS",
       "aie::mmul<4,8,4> bf16 x bf16 -> fp32 (mlir-aie aie_kernels/aie2/mm.cc; AM020)"},
      {"GEMM efficiency", fmt(p.gemm_efficiency) + " of peak -> " + fmt(peak_gflops(p) * p.gemm_efficiency) +
                              " GFLOPS sustained",
       "mlir-aie issue #2735 (XDNA1 whole_array bf16, m=n=k=64: ~50% of peak; external kernel alone <= ~80%)"},
      {"int8 MACs", fmt(p.int8_macs) + " per core per cycle -> peak " + fmt(peak_int8_gops(p)) +
                        " GOPS (same efficiency assumed); B int8 (half the bytes); A quantised per row on the host",
       "AIE-ML aie::mmul<4,8,8> int8 x int8 (AIE API, AIE-ML: 2x the bf16 MACs); efficiency for int8 ASSUMED equal "
       "to bf16's; kernels/aie/gemm_int8.cc"},
      {"softmax", fmt(p.softmax_cycles_per_elem) + " cycles per score per core",
       "ASSUMED (no published npu1 softmax throughput): a 16-lane bf16 exp via LUT, max, sum, scale, pack in "
       "~8 cycles per vector"},
      {"memtile", fmt(p.memtile_kib) + " KiB per column; a resident operand may take " +
                      fmt(p.memtile_budget_kib) + " KiB",
       "AIETargetModel getMemTileSize 0x80000; the rest holds the streaming A/C buffers"},
      {"L1", "64 KiB per core: 2 x (8 KiB A + 8 KiB B) + 16 KiB C = 48 KiB", "AIETargetModel getLocalMemorySize"},
      {"submission", fmt(p.submit_us) + " us from submit to completion seen by the host",
       "XRT PR #7878: Phoenix no-op latency 159.5 us (Windows); Phoenix Linux latency unpublished (Strix Linux "
       "50-52 us, amd/IRON #43/#55)"},
      {"chained command", fmt(p.chain_us) + " us per further command of one submission (runlist)",
       "xdna-driver PR #599: Phoenix Linux throughput 24,058 no-op cmds/s = 42 us each; runlists need firmware "
       ">= 5.8 (npu1_regs.c); Strix cmd-chain 8.8 us (XRT PR #8238) not assumed for Phoenix"},
      {"NPU DDR bandwidth", fmt(p.ddr_gbps) + " GB/s, all shim DMA channels together",
       "ASSUMED: unpublished for Phoenix; ceiling 4 shim tiles x 2 MM2S channels x 32 bit x 1 GHz = 32 GB/s per "
       "direction"},
      {"host pass", fmt(p.host_gbps) + " GB/s per host copy/convert pass (one core)", "ASSUMED (the v1 model's figure)"},
      {"BO sync", fmt(p.sync_gbps) + " GB/s cache maintenance of an in-place range (flush before, invalidate after)",
       "ASSUMED (clflush over the range; amdxdna syncs user-pointer BOs by CPU cache maintenance)"},
      {"XRT buffer import", "ORT's buffers become user-pointer BOs (enclosing pages + sub-BO at the offset), per "
                            "call: " + fmt(p.import_us) + " us each + pinning at " + fmt(p.pin_gbps) + " GB/s; "
                            "tensors in the EP's own memory: pinned once per block, a sub-BO per call",
       "xdna-driver PR #574 (user pointer BO), #1309 (not mmapped); page-aligned ranges (driver rule). Pinning "
       "cost ASSUMED (~100 ns per 4 KiB page). ORT's memory is not cached across calls (a freed and re-mapped "
       "address would leave the NPU reading stale pinned pages); the EP's memory is (kernels/ep_buffers.h: the "
       "allocator sees every free). Which tensors are in EP memory: as the EP's run reports them"},
      {"CPU", fmt(p.cpu_gflops) + " GFLOPS, " + fmt(p.cpu_gbps) + " GB/s, " + fmt(p.cpu_call_us) + " us per call",
       "ASSUMED: 8 Zen 4 cores at laptop all-core clocks running the bf16 contract (this project's CPU EP/"
       "emulator measured 110-185 GFLOPS per server core, benchmarks/README.md)"},
      {"CPU int8", fmt(p.cpu_int8_gflops) + " GOPS", "ASSUMED: the same CPU on the int8 contract, 2x bf16 (VNNI)"},
      {"kernel heights", "one command per call up to " + std::to_string(p.max_rows) + " rows (v2); v1: " +
                             std::to_string(p.v1_rows) + "-row runs",
       "kernels/aie/build_kernels.py --m-rows (exact heights, e.g. 1500)"},
  };
}

double model_cpu_us(const NodeWork& w, const NpuModelParams& p) {
  const double b = static_cast<double>(w.batches), M = static_cast<double>(w.M), K = static_cast<double>(w.K),
               N = static_cast<double>(w.N);
  const double flop = 2.0 * b * M * K * N;
  const bool int8 = w.int8 && !w.runtime_b;
  const double bytes = (w.runtime_b ? b * K * N * 4 : K * N * (int8 ? 1 : 2)) + b * M * K * 4 + b * M * N * 4;
  double us = std::max(us_for_flop(flop, int8 ? p.cpu_int8_gflops : p.cpu_gflops), us_for_bytes(bytes, p.cpu_gbps)) +
              p.cpu_call_us;
  if (w.conv) us += us_for_bytes(2.0 * b * (M * K + M * N) * 4, p.host_gbps);  // im2col + transpose, both paths
  return us;
}

NodeCost model_node_v1(const NodeWork& w, const NpuModelParams& p) {
  // cost_model.h as it stood before issue 15, per product; every head its own call.
  const NpuCostParams v1;
  const PaddedShape s = padded_shape(w.M, w.K, w.N);
  const double runs = static_cast<double>(std::max<int64_t>(1, s.Mpad / v1.m_rows));
  const double Mp = runs * static_cast<double>(v1.m_rows), Kp = static_cast<double>(s.Kpad),
               Np = static_cast<double>(s.Npad), M = static_cast<double>(w.M), K = static_cast<double>(w.K),
               N = static_cast<double>(w.N), b = static_cast<double>(w.batches);
  NodeCost c;
  c.commands = static_cast<int64_t>(runs) * w.batches;
  c.dispatch_us = b * (v1.first_dispatch_us + v1.dispatch_us * (runs - 1));
  c.compute_us = b * us_for_flop(2.0 * Mp * Kp * Np, v1.npu_gflops);
  c.dma_us = b * us_for_bytes(Mp * Kp * 2 + (Mp / kBlockM) * Kp * Np * 2 + Mp * Np * 4, v1.npu_dma_gbps);
  c.host_us = b * us_for_bytes(M * K * 4 + Mp * Kp * 2 + Mp * Np * 4 + M * N * 4, v1.host_gbps);
  c.npu_us = c.dispatch_us + c.host_us + std::max(c.compute_us, c.dma_us);
  c.cpu_us = b * us_for_flop(2.0 * M * K * N, v1.cpu_gflops);
  c.npu = c.npu_us < c.cpu_us;
  c.dataflow = "v1: host stages A (fp32->bf16) and copies C out, " + std::to_string(static_cast<int64_t>(runs)) +
               " run(s) of " + std::to_string(v1.m_rows) + " rows" +
               (w.batches > 1 ? ", " + std::to_string(w.batches) + " dispatches (one per head)" : "");
  (void)p;
  return c;
}

NodeCost model_node_v2(const NodeWork& w, const NpuModelParams& p) {
  const PaddedShape s = padded_shape(w.M, w.K, w.N);
  const double Mp = static_cast<double>(s.Mpad), Kp = static_cast<double>(s.Kpad), Np = static_cast<double>(s.Npad),
               M = static_cast<double>(w.M), K = static_cast<double>(w.K), N = static_cast<double>(w.N),
               b = static_cast<double>(w.batches);
  NodeCost c;
  c.cpu_us = model_cpu_us(w, p);
  std::vector<std::string> copies;
  double host_bytes = 0, sync_bytes = 0;

  // A: ORT's buffer read in place (fp32, converted in the core); the host builds it first for a Conv (im2col) or
  // an A without unit stride along K, and pads it (as bf16) when K is not a multiple of 64.
  if (w.conv) {
    host_bytes += 2.0 * b * M * K * 4;
    copies.push_back("im2col on the host (Conv input is channel-major; A rows are a gather)");
  } else if (w.a_gather) {
    host_bytes += 2.0 * b * M * K * 4;
    copies.push_back("A gathered on the host (no unit stride along K)");
  }
  const bool int8 = w.int8 && !w.runtime_b;  // the contract keeps run-time B (attention) in bf16
  const bool a_in_place = s.Kpad == w.K && !int8;
  if (int8) {  // per-row scales: the host reads fp32 A once and writes int8 A (+ a scale per row) to a staged BO
    host_bytes += b * (M * K * 4 + Mp * Kp);
    copies.push_back("int8: host quantises A per row (its scale needs the row's max first)");
  } else if (!a_in_place) {
    host_bytes += b * (M * K * 4 + Mp * Kp * 2);
    copies.push_back("K=" + std::to_string(w.K) + " not a multiple of 64: host pads A to bf16");
  }
  const double a_elem = a_in_place ? 4 : (int8 ? 1 : 2);  // fp32 in place, or int8 / bf16 staged
  const bool a_shared = a_in_place && w.a_shared;  // imported and synced by an earlier product of the runlist
  sync_bytes += a_shared ? 0 : (a_in_place ? b * M * K * 4 : b * Mp * Kp * a_elem);
  // Pinned per call: an in-place range in ORT's CPU memory. The EP's own memory is pinned once per block, and the
  // staging buffers are the backend's (allocated once).
  double pin_bytes = a_in_place && !w.a_ep_memory && !a_shared ? b * M * K * 4 : 0;

  // B: a packed constant weight (uploaded once); a run-time B (attention) is packed and uploaded per product by the
  // host, as the backend does today (reading it in place through the shim DMA's strides is designed, not built).
  const double b_elem = int8 ? 1 : 2;
  if (w.runtime_b) {
    host_bytes += b * (K * N * 4 + 2 * Kp * Np * 2);
    copies.push_back("run-time B packed and uploaded per product on the host");
  }
  // C: written in place when whole 64-column tiles cover N exactly; else staged and copied.
  const bool c_in_place = s.Npad == w.N;
  if (c_in_place) {
    sync_bytes += b * M * N * 4;
    if (!w.c_ep_memory) pin_bytes += b * M * N * 4;
  } else {
    host_bytes += b * (Mp * Np * 4 + M * N * 4);
    copies.push_back("N=" + std::to_string(w.N) + " not a multiple of 256: C staged and copied out");
  }
  if (w.conv) {
    host_bytes += 2.0 * b * M * N * 4;
    copies.push_back("C transposed to [Cout, T] on the host");
  }

  // DMA: whatever fits a memtile is read once; otherwise re-streamed per 256-row block (B) / column block (A).
  const double budget = p.memtile_budget_kib * 1024;
  const bool b_resident = Kp * Np * b_elem / kArrayCols <= budget;
  const bool a_resident = kTileM * Kp * a_elem <= budget;
  const double a_passes = b_resident || a_resident ? 1 : Np / kBlockN;
  const double b_passes = b_resident ? 1 : Mp / kBlockM;
  const double dma_bytes = b * (a_passes * Mp * Kp * a_elem + b_passes * Kp * Np * b_elem + Mp * Np * 4);
  c.dma_us = us_for_bytes(dma_bytes, p.ddr_gbps);
  c.compute_us = us_for_flop(2.0 * b * Mp * Kp * Np, (int8 ? peak_int8_gops(p) : peak_gflops(p)) * p.gemm_efficiency);
  // Every in-place range is synced and gets a (sub-)BO once per call; only ranges in ORT's memory are pinned.
  const double imports = (a_in_place && !a_shared ? 1 : 0) + (c_in_place ? 1 : 0);
  c.host_us = us_for_bytes(host_bytes, p.host_gbps) + us_for_bytes(sync_bytes, p.sync_gbps) +
              us_for_bytes(pin_bytes, p.pin_gbps) + imports * p.import_us;

  const int64_t runs = std::max<int64_t>(1, (s.Mpad + p.max_rows - 1) / p.max_rows);
  // Every product of a batch (the heads) is its own command; all of a node's commands go in one submission.
  c.commands = runs * w.batches;
  c.dispatch_us = w.chained ? p.chain_us * static_cast<double>(c.commands)
                            : p.submit_us + p.chain_us * static_cast<double>(c.commands - 1);
  c.npu_us = c.dispatch_us + c.host_us + std::max(c.dma_us, c.compute_us);

  std::ostringstream df;
  df << "v2" << (int8 ? " int8" : "") << ": " << c.commands << " cmd" << (c.commands > 1 ? "s" : "")
     << (w.chained ? " in an earlier node's runlist" : (c.commands > 1 ? " in 1 submission" : ""));
  auto where = [](bool ep) { return ep ? " (EP memory: pinned once)" : " (ORT's memory: pinned per call)"; };
  df << (a_in_place ? std::string(", A in place (fp32, RNE in core)") +
                          (a_shared ? " (shared with an earlier command of the runlist)" : where(w.a_ep_memory))
                    : "")
     << (c_in_place ? std::string(", C in place") + where(w.c_ep_memory) : "")
     << (b_resident ? ", B resident" : (a_resident ? ", A slab resident" : ""));
  for (const auto& why : copies) df << "; copy: " << why;
  bool fits = true;
  if (s.Npad > 64 * kBlockN) {  // shim DMA repeat count limit of the design (gemm_design.py MAX_REPEAT)
    fits = false;
    df << "; N > 16384: no kernel";
  }
  c.dataflow = df.str();
  c.npu = fits && c.npu_us < c.cpu_us;
  return c;
}

NodeCost model_attention_v2(int64_t heads, int64_t Tq, int64_t Tk, int64_t d, const NpuModelParams& p,
                            bool io_ep_memory) {
  // The design of kernels/aie/attention_design.py: all cores on one head at a time, each a 32-row query tile,
  // K and V streamed in 32-key tiles broadcast to every core once per pass; the last query / key tile moved back to
  // end at T (overlap), spare slots of the last pass recompute a tile. Self-attention only (one T for Q and K/V),
  // T >= 32, head dim 64 (one K step of the GEMM design), fp32 in place.
  constexpr int64_t kQRows = 32, kKeys = 32, kHeadDim = 64;
  const double h = static_cast<double>(heads), tq = static_cast<double>(Tq), tk = static_cast<double>(Tk),
               dd = static_cast<double>(d);
  const double q_tiles = ceil_div(tq, kQRows), passes = ceil_div(q_tiles, p.cores);
  const double tqp = passes * p.cores * kQRows, tkp = ceil_div(tk, kKeys) * kKeys;
  NodeCost c;
  c.commands = 1;
  c.dispatch_us = p.submit_us;
  c.compute_us = us_for_flop(4.0 * h * tqp * tkp * dd, peak_gflops(p) * p.gemm_efficiency) +
                 h * tqp * tkp * p.softmax_cycles_per_elem / (p.cores * p.aie_ghz * 1e3);
  // Q read and O written once per computed row; K and V (fp32, rounded in the cores) once per pass.
  const double io = h * 2.0 * tqp * dd * 4, kv = h * 2.0 * tkp * dd * 4;
  c.dma_us = us_for_bytes(io + passes * kv, p.ddr_gbps);
  const double in_place = h * 2.0 * (tq + tk) * dd * 4;  // Q, O and K, V ranges synced (pinned unless EP memory)
  c.host_us = us_for_bytes(in_place, p.sync_gbps) + (io_ep_memory ? 0 : us_for_bytes(in_place, p.pin_gbps)) +
              4 * p.import_us;
  c.npu_us = c.dispatch_us + c.host_us + std::max(c.dma_us, c.compute_us);
  // CPU: both products plus softmax passes over the fp32 scores (write, read+write, read).
  c.cpu_us = us_for_flop(4.0 * h * tq * tk * dd, p.cpu_gflops) + us_for_bytes(4.0 * h * tq * tk * 4, p.cpu_gbps) +
             2 * p.cpu_call_us;
  std::ostringstream df;
  std::string no_kernel;
  if (Tq != Tk) no_kernel = "query rows != keys (cross-attention): the design is for self-attention";
  else if (Tq < kQRows) no_kernel = "T < 32: the design's tiles need T >= 32";
  else if (d != kHeadDim) no_kernel = "head dim != 64";
  df << "v2 fused attention (kernels/aie/attention_design.py): 1 cmd, " << heads << " heads x " << passes
     << " passes of 16 x 32 query rows, K/V in 32-key tiles broadcast per pass; QK^T, softmax, PV in L1 (scores "
     << "never leave it); Q/K/V/out in place"
     << (io_ep_memory ? " (EP memory: pinned once)" : " (ORT's memory: pinned per call)");
  if (!no_kernel.empty()) df << "; no kernel: " << no_kernel;
  c.npu = no_kernel.empty() && c.npu_us < c.cpu_us;
  if (no_kernel.empty() && !c.npu) df << "; CPU by the model: faster there";
  c.dataflow = df.str();
  return c;
}

}  // namespace xdna::kernels
