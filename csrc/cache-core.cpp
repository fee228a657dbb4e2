// cache-core.cpp — policy core of the expert cache (see cache-core.h for the algorithm).
#include "cache-core.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <iterator>
#include <limits>
#include <stdexcept>

namespace {

constexpr double NEG_INF = -std::numeric_limits<double>::infinity();
constexpr double POS_INF = std::numeric_limits<double>::infinity();

// log2(2^a + 2^b) without overflow.
double log2_add(double a, double b) {
    if (a == NEG_INF) { return b; }
    if (b == NEG_INF) { return a; }
    const double hi = std::max(a, b);
    const double lo = std::min(a, b);
    return hi + std::log2(1.0 + std::exp2(lo - hi));
}

void require(bool ok, const std::string & message) {
    if (!ok) { throw std::invalid_argument(message); }
}

} // namespace

void cache_config::validate() const {
    require(budget_bytes > 0, "budget_bytes must be > 0");
    require(probation_fraction >= 0.01 && probation_fraction <= 0.9,
            "probation_fraction must be in [0.01, 0.9], got " + std::to_string(probation_fraction));
    require(heat_half_life_steps > 0.0 && std::isfinite(heat_half_life_steps),
            "heat_half_life_steps must be a finite number > 0, got " + std::to_string(heat_half_life_steps));
    require(prefill_weight >= 0.0 && prefill_weight <= 1.0,
            "prefill_weight must be in [0, 1], got " + std::to_string(prefill_weight));
    require(prefetch_min_use >= 0.0 && prefetch_min_use <= 1.0,
            "prefetch_min_use must be in [0, 1], got " + std::to_string(prefetch_min_use));
    require(prefetch_min_precision >= 0.0 && prefetch_min_precision <= 1.0,
            "prefetch_min_precision must be in [0, 1], got " + std::to_string(prefetch_min_precision));
    require(layer_floor_fraction >= 0.0 && layer_floor_fraction <= 1.0,
            "layer_floor_fraction must be in [0, 1], got " + std::to_string(layer_floor_fraction));
    require(eviction == CACHE_EVICTION_SCAN_RESISTANT || eviction == CACHE_EVICTION_LRU || eviction == CACHE_EVICTION_LFU ||
            eviction == CACHE_EVICTION_ADAPTIVE,
            "eviction must be adaptive, lfu, scan_resistant or lru");
}

const char * cache_eviction_name(cache_eviction eviction) {
    switch (eviction) {
        case CACHE_EVICTION_SCAN_RESISTANT: return "scan_resistant";
        case CACHE_EVICTION_LRU:            return "lru";
        case CACHE_EVICTION_LFU:            return "lfu";
        case CACHE_EVICTION_ADAPTIVE:       return "adaptive";
    }
    return "unknown";
}

cache_eviction cache_eviction_from_name(const std::string & name) {
    if (name == "scan_resistant") { return CACHE_EVICTION_SCAN_RESISTANT; }
    if (name == "lru")            { return CACHE_EVICTION_LRU; }
    if (name == "lfu")            { return CACHE_EVICTION_LFU; }
    if (name == "adaptive")       { return CACHE_EVICTION_ADAPTIVE; }
    throw std::invalid_argument("unknown eviction policy '" + name + "' (expected adaptive, lfu, scan_resistant or lru)");
}

