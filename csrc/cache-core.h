// cache-core.h — policy core of the expert cache: which (layer, expert) units are resident.
//
// Pure decisions, no I/O: std + nothing else (no Python, no ggml/llama). The llama.cpp glue
// (llama-glue.h) and trace replay (routing-trace.h) drive it the same way, so a recorded
// routing trace reproduces exactly the decisions made while the model ran.
//
// Unit: all weight bytes of one expert of one layer (gate, up, down slices together), keyed
// by id = layer * n_experts + expert. Each unit has a footprint in bytes (its byte ranges
// rounded out to whole pages, so the resident footprint can never exceed the budget).
//
// CACHE_EVICTION_ADAPTIVE (the default): each policy replays its own accesses through a shadow of each of
// ADAPTIVE_CANDIDATES (metadata only: the same accesses, steps and budget, no reads ahead) and every
// ADAPT_EVERY_STEPS steps takes the rule of the one that read the fewest bytes lately, if it read ADAPT_MARGIN
// fewer than the rule in use (its resident units re-filed under the new rule, nothing read or dropped).
// CACHE_EVICTION_LFU: frequency with ageing — every unit ordered by heat (below; each access weighs 1, prefill or
// decode), no segments, no per-layer floor; the coldest goes. Units read ahead and never selected (heat 0) go
// first. With a half-life of 8 steps it read the fewest expert bytes of every fixed rule here on both trained
// models at every budget of 10-80 % (0.82-0.95x LRU's at a third), but up to 1.6x LRU's on the full-size
// preset's sliding windows at small budgets, where recency wins: hence the adaptive choice (docs/policies.md).
// CACHE_EVICTION_SCAN_RESISTANT — a 2Q/ARC-style split with frequency-aware ordering:
//   * Every access is one layer's top-k selection for one evaluated ubatch. A ubatch of one
//     token is a DECODE access; more than one token is PREFILL (DESIGN.md: a prompt of a few
//     hundred tokens touches 65-80 % of each layer's experts, so a prefill is a scan).
//   * heat(u) = sum over accesses of weight * 2^-(now - t_access) / half_life, with weight 1 for
//     decode and `prefill_weight` for prefill. Stored as its log2 with the clock folded in
//     (key = log2 sum 2^(t/half_life)), so ordering by key never needs re-sorting as time passes.
//   * Segments: units brought in by a prefill or a prefetch enter PROBATION (FIFO). A decode
//     access moves a unit to PROTECTED (ordered by heat). Victims come from PROBATION while it
//     holds more than `probation_fraction` of the budget (or PROTECTED is exhausted), else the
//     coldest PROTECTED unit; so a prefill streams through PROBATION without flushing the
//     decode working set.
//   * Per-layer fairness: a layer holding less than `layer_floor_fraction` of its fair share
//     (budget / n_layers) loses no PROTECTED unit while another layer can give one up.
//   * The units of the access in progress are pinned, as are units with I/O in flight; a
//     selection larger than the budget (a big prefill layer) is admitted and trimmed by the
//     following accesses or by `settle()`.
//   * Prefetch (`predict`) reads predicted units into PROBATION; it may displace PROBATION units
//     and PROTECTED units gone cold (heat below one access), never the working set.
// CACHE_EVICTION_LRU: one recency list, no segments, no heat — the baseline to beat.
//
// Knobs (cache_config):
//   budget_bytes          bytes of expert footprint allowed resident           > 0, required
//   probation_fraction    target share of the budget for PROBATION            [0.01, 0.9], 0.1
//   heat_half_life_steps  half-life of heat, in steps (one step = one ubatch)  > 0, 8
//   prefill_weight        heat of a prefill access relative to a decode one    [0, 1], 1
// The scan-resistant rule's segments and floor cost bytes on a trained model (its prompt experts are
// the ones its answer uses: prefill is not a scan there); with it, a half-life of 2 is its best.
//   layer_floor_fraction  protected share of a layer's fair share              [0, 1], 0.5
//   eviction              CACHE_EVICTION_ADAPTIVE (default) | CACHE_EVICTION_LFU | CACHE_EVICTION_SCAN_RESISTANT |
//                         CACHE_EVICTION_LRU
//   prefetch_min_use      predictions made d > 1 layers ahead are read ahead only while at least  [0, 1], 0.5
//                         this share of the units read ahead at distance d were selected before
//                         being evicted (a moving average per distance, starting at 1); the next
//                         layer's predictions are always acted on. On the trained model, reads 2-3
//                         layers ahead were used 32 % / 22 % of the time and added almost no hits
//                         for twice the bytes; on the synthetic models they are used far more.
//   prefetch_min_precision  the next layer's predictions are read ahead only while this share of the  [0, 1], 0.8
//                         experts predicted were then selected (a moving average of every scored
//                         prediction, starting at 1; predictions are scored whether read or not, so
//                         reading resumes when they improve). A read ahead that is not used costs its
//                         bytes and evicts a unit: on the synthetic presets 96-97 % of predictions
//                         were selected, on the trained models 63 % (the live precision bench engine's
//                         policy tables print), where reading ahead read more bytes than reading on demand.
//   prefetch              act on predictions (they are scored either way)      true
#pragma once

