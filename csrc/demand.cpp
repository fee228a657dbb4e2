// demand.cpp — see demand.h.
#include "demand.h"

#include <cstring>

// The loops below are compiled twice on x86-64 — for AVX2 and for the baseline — and the
// loader picks the variant the CPU supports (GCC/Clang function multiversioning).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SNIPER_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SNIPER_VECTOR_CLONES
#endif

namespace {

inline float bf16_to_float(uint16_t bits) {
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float value;
    std::memcpy(&value, &wide, sizeof(value));
    return value;
}

}  // namespace

SNIPER_VECTOR_CLONES
void weighted_row_sum_bf16(const uint16_t * table, size_t width, const int64_t * rows, const float * weights,
                           size_t n_rows, float * out) {
    float * __restrict acc = out;
    for (size_t d = 0; d < width; ++d) {
        acc[d] = 0.0f;
    }
    size_t i = 0;
    for (; i + 4 <= n_rows; i += 4) {  // four rows a pass: a quarter of the accumulator traffic
        const uint16_t * __restrict r0 = table + static_cast<size_t>(rows[i + 0]) * width;
        const uint16_t * __restrict r1 = table + static_cast<size_t>(rows[i + 1]) * width;
        const uint16_t * __restrict r2 = table + static_cast<size_t>(rows[i + 2]) * width;
        const uint16_t * __restrict r3 = table + static_cast<size_t>(rows[i + 3]) * width;
        const float w0 = weights[i + 0], w1 = weights[i + 1], w2 = weights[i + 2], w3 = weights[i + 3];
        for (size_t d = 0; d < width; ++d) {  // vectorised by the compiler: widen, multiply, add
            acc[d] += w0 * bf16_to_float(r0[d]) + w1 * bf16_to_float(r1[d]) + w2 * bf16_to_float(r2[d]) +
                      w3 * bf16_to_float(r3[d]);
        }
    }
    for (; i < n_rows; ++i) {
        const uint16_t * __restrict row = table + static_cast<size_t>(rows[i]) * width;
        const float w = weights[i];
        for (size_t d = 0; d < width; ++d) {
            acc[d] += w * bf16_to_float(row[d]);
        }
    }
}

namespace {

uint16_t float_to_bf16(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0) {
        return static_cast<uint16_t>((bits >> 16) | 0x0040u);  // quiet NaN
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

}  // namespace

void floats_to_bf16(const float * values, size_t n, uint16_t * out) {
    for (size_t i = 0; i < n; ++i) {
        out[i] = float_to_bf16(values[i]);
    }
}