cache_policy::cache_policy(int n_layers, int n_experts, std::vector<uint64_t> unit_bytes,
                           const cache_config & config, int min_units_resident)
    : n_layers_(n_layers), n_experts_(n_experts), unit_bytes_(std::move(unit_bytes)), config_(config) {
    require(n_layers > 0, "n_layers must be > 0, got " + std::to_string(n_layers));
    require(n_experts > 0, "n_experts must be > 0, got " + std::to_string(n_experts));
    const size_t n_units = size_t(n_layers) * size_t(n_experts);
    require(unit_bytes_.size() == n_units,
            "unit_bytes has " + std::to_string(unit_bytes_.size()) + " entries, expected n_layers * n_experts = " +
            std::to_string(n_units));
    config_.validate();
    eviction_ = config_.eviction;
    half_life_ = config_.heat_half_life_steps;
    if (config_.eviction == CACHE_EVICTION_ADAPTIVE) {
        candidates_.assign(std::begin(ADAPTIVE_CANDIDATES), std::end(ADAPTIVE_CANDIDATES));
        candidates_[0].half_life_steps = config_.heat_half_life_steps;  // the first: LFU at the configured half-life
        eviction_ = candidates_[0].eviction;
        half_life_ = candidates_[0].half_life_steps;
        shadows_.reserve(candidates_.size());
        for (const adaptive_candidate & c : candidates_) {
            cache_config shadow = config_;
            shadow.eviction = c.eviction;
            shadow.heat_half_life_steps = c.half_life_steps;
            shadow.prefetch = false;
            shadows_.emplace_back(n_layers, n_experts, unit_bytes_, shadow, min_units_resident);
        }
        shadow_score_.assign(shadows_.size(), 0.0);
        shadow_bytes_.assign(shadows_.size(), 0);
    }
    prefill_weight_log2_ = config_.prefill_weight > 0.0 ? std::log2(config_.prefill_weight) : 0.0;
    require(min_units_resident >= 0 && min_units_resident <= n_experts,
            "min_units_resident must be in [0, n_experts], got " + std::to_string(min_units_resident));

    min_units_resident_ = min_units_resident;
    check_budget(config_.budget_bytes);

    segment_.assign(n_units, CACHE_SEGMENT_ABSENT);
    heat_log2_.assign(n_units, NEG_INF);
    pins_.assign(n_units, 0);
    in_access_.assign(n_units, 0);
    load_decode_.assign(n_units, 0);
    prefetched_.assign(n_units, 0);
    probation_pos_.assign(n_units, probation_.end());
    layer_bytes_.assign(size_t(n_layers), 0);
    layer_footprint_.assign(size_t(n_layers), 0);
    for (size_t u = 0; u < n_units; ++u) { layer_footprint_[u / size_t(n_experts)] += unit_bytes_[u]; }
    for (uint64_t bytes : layer_footprint_) { footprint_bytes_ += bytes; }
    expert_counts_.assign(n_units, 0);
    predicted_.assign(size_t(n_layers), {});
    distance_use_.assign(size_t(n_layers) + 1, 1.0);  // optimistic until reads ahead are used or wasted
    selected_scratch_.assign(size_t(n_experts), 0);
    decode_scratch_.assign(size_t(n_experts), 0);
    access_units_.reserve(size_t(n_experts));
}

uint64_t cache_min_budget(const std::vector<uint64_t> & unit_bytes, int n_layers, int n_experts, int min_units_resident,
                          int * layer) {
    uint64_t most = 0;
    for (int il = 0; il < n_layers; ++il) {
        std::vector<uint64_t> sizes(unit_bytes.begin() + size_t(il) * size_t(n_experts),
                                    unit_bytes.begin() + size_t(il + 1) * size_t(n_experts));
        const int k = std::min(min_units_resident, n_experts);
        std::partial_sort(sizes.begin(), sizes.begin() + k, sizes.end(), std::greater<uint64_t>());
        uint64_t need = 0;
        for (int i = 0; i < k; ++i) { need += sizes[size_t(i)]; }
        if (need > most || il == 0) {
            most = need;
            if (layer != nullptr) { *layer = il; }
        }
    }
    return most;
}

// A decode step pins the top-k units of one layer: the budget must hold the largest k.
void cache_policy::check_budget(uint64_t budget_bytes) const {
    require(budget_bytes > 0, "budget_bytes must be > 0");
    int layer = 0;
    const uint64_t need = cache_min_budget(unit_bytes_, n_layers_, n_experts_, min_units_resident_, &layer);
    require(budget_bytes >= need,
            "budget_bytes=" + std::to_string(budget_bytes) + " is smaller than the " +
            std::to_string(min_units_resident_) + " largest experts of layer " + std::to_string(layer) + " (" +
            std::to_string(need) + " bytes) that one decode step selects");
}

void cache_policy::set_budget(uint64_t budget_bytes, cache_plan & plan) {
    plan.clear();
    check_budget(budget_bytes);
    config_.budget_bytes = budget_bytes;
    make_room(0, POS_INF, plan);
    cache_plan ignored;
    for (cache_policy & shadow : shadows_) { shadow.set_budget(budget_bytes, ignored); }
}

