// residency.h — the residency of the expert cache's units in the page cache (Linux), in two levels.
//
// file_residency: page-level control of a memory-mapped file. Works on whole pages of the file
// (page indices and byte offsets, not addresses) and on the process's existing mapping of that
// file (made by someone else — llama.cpp — and found in /proc/self/maps):
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
//
// unit_residency: the cache's units (one expert of one layer: its slices of every expert
// tensor, see expert_file_map) kept in the page cache exactly as the policy decides, and
// the policy kept honest about what the kernel holds:
//   mirror   : the policy's residency per unit, readable from I/O threads (mark()); a page is
//              needed while it holds non-expert bytes or bytes of a resident unit.
//   I/O      : reads and drops of units on an io_pool (drops off the compute thread, flushed
//              between steps). A unit's drop spares a boundary page a needed neighbour shares.
//   folios   : a drop that leaves pages behind (a large folio straddling the unit's edge,
//              DESIGN.md, page cache) is repaired by dropping the aligned block holding them
//              whole and reading back what in it is needed, as small folios; the block doubles
//              (2 MiB .. 64 MiB) while a whole block stays. A page that stays while others of its
//              block went is mapped by another process (nodes sharing the file on one machine):
//              after HELD_ELSEWHERE_LIMIT (4) such blocks, repairs stop for good.
//   reconcile: units the policy believes resident of which the kernel took more than one page
//              (memory pressure, another process) are forgotten and the rest of them dropped.
// Counters: residency_counters (telemetry.h) n_folio_splits, bytes_split_reread,
// n_units_reclaimed, n_pages_held_elsewhere; its ns_* timings belong to the eval callback.
#pragma once

#include "cache-core.h"
#include "io-pool.h"
#include "telemetry.h"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
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
    // Opens `path` read-only (for fadvise / readahead) and finds its mapping in /proc/self/maps,
    // leaving out the mappings in `before` (made before this model's load: another engine's).
    // Throws std::runtime_error if the file cannot be opened or has no other mapping here.
    file_residency(const std::string & path, const std::vector<mapping_segment> & before);
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

// The mappings of a file in this process (/proc/self/maps, by device and inode or by its
// resolved path, for file systems such as overlayfs that report the backing inode there), sorted
// by file offset; empty if the file cannot be read or is not mapped.
std::vector<mapping_segment> residency_mappings_of(const std::string & path);

// One expert's slice of one tensor, and who shares its boundary pages.
struct expert_slice {
    byte_range range;            // file offsets
    int32_t head_owner = -1;     // unit sharing the first page; -1 none (page aligned), -2 non-expert data
    int32_t tail_owner = -1;     // unit sharing the last page;  -1 none, -2 non-expert data
};

// A byte range of the file and what lives there: one expert slice (unit >= 0) or anything
// else llama.cpp needs (FILE_EXTENT_NON_EXPERT: the GGUF header, attention, norms, ...).
constexpr int32_t FILE_EXTENT_NON_EXPERT = -2;
struct file_extent {
    uint64_t first = 0;  // file offset of the first byte
    uint64_t last  = 0;  // file offset one past the last byte
    int32_t  unit  = FILE_EXTENT_NON_EXPERT;
};

// Where the cache's units lie in the file, page-wise: what unit_residency needs of a model's
// layout (found by expert_layout_discover, llama-glue.h). Unit id = layer * n_experts + expert.
struct expert_file_map {
    std::string path;
    size_t page_size = 0;
    std::vector<std::vector<expert_slice>> slices;   // [unit] its slices
    std::vector<uint64_t> unit_bytes;                // [unit] page-rounded footprint
    std::vector<file_extent> extents;                // every tensor's bytes and the header, sorted, disjoint
};

// Before the file is mapped: reads its non-expert pages with readahead(2) — small folios, no
// copy, asynchronous (the call returns once the reads are queued; whoever touches a page waits
// for it). Experts are read when the cache keeps them, as small folios, so they drop exactly;
// what the page cache already holds of the file stays (a restarted node, another node on the
// machine: attach() admits the experts it finds whole and repairs the large folios it drops).
// Returns the bytes requested. Throws std::runtime_error if the file cannot be opened.
uint64_t residency_preload(const expert_file_map & map);

class unit_residency {
public:
    // Finds this load's mapping of map.path (leaving out `before`, another engine's mappings)
    // and notes the pages that hold expert bytes only. Reads and drops run on the caller until
    // start_io. `map` must outlive this object. Throws std::runtime_error as file_residency does.
    unit_residency(const expert_file_map & map, const std::vector<mapping_segment> & before);
    ~unit_residency();  // joins the I/O threads (running the drops still queued) first
    unit_residency(const unit_residency &) = delete;
    unit_residency & operator=(const unit_residency &) = delete;

    // Establishes the budget (DESIGN.md: llama.cpp reads the whole file at load): admits to
    // `policy` the units fully resident now, experts 0, 1, ... of every layer in turn, while its
    // budget allows; drops every page nothing needs, then repairs the folios left straddling.
    void establish(cache_policy & policy);
    // Starts the I/O pool (n_threads as io_pool's; 0: none).
    void start_io(int n_threads);
    io_pool & io() { return *io_; }
    // The file's page-level control (addresses of its mapping, mincore).
    const file_residency & file() const { return file_; }

    // Mirrors a plan into the residency the I/O threads consult (evict -> 0, load -> 1).
    void mark(const cache_plan & plan);
    // Drops units' pages off the compute thread (io_pool::drop_later; at once without a pool);
    // flush_drops waits for them.
    void drop_units(const std::vector<int32_t> & units);
    void flush_drops();

    // Bytes of pages holding only expert data resident in memory now (mincore, each page once).
    uint64_t measured_resident_bytes() const;
    // Units `policy` believes resident, with no I/O pending, of which the kernel took more than
    // one page: the policy forgets them and what is left of their pages is dropped (a unit is
    // resident whole or not at all). Between steps only. Returns how many.
    int reconcile(cache_policy & policy);
    // The page-level counters (ns_* are left 0: the eval callback's).
    residency_counters counters() const;

private:
    // needed[i] = 1 if page first + i holds non-expert bytes or bytes of a resident unit.
    void needed_pages(uint64_t first, uint64_t end, std::vector<uint8_t> & needed) const;
    // Pages of [first, end) that are resident although no resident unit or non-expert data
    // needs them: what a drop left behind (a large folio straddling its edge).
    void stray_pages(uint64_t first, uint64_t end, std::vector<uint64_t> & out) const;
    // The folio repair of the header comment, for the blocks holding `pages`.
    void split_folios(std::vector<uint64_t> pages);
    uint64_t unit_resident_bytes(int32_t unit) const;  // bytes of the unit's slices in the page cache
    void read_unit(int32_t unit);  // any thread
    void drop_unit(int32_t unit);  // any thread: the unit's pages now

    const expert_file_map & map_;
    file_residency file_;
    // The policy's residency, readable from I/O threads (the policy itself is the compute
    // thread's): what needed_pages and drops consult.
    std::unique_ptr<std::atomic<uint8_t>[]> resident_;
    std::vector<byte_range> expert_pages_;  // merged pages holding only expert bytes
    std::vector<int32_t> drops_pending_;    // drops queued since the last flush
    mutable std::mutex split_mutex_;        // drops run on I/O threads too
    residency_counters counters_;           // under split_mutex_
    int n_blocks_held_elsewhere_ = 0;       // under split_mutex_; repairs stop at HELD_ELSEWHERE_LIMIT
    std::unique_ptr<io_pool> io_;           // declared last: destroyed (joined) first
};
