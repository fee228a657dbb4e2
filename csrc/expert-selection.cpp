// expert-selection.cpp — cache-aware selection (see expert-selection.h).
#include "expert-selection.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

void selection_config::validate() const {
    if (mode != SELECTION_EXACT && mode != SELECTION_CACHE_AWARE) {
        throw std::invalid_argument("selection mode must be exact or cache-aware, got " + std::to_string(int(mode)));
    }
    if (!(max_changed_weight >= 0.0 && max_changed_weight <= 1.0)) {
        throw std::invalid_argument("max_changed_weight must be in [0, 1], got " + std::to_string(max_changed_weight));
    }
    if (!(min_score_ratio >= 0.0 && min_score_ratio <= 1.0)) {
        throw std::invalid_argument("min_score_ratio must be in [0, 1], got " + std::to_string(min_score_ratio));
    }
}

expert_selector::expert_selector(int n_experts)
    : n_experts_(n_experts), available_(size_t(std::max(n_experts, 0)), 0), taken_(size_t(std::max(n_experts, 0)), 0) {}

void expert_selector::begin(const uint8_t * available) {
    std::copy(available, available + n_experts_, available_.begin());
}

selection_change expert_selector::select(const selection_config & config, const float * gate, int32_t * ids, int k,
                                         uint8_t * skipped) {
    selection_change change;
    std::fill(skipped, skipped + k, uint8_t(0));
    double total = 0.0;
    missing_.clear();
    for (int j = 0; j < k; ++j) {
        const int32_t e = ids[j];
        if (e < 0 || e >= n_experts_) { return change; }  // an id llama.cpp never gives: leave the row alone
        const double g = double(gate[e]);
        if (!(g >= 0.0) || !std::isfinite(g)) { return change; }
        total += g;
        if (!available_[size_t(e)]) { missing_.push_back(j); }
    }
    if (missing_.empty() || !(total > 0.0)) {
        for (int j = 0; j < k; ++j) { available_[size_t(ids[j])] = 1; }
        return change;
    }
    std::sort(missing_.begin(), missing_.end(), [&](int32_t a, int32_t b) {
        return gate[ids[a]] != gate[ids[b]] ? gate[ids[a]] < gate[ids[b]] : a < b;
    });
    if (++stamp_ == 0) {  // the stamps wrapped round: no old mark may pass for this row's
        std::fill(taken_.begin(), taken_.end(), 0u);
        stamp_ = 1;
    }
    for (int j = 0; j < k; ++j) { taken_[size_t(ids[j])] = stamp_; }
    const double budget = config.max_changed_weight * total;
    double changed = 0.0;
    for (int32_t slot : missing_) {
        const int32_t e = ids[slot];
        const double g = double(gate[e]);
        if (changed + g > budget) { break; }
        int32_t best = -1;
        for (int32_t c = 0; c < n_experts_; ++c) {
            if (available_[size_t(c)] && taken_[size_t(c)] != stamp_ && std::isfinite(gate[c]) &&
                (best < 0 || gate[c] > gate[best])) {
                best = c;
            }
        }
        if (best < 0) { break; }  // nothing resident outside the selection
        changed += g;
        taken_[size_t(best)] = stamp_;
        ids[slot] = best;
        if (double(gate[best]) >= config.min_score_ratio * g) {
            change.replaced++;
        } else {
            skipped[slot] = 1;
            change.skipped++;
        }
    }
    for (int j = 0; j < k; ++j) { available_[size_t(ids[j])] = 1; }  // kept or stood in: there for the next rows
    return change;
}
