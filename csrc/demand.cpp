// demand.cpp — see demand.h.
//
// The two loops a decision spends its time in (summing table rows, and a node's resident
// demand) are written out with AVX2 intrinsics on x86-64 and chosen at run time; elsewhere,
// or on CPUs without AVX2, plain loops compute the same sums (the row sums exactly:
// they are integer).
#include "demand.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SNIPER_HAVE_AVX2_PATH 1
#else
#define SNIPER_HAVE_AVX2_PATH 0
#endif

namespace {

constexpr int32_t CODE_MAX = AFFINITY_CODE_MAX;
constexpr float CODE_MAX_SQUARED = static_cast<float>(CODE_MAX * CODE_MAX);
// A sum of count * code^2 stays below 2^31 while the counts add up to at most this.
constexpr int64_t MAX_COUNT_TOTAL = INT32_MAX / (CODE_MAX * CODE_MAX);

// -- portable loops ------------------------------------------------------------------------

// out[d] = sum_i counts[i] * code_i[d]^2, code_i the row rows[i] of the table (out is overwritten).
void weighted_square_sum_portable(const uint8_t * table, size_t width, const int64_t * rows, const int16_t * counts,
                                  size_t n_rows, int32_t * out) {
    std::fill(out, out + width, 0);
    for (size_t i = 0; i < n_rows; ++i) {
        const uint8_t * row = table + static_cast<size_t>(rows[i]) * width;
        for (size_t d = 0; d < width; ++d) {
            out[d] += counts[i] * static_cast<int32_t>(row[d]) * static_cast<int32_t>(row[d]);
        }
    }
}

// sum of w[d] over the d in [begin, n) whose bit is set (bit d % 8 of byte d / 8).
float resident_sum_portable(const uint8_t * bits, const float * w, size_t begin, size_t n) {
    float total = 0.0f;
    for (size_t d = begin; d < n; ++d) {
        total += ((bits[d >> 3] >> (d & 7)) & 1u) ? w[d] : 0.0f;
    }
    return total;
}

// -- AVX2 ----------------------------------------------------------------------------------

#if SNIPER_HAVE_AVX2_PATH
// Integer arithmetic, two rows per multiply-add: a code is at most 127, so its square fits a
// 16-bit lane; interleaving the squares of rows a and b element by element, pmaddwd with the
// pair (count_a, count_b) gives count_a * a[d]^2 + count_b * b[d]^2 in the 32-bit lane of d.
__attribute__((target("avx2")))
void weighted_square_sum_avx2(const uint8_t * table, size_t width, const int64_t * rows, const int16_t * counts,
                              size_t n_rows, int32_t * out) {
    constexpr size_t ROWS = 8;  // rows a pass: an eighth of the accumulator traffic
    std::fill(out, out + width, 0);
    for (size_t i = 0; i < n_rows; i += ROWS) {
        const size_t m = std::min(ROWS, n_rows - i);
        const uint8_t * row[ROWS];
        for (size_t j = 0; j < ROWS; ++j) {  // a pass short of rows repeats the last one with count 0
            row[j] = table + static_cast<size_t>(rows[i + std::min(j, m - 1)]) * width;
        }
        __m256i pair[ROWS / 2];
        for (size_t j = 0; j < ROWS / 2; ++j) {
            const uint16_t a = 2 * j < m ? static_cast<uint16_t>(counts[i + 2 * j]) : 0;
            const uint16_t b = 2 * j + 1 < m ? static_cast<uint16_t>(counts[i + 2 * j + 1]) : 0;
            pair[j] = _mm256_set1_epi32(static_cast<int32_t>(a | (static_cast<uint32_t>(b) << 16)));
        }
        size_t d = 0;
        for (; d + 16 <= width; d += 16) {
            __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(out + d));  // elements d .. d+7
            __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(out + d + 8));
            for (size_t j = 0; j < ROWS / 2; ++j) {
                __m256i a = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(row[2 * j] + d)));
                __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(row[2 * j + 1] + d)));
                a = _mm256_mullo_epi16(a, a);
                b = _mm256_mullo_epi16(b, b);
                // per 128-bit half: unpacklo holds elements 0-3 (8-11), unpackhi 4-7 (12-15)
                const __m256i first = _mm256_madd_epi16(_mm256_unpacklo_epi16(a, b), pair[j]);
                const __m256i second = _mm256_madd_epi16(_mm256_unpackhi_epi16(a, b), pair[j]);
                lo = _mm256_add_epi32(lo, _mm256_permute2x128_si256(first, second, 0x20));
                hi = _mm256_add_epi32(hi, _mm256_permute2x128_si256(first, second, 0x31));
            }
            _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + d), lo);
            _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + d + 8), hi);
        }
        for (; d < width; ++d) {
            for (size_t j = 0; j < m; ++j) {
                out[d] += counts[i + j] * static_cast<int32_t>(row[j][d]) * static_cast<int32_t>(row[j][d]);
            }
        }
    }
}

