// routing-trace.cpp — recording and replay of routing traces (see routing-trace.h).
#include "routing-trace.h"

#include <algorithm>
#include <stdexcept>
#include <string>

void routing_trace::reserve(size_t max_events, size_t max_ids) {
    kind.reserve(max_events);
    layer.reserve(max_events);
    n_tokens.reserve(max_events);
    n_ids.reserve(max_events);
    ids.reserve(max_ids);
}

bool routing_trace::append(trace_event_kind event_kind, int32_t event_layer, int32_t event_n_tokens,
                           const int32_t * event_ids, int32_t event_n_ids) {
    if (kind.size() == kind.capacity() || ids.size() + size_t(event_n_ids) > ids.capacity()) {
        n_dropped++;
        return false;
    }
    kind.push_back(event_kind);
    layer.push_back(event_layer);
    n_tokens.push_back(event_n_tokens);
    n_ids.push_back(event_n_ids);
    ids.insert(ids.end(), event_ids, event_ids + event_n_ids);
    return true;
}

void routing_trace::push(trace_event_kind event_kind, int32_t event_layer, int32_t event_n_tokens,
                         const int32_t * event_ids, int32_t event_n_ids) {
    kind.push_back(event_kind);
    layer.push_back(event_layer);
    n_tokens.push_back(event_n_tokens);
    n_ids.push_back(event_n_ids);
    ids.insert(ids.end(), event_ids, event_ids + event_n_ids);
}

void routing_trace_replay(const routing_trace & trace, cache_policy & policy) {
    const size_t n_events = trace.kind.size();
    if (trace.layer.size() != n_events || trace.n_tokens.size() != n_events || trace.n_ids.size() != n_events) {
        throw std::invalid_argument("trace arrays kind/layer/n_tokens/n_ids must have the same length");
    }
    size_t total = 0;
    for (size_t i = 0; i < n_events; ++i) {
        if (trace.n_ids[i] < 0 || trace.n_tokens[i] <= 0) {
            throw std::invalid_argument("trace event " + std::to_string(i) + ": n_ids must be >= 0 and n_tokens > 0");
        }
        if (trace.kind[i] == TRACE_EVENT_ACCESS && trace.n_ids[i] % trace.n_tokens[i] != 0) {
            throw std::invalid_argument("trace event " + std::to_string(i) + ": n_ids " + std::to_string(trace.n_ids[i]) +
                                        " is not a multiple of n_tokens " + std::to_string(trace.n_tokens[i]));
        }
        if (trace.kind[i] != TRACE_EVENT_ACCESS && trace.kind[i] != TRACE_EVENT_PREDICT && trace.kind[i] != TRACE_EVENT_STEP) {
            throw std::invalid_argument("trace event " + std::to_string(i) + ": unknown kind " + std::to_string(trace.kind[i]));
        }
        if (trace.kind[i] == TRACE_EVENT_STEP && trace.n_ids[i] != 2) {
            throw std::invalid_argument("trace event " + std::to_string(i) + ": a step has 2 ids (decode and prefill rows)");
        }
        total += size_t(trace.n_ids[i]);
    }
    if (total != trace.ids.size()) {
        throw std::invalid_argument("trace ids has " + std::to_string(trace.ids.size()) +
                                    " entries but the events account for " + std::to_string(total));
    }

    cache_plan plan;
    size_t offset = 0;
    int32_t last_access_layer = -1;
    int32_t n_decode_rows = 0;
    bool mixed = false;                // the current step decodes some rows and prefills others
    std::vector<uint8_t> row_decode;  // then: its decode rows, first in every access
    for (size_t i = 0; i < n_events; ++i) {
        const int32_t * ids = trace.ids.data() + offset;
        if (trace.kind[i] == TRACE_EVENT_STEP) {
            n_decode_rows = std::max(0, ids[0]);
            mixed = n_decode_rows > 0 && ids[1] > 0;
            policy.begin_step(n_decode_rows, std::max(0, ids[1]));
        } else if (trace.kind[i] == TRACE_EVENT_ACCESS) {
            const int32_t k = trace.n_tokens[i] > 0 ? trace.n_ids[i] / trace.n_tokens[i] : 0;
            if (mixed) {
                row_decode.assign(size_t(trace.n_tokens[i]), 0);
                std::fill(row_decode.begin(), row_decode.begin() + std::min(n_decode_rows, trace.n_tokens[i]), uint8_t(1));
            }
            policy.access(trace.layer[i], ids, trace.n_tokens[i], k, plan, mixed ? row_decode.data() : nullptr);
            last_access_layer = trace.layer[i];
        } else {  // predictions follow the access they were made at (llama-glue.cpp on_topk)
            policy.predict(trace.layer[i], ids, trace.n_ids[i], plan, trace.layer[i] - last_access_layer);
        }
        offset += size_t(trace.n_ids[i]);
    }
    policy.settle(plan);
}
