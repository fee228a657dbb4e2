// sequence-steps.h — per-sequence accounting of the cache accesses of batched steps.
//
// A step (one llama_decode of a batch) holds the rows of several sequences; the cache sees each
// layer's top-k for all of them at once. begin() is told which sequence (a tag >= 0, one tag's
// rows contiguous) each row belongs to and which rows have logits (llama.cpp's last layer sees
// only those); every access of the step is then split among its sequences:
//   * each sequence's rows' ids go to its own routing trace (ACCESS events), as do the step's
//     PREDICT events and a STEP event per step ([1, 0] when it decodes, [0, n_rows] otherwise);
//   * hits and misses count the sequence's own unique selections (a decode when its group is
//     one row, a prefill otherwise);
//   * bytes read on demand for a unit are shared equally by the sequences that selected it in
//     that access; bytes read ahead, by all of the step's sequences; prediction scores,
//     evictions and invalid ids of the step count for each of them.
// An access of any other row count (a step llama.cpp split into several ubatches) is not
// attributed. Bytes are summed as doubles and rounded once, when a record is taken.
// Core layer: std and the policy core only (no llama.cpp, no Python). Not thread-safe: the
// compute thread drives it (begin() before llama_decode, the rest from the eval callback).
#pragma once

#include "cache-core.h"
#include "expert-selection.h"
#include "routing-trace.h"
#include "telemetry.h"

#include <cstdint>
#include <unordered_map>
#include <vector>

// What one sequence of a batch did to the cache: the tokens of its own rows, and its share of
// the steps it was in.
struct sequence_record {
    routing_trace trace;      // its ACCESS rows of every step, and the steps' PREDICT events
    cache_counters counters;  // hits/misses of its own selections; bytes: its share (above)
    double bytes_prefill = 0, bytes_decode = 0, bytes_prefetched = 0;  // shares, summed exactly
};

// Rows of a step by phase: tokens of sequences that decode (one row each) and prompt tokens.
struct step_rows {
    int n_decode  = 0;
    int n_prefill = 0;
};

class sequence_steps {
public:
    // n_experts: experts per layer (unit id = layer * n_experts + expert).
    explicit sequence_steps(int n_experts);

    // Starts a step of n_rows rows: row_tags[i] the sequence of row i, row_outputs[i] != 0 where
    // llama.cpp computes its logits. Records a STEP event and the step's tokens per sequence.
    // Returns the step's rows by phase. Throws std::invalid_argument if a tag is negative or its
    // rows are not contiguous, leaving the previous step in place.
    step_rows begin(const int32_t * row_tags, const uint8_t * row_outputs, int n_rows);

    // Per row of an access of n_tokens rows, 1 where its token decodes (for cache_policy::access),
    // or nullptr if the access cannot be attributed to the step's sequences (see the header).
    // Valid until the next begin().
    const uint8_t * row_decode(int n_tokens) const;
    // Records an access of `layer` (ids [n_tokens x k]) that row_decode(n_tokens) attributes:
    // `loaded` are the units read on demand for it (the plan's load), `policy` gives their bytes.
    void record_access(int layer, const int32_t * ids, int n_tokens, int k, const std::vector<int32_t> & loaded,
                       const cache_policy & policy);
    // Records a prediction for `layer` (n unique experts) in every sequence of the step.
    void record_prediction(int layer, const int32_t * experts, int n);
    // Adds each row's changed selections (cache-aware selection, for an access of n_tokens rows that
    // row_decode(n_tokens) attributes) to its sequence's counters.
    void record_selection_changes(const selection_change * rows, int n_tokens);
    // Shares what happened between two snapshots of the policy's counters taken around an
    // attributed access (its predictions' reads ahead, scores, evictions, invalid ids).
    void share(const cache_counters & before, const cache_counters & after);

    // Moves a sequence's record out (an empty one if the tag was never in a step); taken mid-step,
    // the rest of the step is not recorded for it.
    sequence_record take(int32_t tag);
    // A copy of a sequence's routing trace so far (empty if the tag was never in a step).
    routing_trace trace(int32_t tag) const;

private:
    // one group per tag of the step: rows and output rows contiguous
    struct step_group {
        int32_t tag;
        int first_row, n_rows, first_out, n_out;
        sequence_record * record;  // nullptr once taken
    };
    // Calls fn(expert) once per expert the group's rows select in ids (stamps dedupe).
    template <typename Fn> void each_unique(const step_group & g, bool rows_mode, const int32_t * ids, int k, Fn && fn);

    int n_experts_;
    std::vector<step_group> groups_;
    std::vector<int32_t> tags_;           // begin's scratch: the tags seen while checking the rows
    int n_rows_ = 0, n_outs_ = 0;         // rows and output rows of the step
    std::unordered_map<int32_t, sequence_record> records_;  // node-based: records stay put
    std::vector<uint8_t> row_decode_;     // [step rows] 1 = the token decodes
    std::vector<uint8_t> out_decode_;     // [step output rows] the same, for the last layer's rows
    std::vector<uint32_t> unit_stamp_;    // [experts] stamp of the last pass that counted the expert
    uint32_t stamp_clock_ = 0;            // one new stamp per pass over a group's selections
    std::vector<int32_t> n_selecting_;    // [experts] groups selecting it in this access
    std::vector<uint8_t> missing_;        // [experts] read on demand in this access
};
