#include "fusion_groups.h"

#include <algorithm>
#include <map>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "ep_plugin/ort_api.h"

namespace xdna::graph {
namespace {

using ep::check;

// Names a node reads: its inputs and, for If/Loop nodes, the outer-scope values its subgraphs use.
std::vector<std::string> names_read(const OrtApi& api, const OrtNode* node) {
  size_t n = 0, implicit = 0;
  check(api, api.Node_GetNumInputs(node, &n));
  check(api, api.Node_GetNumImplicitInputs(node, &implicit));
  std::vector<const OrtValueInfo*> values(n + implicit);
  if (n) check(api, api.Node_GetInputs(node, values.data(), n));
  if (implicit) check(api, api.Node_GetImplicitInputs(node, values.data() + n, implicit));
  std::vector<std::string> names;
  for (const OrtValueInfo* vi : values) {
    const char* name = nullptr;
    if (vi) check(api, api.GetValueInfoName(vi, &name));
    if (name && *name) names.emplace_back(name);
  }
  return names;
}

}  // namespace

// Groups by "depth": the largest number of unclaimed nodes on any path from a graph input to the node. Depth never
// decreases along an edge and grows across every unclaimed node, so a path that leaves the claimed nodes of one
// depth and returns to that depth cannot exist, and edges between groups of different depths only go from lower
// to higher depth (no cycle between fused nodes). All claimed nodes of a depth form one group, connected or not
// (a chain of MatMuls is one group; so are the Q, K and V projections of one layer).
// A Transpose read through has exactly one consumer, its MatMul, so it joins its MatMul's group whatever its own
// depth: every path through it continues through that MatMul. Likewise an epilogue's nodes (ops/matmul.cc): the
// product and each of them but the last have one reader, the next, so the unit enters the group of its last node's
// depth, which is the depth of the deepest value the unit reads.
std::vector<std::vector<const OrtNode*>> fusion_groups(const OrtApi& api, const std::vector<const OrtNode*>& nodes,
                                                       const std::vector<ClaimedUnit>& units, const ops::GraphIndex& index) {
  std::unordered_map<const OrtNode*, size_t> unit_of;
  for (size_t u = 0; u < units.size(); ++u) {
    unit_of[units[u].node] = u;
    for (const OrtNode* t : units[u].fused_producers) unit_of[t] = u;
    for (const OrtNode* t : units[u].fused_consumers) unit_of[t] = u;
  }
  std::unordered_map<const OrtNode*, int64_t> depth;
  bool topological = true;
  for (const OrtNode* node : nodes) {
    int64_t d = 0;
    for (const std::string& name : names_read(api, node)) {
      const auto producer = index.producer.find(name);
      if (producer == index.producer.end()) continue;  // graph input, initializer or outer-scope value
      const auto pd = depth.find(producer->second);
      if (pd == depth.end()) topological = false;
      else d = std::max(d, pd->second);
    }
    depth[node] = d + (unit_of.count(node) ? 0 : 1);
  }

  std::vector<std::vector<const OrtNode*>> groups;
  // A LayerNormalization taken as the A prologue of several projections (ops/matmul.cc) is a producer of each:
  // listed once, with the first. Those units share its depth (they read it and constants only, with no residual:
  // ops/matmul.cc), so they are in one group.
  auto add_unit = [](std::vector<const OrtNode*>* group, const ClaimedUnit& unit) {
    for (const OrtNode* p : unit.fused_producers)
      if (std::find(group->begin(), group->end(), p) == group->end()) group->push_back(p);
    group->push_back(unit.node);
    group->insert(group->end(), unit.fused_consumers.begin(), unit.fused_consumers.end());
  };
  if (!topological) {  // not expected from Graph_GetNodes; one group per unit is always valid
    for (const ClaimedUnit& unit : units) add_unit(&groups.emplace_back(), unit);
    return groups;
  }
  std::map<int64_t, size_t> group_of_depth;
  for (const ClaimedUnit& unit : units) {
    // A unit's inner values each have one reader inside it, so it is one node to the rest of the graph: its last
    // node's depth (an epilogue's residual may come from deeper than the product's input).
    const OrtNode* last = unit.fused_consumers.empty() ? unit.node : unit.fused_consumers.back();
    const auto [it, fresh] = group_of_depth.try_emplace(depth.at(last), groups.size());
    if (fresh) groups.emplace_back();
    add_unit(&groups[it->second], unit);
  }
  return groups;
}

}  // namespace xdna::graph