void cache_policy::reset_counters() {
    counters_ = cache_counters{};
    for (size_t i = 0; i < shadows_.size(); ++i) { shadows_[i].reset_counters(); shadow_bytes_[i] = 0; }
    std::fill(expert_counts_.begin(), expert_counts_.end(), 0);
}

void cache_policy::end_access() {
    for (int32_t u : access_units_) { in_access_[u] = 0; }
    access_units_.clear();
}

void cache_policy::insert(int32_t unit, cache_segment segment) {
    segment_[unit] = segment;
    layer_bytes_[size_t(unit / n_experts_)] += unit_bytes_[unit];
    if (segment == CACHE_SEGMENT_PROBATION) {
        probation_pos_[unit] = probation_.insert(probation_.end(), unit);
        bytes_probation_ += unit_bytes_[unit];
    } else {
        protected_.insert({heat_log2_[unit], unit});
        bytes_protected_ += unit_bytes_[unit];
    }
}

void cache_policy::remove(int32_t unit) {
    const cache_segment segment = segment_[unit];
    if (segment == CACHE_SEGMENT_ABSENT) { return; }
    layer_bytes_[size_t(unit / n_experts_)] -= unit_bytes_[unit];
    if (segment == CACHE_SEGMENT_PROBATION) {
        probation_.erase(probation_pos_[unit]);
        probation_pos_[unit] = probation_.end();
        bytes_probation_ -= unit_bytes_[unit];
    } else {
        protected_.erase({heat_log2_[unit], unit});
        bytes_protected_ -= unit_bytes_[unit];
    }
    segment_[unit] = CACHE_SEGMENT_ABSENT;
    prefetched_[unit] = 0;
}

// Adds one access worth of heat and applies the segment rule (decode → PROTECTED).
void cache_policy::touch(int32_t unit, bool decode) {
    const bool was_protected = segment_[unit] == CACHE_SEGMENT_PROTECTED;
    heat_set::node_type node;  // a protected unit is re-filed under its new heat in the same set node
    if (was_protected) { node = protected_.extract({heat_log2_[unit], unit}); }
    const bool lfu = eviction_ == CACHE_EVICTION_LFU;
    if (decode || lfu || config_.prefill_weight > 0.0) {
        const double weight_log2 = decode || lfu ? 0.0 : prefill_weight_log2_;
        heat_log2_[unit] = log2_add(heat_log2_[unit], now_ / half_life_ + weight_log2);
    }
    if (eviction_ == CACHE_EVICTION_LRU) {
        if (segment_[unit] == CACHE_SEGMENT_PROBATION) {
            probation_.splice(probation_.end(), probation_, probation_pos_[unit]);
        }
        return;
    }
    if (was_protected) {
        node.value().first = heat_log2_[unit];
        protected_.insert(std::move(node));
    } else if ((decode || lfu) && segment_[unit] == CACHE_SEGMENT_PROBATION) {
        remove(unit);
        insert(unit, CACHE_SEGMENT_PROTECTED);
    }
}

int32_t cache_policy::pick_victim(double max_heat_log2, bool respect_floor) const {
    auto first_in_probation = [&]() -> int32_t {
        for (int32_t u : probation_) {
            if (evictable(u)) { return u; }
        }
        return -1;
    };
    if (eviction_ == CACHE_EVICTION_LRU) { return first_in_probation(); }

    const double budget = double(config_.budget_bytes);
    if (eviction_ == CACHE_EVICTION_LFU) { respect_floor = false; }  // no per-layer floor
    const double floor_bytes = config_.layer_floor_fraction * budget / n_layers_;
    auto coldest_protected = [&]() -> int32_t {
        for (const auto & entry : protected_) {
            if (entry.first >= max_heat_log2) { return -1; }  // ordered by heat: none colder follows
            const int32_t u = entry.second;
            if (!evictable(u)) { continue; }
            if (respect_floor && double(layer_bytes_[size_t(u / n_experts_)] - unit_bytes_[u]) < floor_bytes) {
                continue;
            }
            return u;
        }
        return -1;
    };
    if (eviction_ == CACHE_EVICTION_LFU) {  // PROBATION holds only units never accessed (heat 0)
        const int32_t u = first_in_probation();
        return u >= 0 ? u : coldest_protected();
    }
    const bool probation_over = double(bytes_probation_) > config_.probation_fraction * budget;
    if (probation_over) {
        const int32_t u = first_in_probation();
        return u >= 0 ? u : coldest_protected();
    }
    const int32_t u = coldest_protected();
    return u >= 0 ? u : first_in_probation();
}