__attribute__((target("avx2")))
float resident_sum_avx2(const uint8_t * bits, const float * w, size_t n) {
    // 32 experts a pass: their 32 bits go to every lane, each lane shifts its own bit to the
    // sign (lane j of quarter q holds expert 8q + j), and the sign picks w or 0.
    const __m256i to_sign[4] = {_mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24),
                                _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16),
                                _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8),
                                _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0)};
    const __m256 zero = _mm256_setzero_ps();
    __m256 acc[4] = {zero, zero, zero, zero};
    size_t d = 0;
    for (; d + 32 <= n; d += 32) {
        uint32_t word;
        std::memcpy(&word, bits + d / 8, sizeof(word));  // little-endian: bit j is expert d + j
        const __m256i all = _mm256_set1_epi32(static_cast<int32_t>(word));
        for (size_t q = 0; q < 4; ++q) {
            const __m256 sign = _mm256_castsi256_ps(_mm256_sllv_epi32(all, to_sign[q]));
            acc[q] = _mm256_add_ps(acc[q], _mm256_blendv_ps(zero, _mm256_loadu_ps(w + d + 8 * q), sign));
        }
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    float total = resident_sum_portable(bits, w, d, n);
    for (float lane : lanes) {
        total += lane;
    }
    return total;
}

// Whether to take the AVX2 loops: the CPU has AVX2 and SNIPER_NO_AVX2 is not set
// (the tests set it to check the portable loops against them).
bool use_avx2() {
    static const bool use = __builtin_cpu_supports("avx2") && std::getenv("SNIPER_NO_AVX2") == nullptr;
    return use;
}
#endif

void weighted_square_sum(const uint8_t * table, size_t width, const int64_t * rows, const int16_t * counts,
                         size_t n_rows, int32_t * out) {
#if SNIPER_HAVE_AVX2_PATH
    if (use_avx2()) {
        weighted_square_sum_avx2(table, width, rows, counts, n_rows, out);
        return;
    }
#endif
    weighted_square_sum_portable(table, width, rows, counts, n_rows, out);
}

float resident_sum(const uint8_t * bits, const float * w, size_t n) {
#if SNIPER_HAVE_AVX2_PATH
    if (use_avx2()) {
        return resident_sum_avx2(bits, w, n);
    }
#endif
    return resident_sum_portable(bits, w, 0, n);
}

// -- the rest of a decision ----------------------------------------------------------------

// exp(x) for x <= 0 (relative error below 1e-6; exp(-87) for anything smaller), written so the
// compiler vectorises a loop of it: 2^(x log2 e) = 2^n * 2^f, n the nearest whole number and
// f in [-0.5, 0.5], 2^f = e^(f ln 2) by its Taylor series to degree 6 (remainder < 2e-7).
inline float exp_nonpositive(float x) {
    x = x > -87.0f ? x : -87.0f;  // selects, not branches, under -fno-trapping-math (CMakeLists.txt)
    x = x < 0.0f ? x : 0.0f;
    const float t = x * 1.44269504088896341f;
    const float n = (t + 12582912.0f) - 12582912.0f;  // 1.5 * 2^23: rounds t to the nearest whole number
    const float g = (t - n) * 0.693147180559945309f;
    const float poly =
        1.0f + g * (1.0f + g * (0.5f + g * (1.0f / 6 + g * (1.0f / 24 + g * (1.0f / 120 + g * (1.0f / 720))))));
    const uint32_t scale_bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
    float scale;
    std::memcpy(&scale, &scale_bits, sizeof(scale));
    return poly * scale;
}

// values[d] = 1 - exp(-scale * values[d]), values[d] >= 0. Compiled for AVX2 and for the
// baseline; the loader picks the one the CPU supports (GCC function multiversioning).
#if SNIPER_HAVE_AVX2_PATH && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void one_minus_exp(float * values, size_t n, float scale) {
    for (size_t d = 0; d < n; ++d) {
        values[d] = 1.0f - exp_nonpositive(-scale * values[d]);
    }
}