#include "telemetry.h"

#include <cstdint>
#include <list>
#include <set>
#include <string>
#include <utility>
#include <vector>

enum cache_eviction {
    CACHE_EVICTION_SCAN_RESISTANT = 0,
    CACHE_EVICTION_LRU            = 1,
    CACHE_EVICTION_LFU            = 2,
    CACHE_EVICTION_ADAPTIVE       = 3,
};

// The rules CACHE_EVICTION_ADAPTIVE chooses among, per node, from its own accesses (shadow replays of each,
// metadata only); the first is where it starts. LFU with a half-life of 8 steps read the fewest bytes on trained
// routing; recency (LRU, or LFU forgetting in 2 steps) where a working set slides, as on the full-size preset's
// sliding-window routing at small budgets (docs/policies.md).
struct adaptive_candidate {
    cache_eviction eviction;
    double half_life_steps;
};
inline constexpr adaptive_candidate ADAPTIVE_CANDIDATES[] = {
    {CACHE_EVICTION_LFU, 8.0},  // (at the configured heat_half_life_steps, 8 by default)
    {CACHE_EVICTION_LFU, 2.0},
    {CACHE_EVICTION_LRU, 8.0},
};
inline constexpr uint64_t ADAPT_EVERY_STEPS = 32;  // steps between looks at the candidates' bytes
inline constexpr double ADAPT_DECAY = 0.9;         // weight of the older windows in a candidate's score
inline constexpr double ADAPT_MARGIN = 0.10;       // a candidate must read this share fewer bytes to take over

struct cache_config {
    uint64_t       budget_bytes         = 0;
    double         probation_fraction   = 0.1;
    double         heat_half_life_steps = 8.0;
    double         prefill_weight       = 1.0;
    double         layer_floor_fraction = 0.5;
    cache_eviction eviction             = CACHE_EVICTION_ADAPTIVE;
    bool           prefetch             = true;
    double         prefetch_min_use     = 0.5;
    double         prefetch_min_precision = 0.8;

    // Throws std::invalid_argument naming the first bad field.
    void validate() const;
};

// What the caller must do after an access or a prediction, in this order:
// drop `evict`, then read `load`. Ids are unit ids. Reused between calls (no allocation
// once the vectors have grown to the largest selection).
struct cache_plan {
    std::vector<int32_t> evict;
    std::vector<int32_t> load;
    void clear() { evict.clear(); load.clear(); }
};

enum cache_segment : uint8_t {
    CACHE_SEGMENT_ABSENT    = 0,
    CACHE_SEGMENT_PROBATION = 1,
    CACHE_SEGMENT_PROTECTED = 2,
};

class cache_policy {
public:
    // unit_bytes: footprint of every unit, size n_layers * n_experts (0 for an expert the
    // file does not have). Throws std::invalid_argument if the shape or config is bad, or if
    // the budget cannot hold `min_units_resident` units of the largest layer (the top-k of
    // one decode step must fit).
    cache_policy(int n_layers, int n_experts, std::vector<uint64_t> unit_bytes,
                 const cache_config & config, int min_units_resident);

