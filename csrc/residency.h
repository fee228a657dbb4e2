// residency.h — page-level control of a memory-mapped file's residency (Linux).
//
// Works on whole pages of the file (page indices and byte offsets, not addresses) and on the
// process's existing mapping of that file (made by someone else — llama.cpp — and found in
// /proc/self/maps):
//   load   : readahead(2) over the range's pages, then MADV_POPULATE_READ to map them. readahead
//            fills the page cache without a copy into a user buffer, in large requests, and —
//            unlike the kernel's ordinary read-ahead — with small (single-page) folios, so each
//            page can later be dropped on its own. The mapping is set MADV_RANDOM (and the file
//            descriptor POSIX_FADV_RANDOM) so that no fault's read-around brings evicted experts
//            back, and what faults do read also comes in as small folios.
//   drop   : MADV_DONTNEED on the mapping, then POSIX_FADV_DONTNEED on the file pages. The
//            kernel drops only folios lying entirely inside the range, so a drop can leave
//            pages behind when a large folio (up to 2 MiB on x86-64, read by llama.cpp's
//            sequential load) straddles the range's edge: `resident_pages` finds them.
//   count  : mincore over the range's pages.
// Page size comes from sysconf(_SC_PAGESIZE) (16 KiB on Apple silicon, 4 KiB here).
// Thread-safety: every method is const and may run concurrently on different ranges.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

struct byte_range {
    uint64_t offset = 0;  // bytes from the start of the file
    uint64_t size   = 0;  // bytes
};

// One contiguous piece of the file's mapping in this process.
struct mapping_segment {
    uintptr_t address     = 0;  // start address (page aligned)
    uint64_t  file_offset = 0;  // file offset mapped at `address` (page aligned)
    uint64_t  size        = 0;  // bytes
};

size_t residency_page_size();

class file_residency {
public:
    // Opens `path` read-only (for fadvise / readahead) and finds its mapping in /proc/self/maps.
    // Throws std::runtime_error if the file cannot be opened or is not mapped by this process.
    explicit file_residency(const std::string & path);
    ~file_residency();
    file_residency(const file_residency &) = delete;
    file_residency & operator=(const file_residency &) = delete;

    uint64_t n_pages() const { return n_pages_; }

    // Reads pages [first, end) into the page cache (small folios) and maps them. Returns bytes.
    uint64_t load_pages(uint64_t first, uint64_t end) const;
    // Reads the pages of `range` (rounded out to whole pages). Returns the bytes requested.
    uint64_t load(const byte_range & range) const;
    // Unmaps pages [first, end) and drops them from the page cache (see the header comment: a
    // page of a large folio that extends beyond the range stays).
    void drop_pages(uint64_t first, uint64_t end) const;
    // Residency of pages [first, end) (mincore): out[i] is 1 if page first + i is in memory.
    void resident_pages(uint64_t first, uint64_t end, std::vector<uint8_t> & out) const;
    // Bytes of `range`'s pages resident (mincore).
    uint64_t resident_bytes(const byte_range & range) const;

    // Address of a file offset in the mapping, or nullptr if that offset is not mapped.
    const void * address_of(uint64_t file_offset) const;

private:
    // Calls fn(address, file_offset, size) for each mapped, page-aligned piece of [first, last) (bytes).
    template <typename Fn> void for_each_mapped(uint64_t first, uint64_t last, Fn && fn) const;

    int fd_ = -1;
    size_t page_size_;
    uint64_t file_size_ = 0;
    uint64_t n_pages_ = 0;
    std::vector<mapping_segment> segments_;  // sorted by file_offset
};

// Before a file is mapped: drops whatever of it the page cache holds (large folios included,
// except pages another process maps), then reads it all back with readahead(2) — small folios,
// no copy, asynchronous (the call returns once the reads are queued; whoever touches a page
// waits for it). Afterwards every page of the file can be dropped on its own. Returns the file
// size. Throws std::runtime_error if the file cannot be opened.
uint64_t residency_preload(const std::string & path);

// Finds the mapping of a file in /proc/self/maps by device and inode (or by its resolved path,
// for file systems such as overlayfs that report the backing inode there).
std::vector<mapping_segment> residency_find_mapping(uint64_t device, uint64_t inode, const std::string & real_path);
