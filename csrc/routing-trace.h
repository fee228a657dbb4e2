// routing-trace.h — record of what the router of every MoE layer selected, and its replay.
//
// A trace is a sequence of events in evaluation order:
//   STEP    n_tokens, ids [n_decode_rows, n_prefill_rows] — a step (one ubatch) begins; layer -1.
//           Its decode rows come first in each of its accesses (the engine lays steps out so)
//   ACCESS  layer, n_tokens, ids [n_tokens x k]  — one layer's top-k for one ubatch
//   PREDICT layer, ids [n]                       — experts predicted for that layer's next access
// The cache records STEP events when it is told the steps (expert_cache::begin_step); a trace
// without them is split into steps by the layer order (cache_policy::access).
// Replaying a trace through a cache_policy repeats the decisions taken while the model ran
// (except those that depended on I/O timing: pins of reads still in flight), which is how
// policies are compared, budgets swept and large clusters simulated without llama.cpp.
// Storage is reserved up front; append never allocates past the reservation: a full trace
// counts the dropped events instead (n_dropped), so recording is safe in the eval callback.
#pragma once

#include "cache-core.h"

#include <cstdint>
#include <vector>

enum trace_event_kind : uint8_t {
    TRACE_EVENT_ACCESS  = 0,
    TRACE_EVENT_PREDICT = 1,
    TRACE_EVENT_STEP    = 2,
};

struct routing_trace {
    std::vector<uint8_t> kind;      // [events] trace_event_kind
    std::vector<int32_t> layer;     // [events]
    std::vector<int32_t> n_tokens;  // [events] tokens of the ubatch (1 for PREDICT)
    std::vector<int32_t> n_ids;     // [events] ids stored for the event
    std::vector<int32_t> ids;       // [sum n_ids] expert ids, events back to back
    uint64_t n_dropped = 0;         // events not stored because the reservation was full

    // Reserves room; append() beyond it drops. Allocates.
    void reserve(size_t max_events, size_t max_ids);
    // Appends one event if it fits in the reservation; returns false (and counts) otherwise.
    bool append(trace_event_kind event_kind, int32_t event_layer, int32_t event_n_tokens,
                const int32_t * event_ids, int32_t event_n_ids);
    // Appends one event, growing the storage if needed (a sequence's trace: no fixed reservation).
    void push(trace_event_kind event_kind, int32_t event_layer, int32_t event_n_tokens,
              const int32_t * event_ids, int32_t event_n_ids);
};

// Feeds every event of `trace` to `policy` in order, then settles it. Plans are discarded.
// Throws std::invalid_argument if the arrays are inconsistent (lengths, ids per token).
void routing_trace_replay(const routing_trace & trace, cache_policy & policy);