    // Starts a step (one ubatch) whose tokens the caller knows: n_decode_rows tokens of sequences
    // that decode (one token each) and n_prefill_rows prompt tokens. From the first call on, steps
    // start only here; a policy never told (trace replay) starts one when the layer does not increase.
    void begin_step(int n_decode_rows, int n_prefill_rows);

    // One layer's selection for one ubatch: ids is [n_tokens x k] row-major (token-major),
    // values in [0, n_experts); out-of-range ids are counted in telemetry and ignored.
    // row_decode (optional, [n_tokens]): 1 where the token decodes; a unit selected by any
    // decoding token is a decode access (a batch mixes both). Without it, the step's phase
    // (a ubatch of one token decodes) applies to every unit.
    // Fills plan with the units to drop and the missing units to read (demand).
    void access(int layer, const int32_t * ids, int n_tokens, int k, cache_plan & plan,
                const uint8_t * row_decode = nullptr);

    // A prediction of the experts the next access of `layer` will select (unique ids), made
    // `distance` layers before it. Scored against that access (precision / recall); when
    // config.prefetch (and, beyond the next layer, while reads ahead at this distance have been
    // used often enough: prefetch_min_use), fills plan with predicted units to read ahead and
    // the units to drop for them (PROBATION units and PROTECTED units gone cold, never the
    // working set).
    void predict(int layer, const int32_t * experts, int n, cache_plan & plan, int distance = 1);

    // Units with I/O in flight must not be dropped: pin on submit, unpin on completion.
    void pin(int32_t unit)   { pins_[unit]++; }
    void unpin(int32_t unit) { if (pins_[unit] > 0) pins_[unit]--; }

    // Ends the current access (unpins its units) and drops units until within budget.
    void settle(cache_plan & plan);

    // Marks units as resident without an access (establishing the budget at attach time:
    // pages already in memory). Returns false once the budget is full (unit not admitted).
    bool admit_resident(int32_t unit);

    // A unit left memory behind the policy's back (e.g. the kernel reclaimed it).
    void forget(int32_t unit);

    // A new budget; fills plan with the units to drop if it shrank (pinned units stay, and are
    // trimmed by later accesses). Throws std::invalid_argument, as the constructor does, if
    // it cannot hold the `min_units_resident` largest units of a layer.
    void set_budget(uint64_t budget_bytes, cache_plan & plan);

    int  n_layers()  const { return n_layers_; }
    int  n_experts() const { return n_experts_; }
    bool is_resident(int32_t unit) const { return segment_[unit] != CACHE_SEGMENT_ABSENT; }
    uint64_t unit_bytes(int32_t unit) const { return unit_bytes_[unit]; }
    uint64_t resident_bytes() const { return bytes_probation_ + bytes_protected_; }
    // Every unit of the layer is resident (nothing to predict or prefetch there).
    bool layer_all_resident(int layer) const { return layer_bytes_[size_t(layer)] == layer_footprint_[size_t(layer)]; }
    // Units selected by the access in progress (unique), until the next access or settle().
    const std::vector<int32_t> & access_units() const { return access_units_; }
    const cache_config &   config()   const { return config_; }
    const cache_counters & counters() const { return counters_; }
    void reset_counters();
    // Selections that cache-aware selection changed (expert-selection.h), counted with the rest.
    void count_selection_changes(uint64_t replaced, uint64_t skipped) {
        counters_.n_selections_replaced += replaced;
        counters_.n_selections_skipped += skipped;
    }

    // Snapshot for the warmth report: resident flag and current heat of every unit.
    void warmth(std::vector<uint8_t> & resident, std::vector<float> & heat) const;

    // Selections per unit over every token evaluated (prompt and generated), [L x E].
    const std::vector<uint64_t> & expert_counts() const { return expert_counts_; }

private:
    struct heat_key_less {
        bool operator()(const std::pair<double, int32_t> & a, const std::pair<double, int32_t> & b) const {
            return a.first != b.first ? a.first < b.first : a.second < b.second;
        }
    };
    using heat_set = std::set<std::pair<double, int32_t>, heat_key_less>;

