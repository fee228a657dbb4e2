// lean-load.h — loading a model without llama.cpp reading the whole file first (Linux, ELF).
//
// llama.cpp maps a model with MAP_POPULATE and advises POSIX_MADV_WILLNEED over the whole file
// (src/llama-mmap.cpp: prefetch is always on when a model loads; only a NUMA machine or
// arch-marked lazy tensors turn it off), so every load reads the entire file: at 17–32 GB,
// minutes of disk, and past the memory a node may use, a full pass of churn that pushes
// everything else out of the page cache before the first token. No parameter turns it off.
//
// While a `lean_load` for a file lives, libllama's mmap() of that file loses MAP_POPULATE and
// its posix_madvise(POSIX_MADV_WILLNEED) over that mapping is skipped: the load maps the file
// and reads nothing; the expert cache then reads what it keeps (the non-expert pages before
// the load, experts on demand). Mechanism: libllama.so's imports of mmap and posix_madvise
// (its GOT slots, found with dl_iterate_phdr and its dynamic relocations) are pointed, once per
// process, at wrappers that pass every other call through unchanged. Where that cannot be done
// (libllama not loaded yet, no such imports), `lean_load::unavailable_reason()` says why and a
// load reads the whole file as before — slower, never wrong.
#pragma once

#include <cstdint>
#include <string>

class lean_load {
public:
    // Registers `path` (by device and inode) for the lifetime of this object. Never throws for
    // a file that cannot be stat'ed: nothing is registered then.
    explicit lean_load(const std::string & path);
    ~lean_load();
    lean_load(const lean_load &) = delete;
    lean_load & operator=(const lean_load &) = delete;

    // "" when libllama's imports are redirected (installing them on first use), else why not.
    static const std::string & unavailable_reason();
    // Loads of registered files that went without MAP_POPULATE so far (this process).
    static uint64_t n_lean_maps();

private:
    uint64_t device_ = 0;
    uint64_t inode_ = 0;
    bool registered_ = false;
};
