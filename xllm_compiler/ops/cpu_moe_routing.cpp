// MoE routing on the host for the CPU's packed experts (ops/moe.py): route_topk's float32 softmax, top-k
// and renormalisation in one pass over each token's router logits, and count_routed's counting. As
// composites they are about ten small tensor ops a layer (softmax, topk, a division; a comparison, a
// repeat, an index_add and a sum for the counts), each a dispatcher call that costs more than the
// arithmetic at decode: 1 ms of a 9.7 ms Mixtral step at batch 1 (docs/performance.md).
//
// The softmax is torch's CPU one: exp(x - max) times the reciprocal of their sum (std::exp here, SLEEF's
// there: the probabilities may differ in the last bit, equal logits give equal ones on both sides). Top-k
// is torch.topk's CPU selection (ATen's topk_impl_loop): the same partial sort, or nth_element and a sort
// of the first k - 1, over (probability, id) pairs in id order with its comparator, so that tied experts
// (bfloat16 logits tie often) come out in transformers' order. Renormalising divides by the picked sum.
#include <torch/extension.h>
#include "cpu_replay.h"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

namespace {

template <typename T>
void route_rows(const T* logits, int64_t tokens, int64_t experts, int64_t top_k, bool renormalise, float* weights,
                int64_t* ids) {
  using Entry = std::pair<float, int64_t>;
  const auto larger = [](const Entry& x, const Entry& y) {
    return (std::isnan(x.first) && !std::isnan(y.first)) || x.first > y.first;
  };
  std::vector<Entry> queue(experts);
  for (int64_t t = 0; t < tokens; ++t) {
    const T* row = logits + t * experts;
    float best = -INFINITY;
    for (int64_t e = 0; e < experts; ++e) best = std::max(best, static_cast<float>(row[e]));
    float total = 0.f;
    for (int64_t e = 0; e < experts; ++e) {
      queue[e] = {std::exp(static_cast<float>(row[e]) - best), e};
      total += queue[e].first;
    }
    const float inverse = 1.f / total;
    for (auto& entry : queue) entry.first *= inverse;
    if (top_k * 64 <= experts) {
      std::partial_sort(queue.begin(), queue.begin() + top_k, queue.end(), larger);
    } else {
      std::nth_element(queue.begin(), queue.begin() + top_k - 1, queue.end(), larger);
      std::sort(queue.begin(), queue.begin() + top_k - 1, larger);
    }
    float chosen = 0.f;
    for (int64_t k = 0; k < top_k; ++k) {
      weights[t * top_k + k] = queue[k].first;
      ids[t * top_k + k] = queue[k].second;
      chosen += queue[k].first;
    }
    if (renormalise)
      for (int64_t k = 0; k < top_k; ++k) weights[t * top_k + k] /= chosen;
  }
}

// route_topk(router_logits [T, E], top_k, renormalise) -> (weights [T, k] float32, ids [T, k] int64).
std::tuple<torch::Tensor, torch::Tensor> route_topk(torch::Tensor router_logits, int64_t top_k, bool renormalise) {
  TORCH_CHECK(router_logits.dim() == 2, "route_topk: router_logits must be [tokens, experts]");
  const int64_t tokens = router_logits.size(0), experts = router_logits.size(1);
  TORCH_CHECK(top_k >= 1 && top_k <= experts, "route_topk: top_k must be in [1, experts]");
  auto logits = router_logits.contiguous();
  auto weights = at::empty({tokens, top_k}, logits.options().dtype(at::kFloat));
  auto ids = at::empty({tokens, top_k}, logits.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "route_topk", [&] {
    route_rows<scalar_t>(logits.data_ptr<scalar_t>(), tokens, experts, top_k, renormalise, weights.data_ptr<float>(),
                         ids.data_ptr<int64_t>());
  });
  return {weights, ids};
}

// count_routed: expert_counts [E + 1] (int64) += each real token's routed experts, and its last entry the real
// tokens; a token whose slot is ``pad_slot`` is padding and counts nothing.
void count_routed(torch::Tensor topk_ids, torch::Tensor expert_counts, torch::Tensor slot_mapping, int64_t pad_slot) {
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.scalar_type() == at::kLong, "count_routed: topk_ids must be int64 [T, k]");
  TORCH_CHECK(expert_counts.dim() == 1 && expert_counts.scalar_type() == at::kLong && expert_counts.is_contiguous(),
              "count_routed: expert_counts must be a contiguous int64 [E + 1]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == topk_ids.size(0),
              "count_routed: one int64 slot per token");
  auto ids = topk_ids.contiguous();
  auto slots = slot_mapping.contiguous();
  const int64_t tokens = ids.size(0), top_k = ids.size(1), experts = expert_counts.numel() - 1;
  const int64_t *id = ids.data_ptr<int64_t>(), *slot = slots.data_ptr<int64_t>();
  int64_t* counts = expert_counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens * top_k; ++i)  // all checked before any is counted
    TORCH_CHECK(id[i] >= 0 && id[i] < experts, "count_routed: an expert id out of range");
  for (int64_t t = 0; t < tokens; ++t) {
    if (slot[t] == pad_slot) continue;
    for (int64_t k = 0; k < top_k; ++k) ++counts[id[t * top_k + k]];
    ++counts[experts];
  }
}

}  // namespace

void register_moe_routing(pybind11::module& m) {
  namespace py = pybind11;
  xllm_replay::def_kernel(m, "route_topk", &route_topk, py::arg("router_logits"), py::arg("top_k"),
                          py::arg("renormalise"));
  xllm_replay::def_kernel(m, "count_routed", &count_routed, py::arg("topk_ids"), py::arg("expert_counts"),
                          py::arg("slot_mapping"), py::arg("pad_slot"));
}
