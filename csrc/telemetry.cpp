// telemetry.cpp — the list of counter names (see telemetry.h).
#include "telemetry.h"

const std::vector<std::pair<std::string, uint64_t cache_counters::*>> & cache_counters_fields() {
    static const std::vector<std::pair<std::string, uint64_t cache_counters::*>> fields = {
        {"n_steps",              &cache_counters::n_steps},
        {"n_hits_prefill",       &cache_counters::n_hits_prefill},
        {"n_misses_prefill",     &cache_counters::n_misses_prefill},
        {"n_hits_decode",        &cache_counters::n_hits_decode},
        {"n_misses_decode",      &cache_counters::n_misses_decode},
        {"bytes_read_prefill",   &cache_counters::bytes_read_prefill},
        {"bytes_read_decode",    &cache_counters::bytes_read_decode},
        {"bytes_prefetched",     &cache_counters::bytes_prefetched},
        {"n_evictions",          &cache_counters::n_evictions},
        {"bytes_evicted",        &cache_counters::bytes_evicted},
        {"n_prefetch_issued",    &cache_counters::n_prefetch_issued},
        {"n_prefetch_used",      &cache_counters::n_prefetch_used},
        {"n_predicted",          &cache_counters::n_predicted},
        {"n_predicted_correct",  &cache_counters::n_predicted_correct},
        {"n_selected_predicted", &cache_counters::n_selected_predicted},
        {"n_invalid_ids",        &cache_counters::n_invalid_ids},
        {"n_tokens_prefill",     &cache_counters::n_tokens_prefill},
        {"n_tokens_decode",      &cache_counters::n_tokens_decode},
        {"n_selections_replaced", &cache_counters::n_selections_replaced},
        {"n_selections_skipped",  &cache_counters::n_selections_skipped},
        {"n_policy_switches",     &cache_counters::n_policy_switches},
    };
    return fields;
}

const std::vector<std::pair<std::string, uint64_t residency_counters::*>> & residency_counters_fields() {
    static const std::vector<std::pair<std::string, uint64_t residency_counters::*>> fields = {
        {"n_folio_splits",     &residency_counters::n_folio_splits},
        {"bytes_split_reread", &residency_counters::bytes_split_reread},
        {"n_units_reclaimed",  &residency_counters::n_units_reclaimed},
        {"n_pages_held_elsewhere", &residency_counters::n_pages_held_elsewhere},
        {"ns_callback",        &residency_counters::ns_callback},
        {"ns_demand_read",     &residency_counters::ns_demand_read},
        {"ns_prefetch_wait",   &residency_counters::ns_prefetch_wait},
        {"ns_drop",            &residency_counters::ns_drop},
        {"ns_predict",         &residency_counters::ns_predict},
    };
    return fields;
}