// The distinct known rows of rows[0, n) in ascending order, and how often each occurs.
void distinct_rows(const int64_t * rows, size_t n, std::vector<int64_t> & distinct, std::vector<int64_t> & counts) {
    std::vector<int64_t> known;
    known.reserve(n);
    for (size_t i = 0; i < n; ++i) {
        if (rows[i] >= 0) {
            known.push_back(rows[i]);
        }
    }
    std::sort(known.begin(), known.end());
    distinct.clear();
    counts.clear();
    for (int64_t row : known) {
        if (distinct.empty() || distinct.back() != row) {
            distinct.push_back(row);
            counts.push_back(0);
        }
        ++counts.back();
    }
}

// Keeps an even sample of at most max_sampled of the distinct rows and returns the factor
// that makes their counts stand for all the occurrences (1 when nothing was left out).
double sample_rows(std::vector<int64_t> & distinct, std::vector<int64_t> & counts, size_t max_sampled) {
    const size_t n = distinct.size();
    if (n <= max_sampled) {
        return 1.0;
    }
    int64_t n_known = 0;
    for (int64_t c : counts) {
        n_known += c;
    }
    const double stride = static_cast<double>(n) / static_cast<double>(max_sampled);
    int64_t kept = 0;
    for (size_t j = 0; j < max_sampled; ++j) {
        const size_t pick = static_cast<size_t>(static_cast<double>(j) * stride);  // ascending, so in place
        distinct[j] = distinct[pick];
        counts[j] = counts[pick];
        kept += counts[j];
    }
    distinct.resize(max_sampled);
    counts.resize(max_sampled);
    return static_cast<double>(n_known) / static_cast<double>(kept);
}

// out[d] = sum_i counts[i] * code_i[d]^2 (overwritten). The vector loops take 16-bit
// multipliers and 32-bit sums, so a count above INT16_MAX is split into several multipliers of
// one row, and rows go in batches whose counts add up to at most MAX_COUNT_TOTAL; the sum is
// exact either way. A prompt needs more than one batch only if it repeats a token 130,000 times.
void count_weighted_sum(const uint8_t * table, size_t width, const int64_t * rows, const int64_t * counts,
                        size_t n_rows, std::vector<int32_t> & scratch, float * out) {
    std::fill(out, out + width, 0.0f);
    scratch.resize(width);
    std::vector<int64_t> batch_rows;
    std::vector<int16_t> batch_counts;
    int64_t batch_total = 0;
    auto flush = [&]() {
        weighted_square_sum(table, width, batch_rows.data(), batch_counts.data(), batch_rows.size(), scratch.data());
        for (size_t d = 0; d < width; ++d) {
            out[d] += static_cast<float>(scratch[d]);
        }
        batch_rows.clear();
        batch_counts.clear();
        batch_total = 0;
    };
    for (size_t i = 0; i < n_rows; ++i) {
        for (int64_t left = counts[i]; left > 0;) {
            const int64_t take = std::min<int64_t>({left, INT16_MAX, MAX_COUNT_TOTAL - batch_total});
            if (take == 0) {
                flush();
                continue;
            }
            batch_rows.push_back(rows[i]);
            batch_counts.push_back(static_cast<int16_t>(take));
            batch_total += take;
            left -= take;
        }
    }
    if (!batch_rows.empty()) {
        flush();
    }
}

float sum_of(const float * w, size_t n) {
    float acc[8] = {};  // eight partial sums: the compiler vectorises them without reordering a single sum
    size_t d = 0;
    for (; d + 8 <= n; d += 8) {
        for (size_t j = 0; j < 8; ++j) {
            acc[j] += w[d + j];
        }
    }
    float total = 0.0f;
    for (; d < n; ++d) {
        total += w[d];
    }
    for (float a : acc) {
        total += a;
    }
    return total;
}

// round(127 * sqrt(value / range)), value / range clipped to [0, 1] (NaN as 0).
inline uint8_t code_of(float value, float range) {
    float unit = value / range;
    unit = unit > 0.0f ? unit : 0.0f;  // NaN compares false: 0
    unit = unit < 1.0f ? unit : 1.0f;
    return static_cast<uint8_t>(static_cast<int32_t>(static_cast<float>(CODE_MAX) * std::sqrt(unit) + 0.5f));
}

