// expert-selection.h — cache-aware selection: changing a token's experts toward the resident ones, within bounds.
//
// Policy core: std only (no Python, no ggml/llama). The llama.cpp glue calls it from the eval callback at a
// layer's top-k node, before the layer's expert mat-muls run and before the cache reads what is missing.
//
// One token's selection ids[k] (llama.cpp's top-k) and its gate values g[n_experts]: non-negative numbers
// proportional to the weight each expert would get among the selected (softmax or sigmoid probabilities; for
// families whose weights are a softmax over the selected logits, exp(logit - max)). A selected expert is
// MISSING when it is not `available` (not resident, not read for an earlier token of this access, and not readable
// without an eviction: the caller counts an expert the cache has room for as available).
// Rule, with share(e) = g[e] / sum of g over the original selection:
//   * missing experts are taken smallest share first; each may be changed while the shares changed so far plus
//     its own stay <= max_changed_weight (changing stops at the first that would exceed it);
//   * the stand-in is the available expert outside the selection with the highest g;
//   * g[stand-in] >= min_score_ratio * g[missing]: the missing expert is REPLACED by it (it computes with its own
//     router weight); otherwise the missing expert is SKIPPED: its slot takes the stand-in's id too (nothing to
//     read) and the caller sets that slot's weight to zero (the family's renormalisation, if any, then spreads the
//     token's weight over the experts left).
// The result for every token depends only on its own scores, the order of the rows, and what was available when
// the access began: the same inputs give the same selection.
#pragma once

#include <cstdint>
#include <vector>

enum selection_mode : int32_t {
    SELECTION_EXACT       = 0,  // llama.cpp's top-k, untouched (bit-identical output)
    SELECTION_CACHE_AWARE = 1,
};

struct selection_config {
    selection_mode mode       = SELECTION_EXACT;
    double max_changed_weight = 0.3;  // [0, 1]
    double min_score_ratio    = 0.5;  // [0, 1]

    // Throws std::invalid_argument naming the first bad field.
    void validate() const;
};

// What one token's call changed.
struct selection_change {
    int replaced = 0;
    int skipped  = 0;
};

class expert_selector {
public:
    explicit expert_selector(int n_experts);

    // Begins one layer's access: available[e] != 0 where expert e is resident (or being read ahead).
    void begin(const uint8_t * available);

    // One token (one row of the access): rewrites ids[k] in place, sets skipped[j] = 1 where slot j's weight must
    // be set to zero (0 elsewhere). Experts this token keeps although missing become available for the rows after
    // it (they will be read once for the whole access).
    selection_change select(const selection_config & config, const float * gate, int32_t * ids, int k, uint8_t * skipped);

private:
    int n_experts_;
    std::vector<uint8_t> available_;  // [n_experts]
    std::vector<uint32_t> taken_;     // [n_experts] == stamp_: in the current token's selection
    uint32_t stamp_ = 0;              // one per token with a missing expert
    std::vector<int32_t> missing_;    // slots of the current token's missing experts
};
