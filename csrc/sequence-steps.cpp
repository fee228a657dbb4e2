// sequence-steps.cpp — per-sequence accounting of batched steps (see sequence-steps.h).
#include "sequence-steps.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>

sequence_steps::sequence_steps(int n_experts)
    : n_experts_(n_experts),
      unit_stamp_(size_t(n_experts), 0),
      n_selecting_(size_t(n_experts), 0),
      missing_(size_t(n_experts), 0) {}

step_rows sequence_steps::begin(const int32_t * row_tags, const uint8_t * row_outputs, int n_rows) {
    std::vector<int32_t> & seen = tags_;  // checked before anything changes: a rejected step leaves the last one
    seen.clear();
    for (int i = 0; i < n_rows; ++i) {
        const int32_t tag = row_tags[i];
        if (tag < 0) { throw std::invalid_argument("begin_step: row " + std::to_string(i) + " has a negative tag"); }
        if (i > 0 && tag == row_tags[i - 1]) { continue; }
        if (std::find(seen.begin(), seen.end(), tag) != seen.end()) {
            throw std::invalid_argument("begin_step: the rows of tag " + std::to_string(tag) + " are not contiguous");
        }
        seen.push_back(tag);
    }
    groups_.clear();
    row_decode_.clear();
    out_decode_.clear();
    n_rows_ = n_rows;
    n_outs_ = 0;
    step_rows rows;
    for (int i = 0; i < n_rows;) {
        const int32_t tag = row_tags[i];
        int j = i, outs = 0;
        for (; j < n_rows && row_tags[j] == tag; ++j) { outs += row_outputs[j] != 0; }
        sequence_record & record = records_[tag];
        groups_.push_back({tag, i, j - i, n_outs_, outs, &record});
        n_outs_ += outs;
        const bool decode = j - i == 1;
        row_decode_.insert(row_decode_.end(), size_t(j - i), uint8_t(decode));
        out_decode_.insert(out_decode_.end(), size_t(outs), uint8_t(decode));
        (decode ? rows.n_decode : rows.n_prefill) += j - i;
        const int32_t phase_rows[2] = {decode ? 1 : 0, decode ? 0 : j - i};
        record.trace.push(TRACE_EVENT_STEP, -1, j - i, phase_rows, 2);
        record.counters.n_steps++;
        (decode ? record.counters.n_tokens_decode : record.counters.n_tokens_prefill) += uint64_t(j - i);
        i = j;
    }
    return rows;
}

const uint8_t * sequence_steps::row_decode(int n_tokens) const {
    // every row (n_tokens == n_rows_) or the output rows only (the last layer)
    if (groups_.empty()) { return nullptr; }
    if (n_tokens == n_rows_) { return row_decode_.data(); }
    if (n_tokens == n_outs_) { return out_decode_.data(); }
    return nullptr;
}

template <typename Fn>
void sequence_steps::each_unique(const step_group & g, bool rows_mode, const int32_t * ids, int k, Fn && fn) {
    if (++stamp_clock_ == 0) {  // wrapped: every old stamp could collide with a new one
        std::fill(unit_stamp_.begin(), unit_stamp_.end(), 0u);
        stamp_clock_ = 1;
    }
    const uint32_t stamp = stamp_clock_;
    const int first = rows_mode ? g.first_row : g.first_out;
    const int n = rows_mode ? g.n_rows : g.n_out;
    for (int i = first * k; i < (first + n) * k; ++i) {
        const int32_t e = ids[size_t(i)];
        if (e < 0 || e >= n_experts_ || unit_stamp_[size_t(e)] == stamp) { continue; }
        unit_stamp_[size_t(e)] = stamp;
        fn(e);
    }
}