    void touch(int32_t unit, bool decode);
    void insert(int32_t unit, cache_segment segment);
    void remove(int32_t unit);
    // Drops victims until `need` more bytes fit. PROTECTED units with heat_log2 >= max_heat_log2
    // are not eligible (-inf: PROBATION only; +inf: any). False if nothing could be dropped.
    bool make_room(uint64_t need, double max_heat_log2, cache_plan & plan);
    int32_t pick_victim(double max_heat_log2, bool respect_floor) const;
    bool evictable(int32_t unit) const { return pins_[unit] == 0 && !in_access_[unit]; }
    void end_access();
    void score_prediction(int layer);
    void check_budget(uint64_t budget_bytes) const;
    void note_prefetch(int32_t unit, bool used);
    void adapt();
    void switch_rule(cache_eviction eviction, double half_life);

    int n_layers_;
    int n_experts_;
    std::vector<uint64_t> unit_bytes_;
    cache_config config_;
    cache_counters counters_;

    cache_eviction eviction_ = CACHE_EVICTION_LFU;  // the rule in use (adaptive: the candidate chosen)
    double half_life_ = 8.0;               // its heat half-life, in steps
    std::vector<adaptive_candidate> candidates_;  // adaptive: ADAPTIVE_CANDIDATES, the first at the configured half-life
    size_t candidate_ = 0;                 // adaptive: the one in use
    std::vector<cache_policy> shadows_;    // adaptive: one per candidate, fed the same accesses
    std::vector<double> shadow_score_;     // [candidates] decaying bytes read
    std::vector<uint64_t> shadow_bytes_;   // [candidates] bytes read at the last look
    uint64_t next_adapt_step_ = ADAPT_EVERY_STEPS;
    cache_plan shadow_plan_;
    double now_ = 0.0;                     // steps, advanced once per ubatch (at its first access)
    int last_layer_ = -1;
    bool step_decode_ = false;             // phase of the ubatch in progress
    bool explicit_steps_ = false;          // begin_step has been called: steps are not inferred

    std::vector<cache_segment> segment_;   // [units]
    std::vector<double> heat_log2_;        // [units] log2 of sum 2^(t/half_life)
    std::vector<uint32_t> pins_;           // [units]
    std::vector<uint8_t> in_access_;       // [units] selected by the access in progress
    std::vector<uint8_t> prefetched_;      // [units] read ahead at this distance (layers), not yet used; 0 = no
    std::vector<int32_t> access_units_;    // units of the access in progress
    std::vector<uint64_t> layer_bytes_;    // [layers] resident bytes per layer
    std::vector<uint64_t> layer_footprint_;  // [layers] bytes of all the layer's units
    uint64_t footprint_bytes_ = 0;           // bytes of every unit
    int min_units_resident_ = 0;
    std::vector<uint64_t> expert_counts_;  // [units]

    std::list<int32_t> probation_;         // FIFO, front = oldest (LRU mode: the single list)
    std::vector<std::list<int32_t>::iterator> probation_pos_;
    heat_set protected_;
    double prefill_weight_log2_ = 0.0;     // log2(config_.prefill_weight), used when it is > 0
    uint64_t bytes_probation_ = 0;
    uint64_t bytes_protected_ = 0;

    // prediction scoring: predicted experts of each layer, waiting for its next access
    std::vector<std::vector<int32_t>> predicted_;   // [layers]
    std::vector<double> distance_use_;              // [distance] moving average: reads ahead used (1) or wasted (0)
    double precision_avg_ = 1.0;                    // moving average of scored predictions' precision
    std::vector<uint8_t> selected_scratch_;         // [experts]
    std::vector<uint8_t> decode_scratch_;           // [experts] selected by a decoding token (row_decode)
    std::vector<uint8_t> load_decode_;              // [units] a unit of the plan's load was a decode miss
};

// The least budget a policy accepts: the largest sum of `min_units_resident` units of one layer
// (one decode step pins a layer's top-k at once); `layer`, if given, receives that layer.
uint64_t cache_min_budget(const std::vector<uint64_t> & unit_bytes, int n_layers, int n_experts, int min_units_resident,
                          int * layer = nullptr);

// Name of an eviction policy as used by configs, CLIs and reports ("scan_resistant", "lru").
const char * cache_eviction_name(cache_eviction eviction);
// Inverse of cache_eviction_name; throws std::invalid_argument for an unknown name.
cache_eviction cache_eviction_from_name(const std::string & name);
