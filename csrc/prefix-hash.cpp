// prefix-hash.cpp — see prefix-hash.h.
#include "prefix-hash.h"

namespace {

constexpr uint64_t PREFIX_HASH_SEED = 0x243f6a8885a308d3ull;  // the first digits of pi: any fixed value

inline uint64_t splitmix64_finalise(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

}  // namespace

size_t prefix_hashes(const int64_t * tokens, size_t n_tokens, size_t block, size_t max_blocks, uint64_t * out) {
    const size_t n_blocks = prefix_hash_count(n_tokens, block, max_blocks);
    uint64_t state = PREFIX_HASH_SEED;
    for (size_t i = 0; i < n_blocks; ++i) {
        for (size_t t = i * block; t < (i + 1) * block; ++t) {
            state = splitmix64_finalise(state ^ static_cast<uint64_t>(tokens[t]));
        }
        out[i] = state;
    }
    return n_blocks;
}
