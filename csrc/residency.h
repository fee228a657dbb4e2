// residency.h — page-level control of a memory-mapped file's residency (Linux).
//
// Works on byte ranges of the file (offsets, not addresses) and on the process's existing
// mapping of that file (made by someone else — llama.cpp — and found in /proc/self/maps):
//   load   : pread of the range's whole pages in 1 MiB requests (large reads into the page
//            cache), then MADV_POPULATE_READ to map them: no 4 KiB faults later inside the
//            matrix multiply. The mapping is set MADV_RANDOM so that nothing else (a fault's
//            read-around) brings evicted experts back.
//   drop   : MADV_DONTNEED on the mapping, then POSIX_FADV_DONTNEED on the file range, so the
//            pages really leave the page cache (DESIGN.md "budget"); boundary pages shared with
//            a neighbour that must stay can be kept.
//   count  : mincore over the range's pages.
// Page size comes from sysconf(_SC_PAGESIZE) (16 KiB on Apple silicon, 4 KiB here).
// Thread-safety: load/drop/resident_bytes may run concurrently on different ranges.
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
    // Opens `path` read-only (for fadvise / pread) and finds its mapping in /proc/self/maps.
    // Throws std::runtime_error if the file cannot be opened or is not mapped by this process.
    explicit file_residency(const std::string & path);
    ~file_residency();
    file_residency(const file_residency &) = delete;
    file_residency & operator=(const file_residency &) = delete;

    // Reads the pages of `range` into memory. Returns the bytes requested (page-rounded).
    uint64_t load(const byte_range & range) const;
    // Drops the pages of `range`; the first/last page is read back when keep_head/keep_tail and
    // the range does not start/end on a page boundary (the page is shared with a neighbour).
    void drop(const byte_range & range, bool keep_head, bool keep_tail) const;
    // Bytes of `range`'s pages resident in this process's mapping (mincore).
    uint64_t resident_bytes(const byte_range & range) const;

    // Address of a file offset in the mapping, or nullptr if that offset is not mapped.
    const void * address_of(uint64_t file_offset) const;

private:
    // Calls fn(address, file_offset, size) for each mapped, page-aligned piece of [first, last).
    template <typename Fn> void for_each_mapped(uint64_t first, uint64_t last, Fn && fn) const;

    int fd_ = -1;
    size_t page_size_;
    uint64_t file_size_ = 0;
    std::vector<mapping_segment> segments_;  // sorted by file_offset
};

// Finds the mapping of a file in /proc/self/maps by device and inode (or by its resolved path,
// for file systems such as overlayfs that report the backing inode there).
std::vector<mapping_segment> residency_find_mapping(uint64_t device, uint64_t inode, const std::string & real_path);