// -log(x) for x in [1 - AFFINITY_MAX_PROB, 1], absolute error below 1e-6, written so the
// compiler vectorises a loop of it: x = m * 2^e with m in [sqrt(1/2), sqrt(2)), and
// log m = 2 atanh(t), t = (m - 1) / (m + 1), |t| < 0.172, by its series to t^9.
inline float neg_log(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    int32_t exponent = static_cast<int32_t>(bits >> 23) - 127;
    const uint32_t mantissa_bits = (bits & 0x007fffffu) | 0x3f800000u;  // m in [1, 2)
    float m;
    std::memcpy(&m, &mantissa_bits, sizeof(m));
    const bool high = m > 1.41421356f;
    m = high ? 0.5f * m : m;
    exponent = high ? exponent + 1 : exponent;
    const float t = (m - 1.0f) / (m + 1.0f);
    const float t2 = t * t;
    const float log_m = 2.0f * t * (1.0f + t2 * (1.0f / 3 + t2 * (1.0f / 5 + t2 * (1.0f / 7 + t2 * (1.0f / 9)))));
    return -(static_cast<float>(exponent) * 0.693147180559945309f + log_m);
}

}  // namespace

#if SNIPER_HAVE_AVX2_PATH && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void affinity_encode(const float * prob, size_t n, uint8_t * prob_codes, uint8_t * log_miss_codes) {
    for (size_t i = 0; i < n; ++i) {
        float p = prob[i] > 0.0f ? prob[i] : 0.0f;  // NaN compares false: 0
        p = p < AFFINITY_MAX_PROB ? p : AFFINITY_MAX_PROB;
        prob_codes[i] = code_of(p, 1.0f);
        log_miss_codes[i] = code_of(neg_log(1.0f - p), AFFINITY_LOG_MISS_RANGE);
    }
}

void request_demand(const affinity_tables & tables, const demand_request & request, const demand_params & params,
                    demand_out & out) {
    const size_t width = tables.width;
    const int64_t * token_rows = request.token_rows;
    const size_t n_tokens = request.n_tokens;
    std::vector<int64_t> distinct, counts;
    std::vector<int32_t> scratch;
    for (size_t g = 0; g < request.n_groups; ++g) {
        const size_t start = std::min(static_cast<size_t>(std::max<int64_t>(0, request.starts[g])), n_tokens);
        distinct_rows(token_rows + start, n_tokens - start, distinct, counts);
        out.known[g] = static_cast<int64_t>(distinct.size());
        const double scale = sample_rows(distinct, counts, std::max<size_t>(1, params.max_sampled));
        float * prefill = out.prefill + g * width;
        count_weighted_sum(tables.log_miss, width, distinct.data(), counts.data(), distinct.size(), scratch, prefill);
        // each occurrence is a draw: P(selected) = 1 - prod_i (1 - p_i)^count_i = 1 - exp(-sum_i count_i * miss_i)
        one_minus_exp(prefill, width, static_cast<float>(scale * AFFINITY_LOG_MISS_RANGE / CODE_MAX_SQUARED));
    }
    const size_t tail = n_tokens - std::min(n_tokens, params.decode_context);
    distinct_rows(token_rows + tail, n_tokens - tail, distinct, counts);
    out.n_decode_known = static_cast<int64_t>(distinct.size());
    counts.assign(distinct.size(), 1);  // each distinct token once: the mean
    count_weighted_sum(tables.prob, width, distinct.data(), counts.data(), distinct.size(), scratch, out.decode);
    const float mean = distinct.empty() ? 0.0f : 1.0f / (static_cast<float>(distinct.size()) * CODE_MAX_SQUARED);
    for (size_t d = 0; d < width; ++d) {
        out.decode[d] *= mean;
    }
}

void expected_loads(const residency_matrix & residency, const demand_in & demand, const int64_t * node_rows,
                    const int64_t * node_groups, size_t n_nodes, double * out, double * totals) {
    const size_t width = residency.width;
    std::vector<float> weights(demand.n_groups * width);  // w of each group
    std::vector<float> total(demand.n_groups);
    for (size_t g = 0; g < demand.n_groups; ++g) {
        float * __restrict w = weights.data() + g * width;
        const float * __restrict p = demand.prefill + g * width;
        const float * __restrict q = demand.decode;
        for (size_t d = 0; d < width; ++d) {
            w[d] = p[d] + demand.decode_steps * q[d];
        }
        total[g] = sum_of(w, width);
        totals[g] = total[g];
    }
    for (size_t i = 0; i < n_nodes; ++i) {
        const size_t g = static_cast<size_t>(node_groups[i]);
        const uint8_t * bits = residency.bits + static_cast<size_t>(node_rows[i]) * residency_row_bytes(width);
        out[i] = total[g] - resident_sum(bits, weights.data() + g * width, width);
    }
}