bool cache_policy::make_room(uint64_t need, double max_heat_log2, cache_plan & plan) {
    while (resident_bytes() + need > config_.budget_bytes) {
        int32_t victim = pick_victim(max_heat_log2, /*respect_floor*/ true);
        if (victim < 0) { victim = pick_victim(max_heat_log2, /*respect_floor*/ false); }
        if (victim < 0) { return false; }
        counters_.n_evictions++;
        counters_.bytes_evicted += unit_bytes_[victim];
        if (prefetched_[victim]) { note_prefetch(victim, false); }
        remove(victim);
        plan.evict.push_back(victim);
    }
    return true;
}

void cache_policy::score_prediction(int layer) {
    std::vector<int32_t> & predicted = predicted_[size_t(layer)];
    if (predicted.empty()) { return; }
    uint64_t correct = 0;
    for (int32_t e : predicted) { correct += selected_scratch_[size_t(e)]; }
    counters_.n_predicted += predicted.size();
    counters_.n_predicted_correct += correct;
    precision_avg_ = 0.95 * precision_avg_ + 0.05 * double(correct) / double(predicted.size());
    counters_.n_selected_predicted += access_units_.size();
    predicted.clear();
}

void cache_policy::begin_step(int n_decode_rows, int n_prefill_rows) {
    for (cache_policy & shadow : shadows_) { shadow.begin_step(n_decode_rows, n_prefill_rows); }
    explicit_steps_ = true;
    now_ += 1.0;
    counters_.n_steps++;
    step_decode_ = n_prefill_rows == 0;
    counters_.n_tokens_decode += uint64_t(std::max(0, n_decode_rows));
    counters_.n_tokens_prefill += uint64_t(std::max(0, n_prefill_rows));
    last_layer_ = -1;
}

