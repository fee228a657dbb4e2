// demand.h — the router's expert-demand arithmetic over a token-affinity table.
//
// The table has one row per known token and one value per (layer, expert), stored as
// bfloat16: the upper 16 bits of an IEEE float, so widening is a shift. A routing decision
// adds up a few dozen rows of a table of thousands; doing the gather, the weighting and the
// sum in one pass reads each row once and copies nothing, which is what keeps a decision
// well under a millisecond at 48 layers x 128 experts.
#pragma once

#include <cstddef>
#include <cstdint>

// out[d] = sum_i weights[i] * table[rows[i] * width + d]  for d < width (out is overwritten).
// Every rows[i] must index a row of the table: the caller checks.
void weighted_row_sum_bf16(const uint16_t * table, size_t width, const int64_t * rows, const float * weights,
                           size_t n_rows, float * out);

// out[i] = the bfloat16 nearest to values[i] (round to nearest even; NaN stays NaN).
void floats_to_bf16(const float * values, size_t n, uint16_t * out);
