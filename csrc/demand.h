// demand.h — the router's expert-demand arithmetic: what a request would make each node load.
//
// The token-affinity tables have one row per known token and one column per (layer, expert):
// the probability p that the token selects that expert when prefilled, and -log(1 - p). Each
// value is one byte, square-root companded: code = round(127 * sqrt(value / range)), value =
// range * (code / 127)^2, with range 1 for p and AFFINITY_LOG_MISS_RANGE for -log(1 - p)
// (p is clipped to AFFINITY_MAX_PROB). Small probabilities, the common case, keep a fine step
// (p from 0.005 within 10 %, p = 0.5 within 0.5 %; an affinity learned from a few dozen
// prefills resolves p no finer than that). A decision reads a few dozen rows of a table of
// thousands, so bytes per row are what its time is made of; and a code's square fits 16 bits,
// so rows are summed in integer arithmetic, two rows per multiply-add.
//
// A decision, for a prompt whose tokens map to table rows (-1: unknown token):
//   1. Prefill demand, per group g (the nodes that would prefill the same suffix, because
//      they hold the same prefix of the prompt): the distinct known rows of
//      tokens[starts[g]:], each counted as often as it occurs; when there are more than
//      `max_sampled`, an even sample of them (j * n / max_sampled, j < max_sampled, in row
//      order) whose counts are scaled to stand for all. Then
//      P(expert d selected) = 1 - exp(-sum_i count_i * miss_i[d]), miss = -log(1 - p).
//   2. Decode demand: the mean p over the distinct known rows of the last `decode_context`
//      tokens (decoding continues the prompt's end).
//   3. Per node: expected loads = sum_d w[d] * (1 - resident[d]), with
//      w = prefill demand of the node's group + decode_steps * decode demand.
#pragma once

#include <cstddef>
#include <cstdint>

constexpr int32_t AFFINITY_CODE_MAX = 127;        // codes are 0 .. 127
constexpr float AFFINITY_MAX_PROB = 0.99f;         // p is clipped to this, so -log(1 - p) <= 4.61
constexpr float AFFINITY_LOG_MISS_RANGE = 4.61f;  // the largest -log(1 - p) a code stands for

// The table entries of n selection probabilities (clipped to [0, AFFINITY_MAX_PROB]; NaN as 0):
// prob_codes[i] codes p, log_miss_codes[i] codes -log(1 - p).
void affinity_encode(const float * prob, size_t n, uint8_t * prob_codes, uint8_t * log_miss_codes);

// The affinity as the router keeps it; not owned, read during the call only.
struct affinity_tables {
    const uint8_t * log_miss = nullptr;  // [n_rows, width] codes of -log(1 - p), range AFFINITY_LOG_MISS_RANGE
    const uint8_t * prob = nullptr;      // [n_rows, width] codes of p, range 1
    size_t n_rows = 0;
    size_t width = 0;  // n_layers * n_experts
};

struct demand_params {
    size_t max_sampled = 32;     // distinct tokens one prefill estimate reads at most (>= 1)
    size_t decode_context = 16;  // trailing prompt tokens the decode estimate reads
};

// Where request_demand writes; every array is owned by the caller.
struct demand_out {
    float * prefill = nullptr;   // [n_groups, width]: P(expert selected while prefilling the group's suffix)
    int64_t * known = nullptr;   // [n_groups]: distinct known tokens in the group's suffix
    float * decode = nullptr;    // [width]: mean p of the trailing tokens (0 if none known)
    int64_t n_decode_known = 0;  // distinct known tokens among them
};

// A prompt as the affinity sees it, and the ways of serving it; read during the call only.
struct demand_request {
    const int64_t * token_rows = nullptr;  // [n_tokens]: table row of each prompt token, -1 if unknown
    size_t n_tokens = 0;
    const int64_t * starts = nullptr;      // [n_groups]: first token each group prefills (past the end: none)
    size_t n_groups = 0;
};

// Steps 1 and 2. Every token row other than -1 must be < tables.n_rows (the caller checks).
void request_demand(const affinity_tables & tables, const demand_request & request, const demand_params & params,
                    demand_out & out);

// Residency of the nodes the router knows: one row of bits per node, expert d resident where
// bit d % 8 of byte d / 8 is set (numpy.packbits(..., bitorder="little") of the [L*E] flags).
// A row of 48 x 128 experts is 768 bytes, so the whole fleet's stays in cache.
struct residency_matrix {
    const uint8_t * bits = nullptr;  // [n_rows, residency_row_bytes(width)]
    size_t n_rows = 0;
    size_t width = 0;  // experts per row (n_layers * n_experts)
};

constexpr size_t residency_row_bytes(size_t width) { return (width + 7) / 8; }

// A request's demand as request_demand wrote it; read during the call only.
struct demand_in {
    const float * prefill = nullptr;  // [n_groups, width]
    size_t n_groups = 0;
    const float * decode = nullptr;   // [width]
    float decode_steps = 0.0f;        // tokens the request is expected to decode (>= 0)
};

// Step 3 for n_nodes nodes: node i is row node_rows[i] of the matrix and prefills group
// node_groups[i] of the demand; out[i] = its expected expert loads. totals[g] = the loads of
// group g with nothing resident (its whole demand), for every group. Rows and groups must be
// in range (the caller checks).
void expected_loads(const residency_matrix & residency, const demand_in & demand, const int64_t * node_rows,
                    const int64_t * node_groups, size_t n_nodes, double * out, double * totals);
