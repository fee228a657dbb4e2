// prefix-hash.h — cumulative hashes of a token sequence's whole blocks: the key of a KV prefix.
//
// hashes[i] stands for tokens[0, (i + 1) * block): every token is folded into a 64-bit state
// (xor, then the splitmix64 finaliser, a bijection that spreads each bit over the whole word),
// and the state after each whole block is that block's hash. Nodes report the hashes of the
// prefixes whose KV state they hold; the router hashes a prompt the same way, and the longest
// hash a node shares with it is the prefix that node need not prefill. The same tokens give the
// same hashes on every machine and in every process (no seed, no pointer, no byte order).
#pragma once

#include <cstddef>
#include <cstdint>

// How many hashes prefix_hashes writes: one per whole block, at most max_blocks. block >= 1.
inline size_t prefix_hash_count(size_t n_tokens, size_t block, size_t max_blocks) {
    return n_tokens / block < max_blocks ? n_tokens / block : max_blocks;
}

// Writes prefix_hash_count(n_tokens, block, max_blocks) hashes to out and returns how many.
size_t prefix_hashes(const int64_t * tokens, size_t n_tokens, size_t block, size_t max_blocks, uint64_t * out);