void cache_policy::access(int layer, const int32_t * ids, int n_tokens, int k, cache_plan & plan,
                          const uint8_t * row_decode) {
    if (!shadows_.empty() && config_.budget_bytes < footprint_bytes_) {  // every rule reads alike when all fits
        for (cache_policy & shadow : shadows_) {
            shadow.access(layer, ids, n_tokens, k, shadow_plan_, row_decode);
            shadow.settle(shadow_plan_);  // no pins or reads in flight: trimmed at once
        }
        if (shadows_[0].counters().n_steps >= next_adapt_step_) { adapt(); }
    }
    plan.clear();
    end_access();
    if (layer < 0 || layer >= n_layers_ || n_tokens <= 0 || k <= 0) {
        counters_.n_invalid_ids += uint64_t(std::max(0, n_tokens)) * uint64_t(std::max(0, k));
        return;
    }
    // Without begin_step, a new ubatch starts when the layer index does not increase (DESIGN.md:
    // the last layer sees fewer tokens, so the phase is fixed by the ubatch's first access).
    if (!explicit_steps_ && (layer <= last_layer_ || last_layer_ < 0)) {
        now_ += 1.0;
        counters_.n_steps++;
        step_decode_ = n_tokens == 1;
        (step_decode_ ? counters_.n_tokens_decode : counters_.n_tokens_prefill) += uint64_t(n_tokens);
    }
    last_layer_ = layer;
    bool any_decode = row_decode == nullptr && step_decode_;

    const int32_t base = int32_t(layer) * n_experts_;
    for (int i = 0; i < n_tokens * k; ++i) {
        const int32_t e = ids[i];
        if (e < 0 || e >= n_experts_) { counters_.n_invalid_ids++; continue; }
        expert_counts_[size_t(base + e)]++;
        if (!selected_scratch_[size_t(e)]) {
            selected_scratch_[size_t(e)] = 1;
            access_units_.push_back(base + e);
        }
        if (row_decode != nullptr && row_decode[i / k]) {
            decode_scratch_[size_t(e)] = 1;
            any_decode = true;
        }
    }
    score_prediction(layer);

    uint64_t need = 0;
    for (int32_t u : access_units_) {
        in_access_[u] = 1;
        selected_scratch_[size_t(u - base)] = 0;
        const bool decode = row_decode != nullptr ? decode_scratch_[size_t(u - base)] != 0 : step_decode_;
        decode_scratch_[size_t(u - base)] = 0;
        if (is_resident(u)) {
            (decode ? counters_.n_hits_decode : counters_.n_hits_prefill)++;
            if (prefetched_[u]) {
                counters_.n_prefetch_used++;
                note_prefetch(u, true);
            }
            touch(u, decode);
        } else {
            (decode ? counters_.n_misses_decode : counters_.n_misses_prefill)++;
            (decode ? counters_.bytes_read_decode : counters_.bytes_read_prefill) += unit_bytes_[u];
            need += unit_bytes_[u];
            plan.load.push_back(u);
            load_decode_[u] = uint8_t(decode);
        }
    }
    // A prefill streams through PROBATION: while PROBATION is over its share, the units it
    // brings in may only displace PROBATION units (transiently exceeding the budget if all
    // of them are pinned), never the decode working set.
    const bool probation_over = double(bytes_probation_) >= config_.probation_fraction * double(config_.budget_bytes);
    const bool scan = !any_decode && eviction_ == CACHE_EVICTION_SCAN_RESISTANT && probation_over;
    make_room(need, scan ? NEG_INF : POS_INF, plan);
    for (int32_t u : plan.load) {
        const bool decode = row_decode != nullptr ? load_decode_[u] != 0 : step_decode_;
        const bool protect = eviction_ == CACHE_EVICTION_LFU ||
                             (decode && eviction_ == CACHE_EVICTION_SCAN_RESISTANT);
        insert(u, protect ? CACHE_SEGMENT_PROTECTED : CACHE_SEGMENT_PROBATION);
        touch(u, decode);
        load_decode_[u] = 0;
    }
}

void cache_policy::predict(int layer, const int32_t * experts, int n, cache_plan & plan, int distance) {
    plan.clear();
    if (layer < 0 || layer >= n_layers_) { return; }
    distance = std::min(std::max(distance, 1), std::min(n_layers_, 255));
    std::vector<int32_t> & predicted = predicted_[size_t(layer)];
    predicted.clear();
    for (int i = 0; i < n; ++i) {
        if (experts[i] >= 0 && experts[i] < n_experts_) { predicted.push_back(experts[i]); }
    }
    if (!config_.prefetch) { return; }
    if (distance > 1 && distance_use_[size_t(distance)] < config_.prefetch_min_use) { return; }
    if (distance == 1 && precision_avg_ < config_.prefetch_min_precision) { return; }
    const int32_t base = int32_t(layer) * n_experts_;
    for (int32_t e : predicted) {
        const int32_t u = base + e;
        if (is_resident(u)) { continue; }
        // a speculative read may displace PROBATION units and PROTECTED units gone cold (heat
        // below one access), never the working set
        if (!make_room(unit_bytes_[u], now_ / half_life_, plan)) { break; }
        insert(u, CACHE_SEGMENT_PROBATION);
        in_access_[u] = 1;  // not a victim for the rest of this prediction (it is in plan.load)
        prefetched_[u] = uint8_t(distance);
        counters_.n_prefetch_issued++;
        counters_.bytes_prefetched += unit_bytes_[u];
        (step_decode_ ? counters_.bytes_read_decode : counters_.bytes_read_prefill) += unit_bytes_[u];
        plan.load.push_back(u);
    }
    for (int32_t u : plan.load) { in_access_[u] = 0; }
    for (int32_t u : access_units_) { in_access_[u] = 1; }  // the access in progress stays pinned
}

void cache_policy::settle(cache_plan & plan) {
    plan.clear();
    end_access();
    make_room(0, POS_INF, plan);
}