void sequence_steps::record_access(int layer, const int32_t * ids, int n_tokens, int k,
                                   const std::vector<int32_t> & loaded, const cache_policy & policy) {
    const bool rows_mode = n_tokens == n_rows_;
    const int32_t base = int32_t(layer) * n_experts_;
    for (int32_t u : loaded) { missing_[size_t(u - base)] = 1; }
    for (const step_group & g : groups_) {
        each_unique(g, rows_mode, ids, k, [&](int32_t e) { n_selecting_[size_t(e)]++; });
    }
    for (const step_group & g : groups_) {
        const bool decode = g.n_rows == 1;
        sequence_record * r = g.record;
        each_unique(g, rows_mode, ids, k, [&](int32_t e) {
            if (r == nullptr) { return; }
            cache_counters & c = r->counters;
            if (missing_[size_t(e)]) {
                (decode ? c.n_misses_decode : c.n_misses_prefill)++;
                (decode ? r->bytes_decode : r->bytes_prefill) +=
                    double(policy.unit_bytes(base + e)) / double(n_selecting_[size_t(e)]);
            } else {
                (decode ? c.n_hits_decode : c.n_hits_prefill)++;
            }
        });
        const int first = rows_mode ? g.first_row : g.first_out;
        const int n = rows_mode ? g.n_rows : g.n_out;
        if (r != nullptr && n > 0) {
            r->trace.push(TRACE_EVENT_ACCESS, layer, n, ids + size_t(first) * size_t(k), n * k);
        }
    }
    for (const step_group & g : groups_) {  // scratch back to rest
        each_unique(g, rows_mode, ids, k, [&](int32_t e) { n_selecting_[size_t(e)] = 0; });
    }
    for (int32_t u : loaded) { missing_[size_t(u - base)] = 0; }
}

void sequence_steps::record_prediction(int layer, const int32_t * experts, int n) {
    for (const step_group & g : groups_) {
        if (g.record != nullptr) { g.record->trace.push(TRACE_EVENT_PREDICT, layer, 1, experts, n); }
    }
}

void sequence_steps::record_selection_changes(const selection_change * rows, int n_tokens) {
    const bool rows_mode = n_tokens == n_rows_;
    for (const step_group & g : groups_) {
        if (g.record == nullptr) { continue; }
        const int first = rows_mode ? g.first_row : g.first_out;
        const int n = rows_mode ? g.n_rows : g.n_out;
        for (int i = first; i < first + n; ++i) {
            g.record->counters.n_selections_replaced += uint64_t(rows[i].replaced);
            g.record->counters.n_selections_skipped += uint64_t(rows[i].skipped);
        }
    }
}

void sequence_steps::share(const cache_counters & before, const cache_counters & after) {
    const double n = double(groups_.size());
    const double prefetched = double(after.bytes_prefetched - before.bytes_prefetched) / n;
    for (step_group & g : groups_) {
        if (g.record == nullptr) { continue; }
        cache_counters & c = g.record->counters;
        g.record->bytes_prefetched += prefetched;
        (g.n_rows == 1 ? g.record->bytes_decode : g.record->bytes_prefill) += prefetched;
        c.n_prefetch_issued += after.n_prefetch_issued - before.n_prefetch_issued;
        c.n_prefetch_used += after.n_prefetch_used - before.n_prefetch_used;
        c.n_predicted += after.n_predicted - before.n_predicted;
        c.n_predicted_correct += after.n_predicted_correct - before.n_predicted_correct;
        c.n_selected_predicted += after.n_selected_predicted - before.n_selected_predicted;
        c.n_evictions += after.n_evictions - before.n_evictions;
        c.bytes_evicted += after.bytes_evicted - before.bytes_evicted;
        c.n_invalid_ids += after.n_invalid_ids - before.n_invalid_ids;
    }
}

sequence_record sequence_steps::take(int32_t tag) {
    sequence_record out;
    auto it = records_.find(tag);
    if (it == records_.end()) { return out; }
    out = std::move(it->second);
    records_.erase(it);
    for (step_group & g : groups_) {
        if (g.tag == tag) { g.record = nullptr; }  // taken mid-step: the step's rest is not recorded
    }
    out.counters.bytes_read_prefill = uint64_t(std::llround(out.bytes_prefill));
    out.counters.bytes_read_decode = uint64_t(std::llround(out.bytes_decode));
    out.counters.bytes_prefetched = uint64_t(std::llround(out.bytes_prefetched));
    return out;
}

routing_trace sequence_steps::trace(int32_t tag) const {
    auto it = records_.find(tag);
    return it == records_.end() ? routing_trace() : it->second.trace;
}
