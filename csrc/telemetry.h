// telemetry.h — counters of the expert cache, one spelling per field.
//
// The same names are used as keys of the Python stats dict, of the msgpack warmth report's
// "counters" map and in docs/benchmarks.md; `cache_counters_fields` is the single list.
// Phase: DECODE = a ubatch of one token, PREFILL = a ubatch of more than one.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

struct cache_counters {
    uint64_t n_steps              = 0;  // ubatches evaluated
    uint64_t n_hits_prefill       = 0;  // selected units already resident (or being read ahead)
    uint64_t n_misses_prefill     = 0;  // selected units read on demand
    uint64_t n_hits_decode        = 0;
    uint64_t n_misses_decode      = 0;
    uint64_t bytes_read_prefill   = 0;  // footprint bytes read (demand + prefetch) during prefill
    uint64_t bytes_read_decode    = 0;
    uint64_t bytes_prefetched     = 0;  // of which read ahead on a prediction
    uint64_t n_evictions          = 0;
    uint64_t bytes_evicted        = 0;
    uint64_t n_prefetch_issued    = 0;  // units read ahead
    uint64_t n_prefetch_used      = 0;  // ... then selected before being dropped
    uint64_t n_predicted          = 0;  // (layer, expert) pairs predicted and scored
    uint64_t n_predicted_correct  = 0;  // ... that the next access of that layer selected
    uint64_t n_selected_predicted = 0;  // selections of accesses that had a prediction
    uint64_t n_invalid_ids        = 0;  // ids outside [0, n_experts): ignored
    uint64_t n_tokens_prefill     = 0;  // tokens evaluated in prefill ubatches (layer 0)
    uint64_t n_tokens_decode      = 0;  // tokens evaluated one at a time (layer 0)
    uint64_t n_selections_replaced = 0;  // cache-aware selection: missing experts replaced by resident ones
    uint64_t n_selections_skipped  = 0;  // ... and skipped (weight set to zero)
    uint64_t n_policy_switches     = 0;  // adaptive eviction: times the rule in use changed
};

// (name, pointer-to-member) for every counter, in declaration order.
const std::vector<std::pair<std::string, uint64_t cache_counters::*>> & cache_counters_fields();

// What the page-level side of the cache did (unit_residency, residency.h): the kernel's view of
// residency brought in line with the policy's; and where the eval callback's time went (llama-glue).
struct residency_counters {
    uint64_t n_folio_splits     = 0;  // aligned blocks dropped whole and partly read back, because a
                                      // large page-cache folio straddled a drop (DESIGN.md, page cache)
    uint64_t bytes_split_reread = 0;  // bytes read back by those splits (pages that had to stay)
    uint64_t n_units_reclaimed  = 0;  // resident units whose pages the kernel took (found by reconcile)
    uint64_t n_pages_held_elsewhere = 0;  // evicted pages a whole-block drop could not take: another
                                          // process maps them (several nodes on one file, one machine)
    // where the eval callback's time goes (nanoseconds, steady clock), to set against decode time
    uint64_t ns_callback        = 0;  // all of on_topk (what follows are parts of it)
    uint64_t ns_demand_read     = 0;  // reading missing experts before the layer can compute
    uint64_t ns_prefetch_wait   = 0;  // waiting for experts read ahead that were still in flight
    uint64_t ns_drop            = 0;  // dropping evicted experts' pages
    uint64_t ns_predict         = 0;  // the next-layer predictor and queueing its reads
};

const std::vector<std::pair<std::string, uint64_t residency_counters::*>> & residency_counters_fields();