bool cache_policy::admit_resident(int32_t unit) {
    for (cache_policy & shadow : shadows_) { shadow.admit_resident(unit); }
    if (is_resident(unit)) { return true; }
    if (resident_bytes() + unit_bytes_[unit] > config_.budget_bytes) { return false; }
    insert(unit, CACHE_SEGMENT_PROBATION);
    return true;
}

void cache_policy::forget(int32_t unit) { remove(unit); }

// A unit read ahead was selected (used) or left unselected (evicted first): the moving average
// of the reads made at its distance, which decides whether reads that far ahead continue.
void cache_policy::note_prefetch(int32_t unit, bool used) {
    double & use = distance_use_[prefetched_[unit]];
    use = 0.95 * use + 0.05 * (used ? 1.0 : 0.0);
    prefetched_[unit] = 0;
}

void cache_policy::warmth(std::vector<uint8_t> & resident, std::vector<float> & heat) const {
    const size_t n_units = segment_.size();
    resident.resize(n_units);
    heat.resize(n_units);
    const double now_log2 = now_ / half_life_;
    for (size_t u = 0; u < n_units; ++u) {
        resident[u] = segment_[u] != CACHE_SEGMENT_ABSENT;
        heat[u] = heat_log2_[u] == NEG_INF ? 0.0f : float(std::exp2(heat_log2_[u] - now_log2));
    }
}

// Adaptive eviction: every ADAPT_EVERY_STEPS steps, each candidate's bytes read since the last look (its shadow
// replays this policy's own accesses, metadata only) join a decaying score; the live policy takes the leader's
// rule when it read at least ADAPT_MARGIN fewer bytes than the rule in use.
void cache_policy::adapt() {
    next_adapt_step_ = shadows_[0].counters().n_steps + ADAPT_EVERY_STEPS;
    size_t best = 0;
    for (size_t i = 0; i < shadows_.size(); ++i) {
        const cache_counters & c = shadows_[i].counters();
        const uint64_t bytes = c.bytes_read_decode + c.bytes_read_prefill;
        shadow_score_[i] = ADAPT_DECAY * shadow_score_[i] + double(bytes - shadow_bytes_[i]);
        shadow_bytes_[i] = bytes;
        if (shadow_score_[i] < shadow_score_[best]) { best = i; }
    }
    if (best != candidate_ && shadow_score_[best] < (1.0 - ADAPT_MARGIN) * shadow_score_[candidate_]) {
        candidate_ = best;
        switch_rule(candidates_[best].eviction, candidates_[best].half_life_steps);
        counters_.n_policy_switches++;
    }
}

// Re-files every resident unit under another rule: out under the old keys, heat re-based on the new half-life
// (its value now kept), in again; LRU order follows heat, and under LFU a unit with heat is PROTECTED.
void cache_policy::switch_rule(cache_eviction eviction, double half_life) {
    struct filed { double heat; int32_t unit; cache_segment segment; uint8_t prefetched; };
    std::vector<filed> units;  // the resident units, coldest first: the LRU list's front
    for (int32_t u = 0; u < int32_t(segment_.size()); ++u) {
        if (segment_[u] != CACHE_SEGMENT_ABSENT) { units.push_back({heat_log2_[u], u, segment_[u], prefetched_[u]}); }
    }
    std::sort(units.begin(), units.end(), [](const filed & a, const filed & b) {
        return a.heat != b.heat ? a.heat < b.heat : a.unit < b.unit;
    });
    for (const filed & f : units) { remove(f.unit); }  // out under the old keys
    for (double & heat : heat_log2_) {
        if (heat != NEG_INF) { heat += now_ / half_life - now_ / half_life_; }
    }
    eviction_ = eviction;
    half_life_ = half_life;
    for (const filed & f : units) {
        cache_segment segment = f.segment;
        if (eviction == CACHE_EVICTION_LRU) {
            segment = CACHE_SEGMENT_PROBATION;
        } else if (eviction == CACHE_EVICTION_LFU) {
            segment = heat_log2_[f.unit] == NEG_INF ? CACHE_SEGMENT_PROBATION : CACHE_SEGMENT_PROTECTED;
        }
        insert(f.unit, segment);
        prefetched_[f.unit] = f.prefetched;
    }
}
