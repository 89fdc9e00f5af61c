// Which claimed nodes ORT fuses into one compiled node. One fused node per claimed node made session creation
// grow quadratically with the number of claimed nodes (ORT's work per fused node grows with the graph), so claimed
// nodes are grouped, and this is the one place that decides the groups.
#pragma once

#include <onnxruntime_c_api.h>

#include <vector>

#include "ops/node_reader.h"

namespace xdna::graph {

// A claimed node, the Transposes it reads through (ops::Claim::fused_producers) and the nodes its epilogue runs
// (ops::Claim::fused_consumers): always in one group.
struct ClaimedUnit {
  const OrtNode* node = nullptr;
  std::vector<const OrtNode*> fused_producers;
  std::vector<const OrtNode*> fused_consumers;
};

// Partitions `units` into groups, each a valid ORT fusion: no path leaves a group and comes back into it, and the
// groups do not depend on each other in a cycle. `nodes` are all nodes of the graph in topological order (as
// Graph_GetNodes returns them), `index` that graph's producers. Each returned group lists its nodes (Transposes
// before the node that reads through them).
std::vector<std::vector<const OrtNode*>> fusion_groups(const OrtApi& api, const std::vector<const OrtNode*>& nodes,
                                                       const std::vector<ClaimedUnit>& units, const ops::GraphIndex& index);

}  // namespace xdna::graph
