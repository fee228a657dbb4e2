// residency.cpp — page-level residency control of a mapped file (see residency.h).
#include "residency.h"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14+
#endif

size_t residency_page_size() {
    static const size_t page_size = size_t(sysconf(_SC_PAGESIZE));
    return page_size;
}

static std::vector<mapping_segment> find_mapping(uint64_t device, uint64_t inode, const std::string & real_path) {
    std::vector<mapping_segment> segments;
    std::ifstream maps("/proc/self/maps");
    std::string line;
    while (std::getline(maps, line)) {
        // start-end perms offset major:minor inode [path]
        std::istringstream in(line);
        std::string range, perms, offset, dev, path;
        uint64_t line_inode = 0;
        if (!(in >> range >> perms >> offset >> dev >> line_inode)) { continue; }
        std::getline(in, path);
        path.erase(0, path.find_first_not_of(' '));
        const size_t dash = range.find('-');
        const size_t colon = dev.find(':');
        if (dash == std::string::npos || colon == std::string::npos) { continue; }
        const uint64_t major_id = std::stoull(dev.substr(0, colon), nullptr, 16);
        const uint64_t minor_id = std::stoull(dev.substr(colon + 1), nullptr, 16);
        const bool same_file = (line_inode == inode && makedev(major_id, minor_id) == device) ||
                               (!real_path.empty() && path == real_path);
        if (!same_file) { continue; }
        mapping_segment seg;
        seg.address = uintptr_t(std::stoull(range.substr(0, dash), nullptr, 16));
        seg.size = uint64_t(std::stoull(range.substr(dash + 1), nullptr, 16)) - seg.address;
        seg.file_offset = std::stoull(offset, nullptr, 16);
        segments.push_back(seg);
    }
    std::sort(segments.begin(), segments.end(),
              [](const mapping_segment & a, const mapping_segment & b) { return a.file_offset < b.file_offset; });
    return segments;
}

uint64_t residency_preload(const expert_file_map & map) {
    const int fd = ::open(map.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        throw std::runtime_error("cannot open model file '" + map.path + "': " + std::strerror(errno));
    }
    posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);      // exactly these pages, nothing around them
    // the non-expert extents, page-rounded and merged (neighbouring tensors share pages)
    const uint64_t ps = map.page_size ? map.page_size : residency_page_size();
    std::vector<byte_range> pages;
    for (const file_extent & x : map.extents) {
        if (x.unit != FILE_EXTENT_NON_EXPERT || x.last <= x.first) { continue; }
        const uint64_t lo = x.first / ps * ps, hi = (x.last + ps - 1) / ps * ps;
        if (!pages.empty() && lo <= pages.back().offset + pages.back().size) {
            pages.back().size = std::max(pages.back().size, hi - pages.back().offset);
        } else {
            pages.push_back({lo, hi - lo});
        }
    }
    constexpr uint64_t CHUNK = 8u << 20;
    uint64_t bytes = 0;
    for (const byte_range & r : pages) {
        for (uint64_t off = r.offset; off < r.offset + r.size; off += CHUNK) {
            readahead(fd, off64_t(off), size_t(std::min<uint64_t>(CHUNK, r.offset + r.size - off)));
        }
        bytes += r.size;
    }
    ::close(fd);
    return bytes;
}

std::vector<mapping_segment> residency_mappings_of(const std::string & path) {
    struct stat st {};
    if (stat(path.c_str(), &st) != 0) { return {}; }
    char resolved[PATH_MAX];
    const std::string real_path = realpath(path.c_str(), resolved) ? std::string(resolved) : std::string();
    return find_mapping(uint64_t(st.st_dev), uint64_t(st.st_ino), real_path);
}

file_residency::file_residency(const std::string & path, const std::vector<mapping_segment> & before)
    : page_size_(residency_page_size()) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) {
        throw std::runtime_error("cannot open model file '" + path + "': " + std::strerror(errno));
    }
    struct stat st {};
    if (fstat(fd_, &st) != 0) {
        const std::string err = std::strerror(errno);
        ::close(fd_);
        throw std::runtime_error("cannot stat model file '" + path + "': " + err);
    }
    file_size_ = uint64_t(st.st_size);
    n_pages_ = (file_size_ + page_size_ - 1) / page_size_;
    // Dirty pages (a model just written) cannot be dropped: write them back first.
    fdatasync(fd_);
    char resolved[PATH_MAX];
    const std::string real_path = realpath(path.c_str(), resolved) ? std::string(resolved) : std::string();
    for (const mapping_segment & seg : find_mapping(uint64_t(st.st_dev), uint64_t(st.st_ino), real_path)) {
        const bool earlier = std::any_of(before.begin(), before.end(), [&](const mapping_segment & b) {
            return seg.address < b.address + b.size && b.address < seg.address + seg.size;
        });
        if (!earlier) { segments_.push_back(seg); }  // this load's mapping, not another engine's
    }
    if (segments_.empty()) {
        ::close(fd_);
        throw std::runtime_error("model file '" + path + "' is not memory-mapped by this load "
                                 "(load it with use_mmap=true before attaching the expert cache)");
    }
    // Without this, every fault or populate reads ~128 KiB around it and brings evicted
    // neighbours back: the cache decides what is read, not the kernel's read-around.
    for (const mapping_segment & seg : segments_) {
        madvise(reinterpret_cast<void *>(seg.address), seg.size, MADV_RANDOM);
    }
    // Our own reads fetch exactly the requested range, and nothing beyond (llama.cpp's load set
    // the file POSIX_FADV_SEQUENTIAL on its own descriptor; that one is closed after load).
    posix_fadvise(fd_, 0, 0, POSIX_FADV_RANDOM);
}

file_residency::~file_residency() {
    if (fd_ >= 0) { ::close(fd_); }
}

template <typename Fn>
void file_residency::for_each_mapped(uint64_t first, uint64_t last, Fn && fn) const {
    for (const mapping_segment & seg : segments_) {
        const uint64_t seg_end = seg.file_offset + seg.size;
        const uint64_t lo = std::max(first, seg.file_offset);
        const uint64_t hi = std::min(last, seg_end);
        if (lo >= hi) { continue; }
        fn(reinterpret_cast<char *>(seg.address + (lo - seg.file_offset)), lo, hi - lo);
    }
}

const void * file_residency::address_of(uint64_t file_offset) const {
    for (const mapping_segment & seg : segments_) {
        if (file_offset >= seg.file_offset && file_offset < seg.file_offset + seg.size) {
            return reinterpret_cast<const void *>(seg.address + (file_offset - seg.file_offset));
        }
    }
    return nullptr;
}

uint64_t file_residency::load_pages(uint64_t first, uint64_t end) const {
    // Two steps: readahead(2) puts the pages in the page cache in large requests without a
    // copy (and as single-page folios, which later drop exactly); MADV_POPULATE_READ then maps
    // them (minor faults only, no 4 KiB fault later inside the matrix multiply).
    const uint64_t ps = page_size_;
    end = std::min(end, n_pages_);
    if (end <= first) { return 0; }
    constexpr uint64_t CHUNK = 8u << 20;  // bytes per readahead call
    for (uint64_t off = first * ps; off < end * ps; off += CHUNK) {
        const size_t len = size_t(std::min<uint64_t>(CHUNK, end * ps - off));
        if (readahead(fd_, off64_t(off), len) != 0) {  // a file system without readahead: read it
            thread_local std::vector<char> scratch(1 << 20);
            for (uint64_t done = off; done < off + len;) {
                const ssize_t got = pread(fd_, scratch.data(), size_t(std::min<uint64_t>(scratch.size(), off + len - done)),
                                          off_t(done));
                if (got <= 0) { break; }
                done += uint64_t(got);
            }
        }
    }
    uint64_t bytes = 0;
    for_each_mapped(first * ps, end * ps, [&](char * address, uint64_t, uint64_t size) {
        bytes += size;
        if (madvise(address, size, MADV_POPULATE_READ) == 0) { return; }
        volatile char sink = 0;  // kernels before 5.14: touch each page
        for (uint64_t i = 0; i < size; i += ps) { sink = sink + address[i]; }
    });
    return bytes;
}

uint64_t file_residency::load(const byte_range & range) const {
    const uint64_t ps = page_size_;
    return load_pages(range.offset / ps, (range.offset + range.size + ps - 1) / ps);
}

void file_residency::drop_pages(uint64_t first, uint64_t end) const {
    const uint64_t ps = page_size_;
    end = std::min(end, n_pages_);
    if (end <= first) { return; }
    for_each_mapped(first * ps, end * ps, [&](char * address, uint64_t, uint64_t size) {
        madvise(address, size, MADV_DONTNEED);
    });
    posix_fadvise(fd_, off_t(first * ps), off_t((end - first) * ps), POSIX_FADV_DONTNEED);
}

void file_residency::resident_pages(uint64_t first, uint64_t end, std::vector<uint8_t> & out) const {
    const uint64_t ps = page_size_;
    end = std::min(end, n_pages_);
    out.assign(size_t(end > first ? end - first : 0), 0);
    if (end <= first) { return; }
    for_each_mapped(first * ps, end * ps, [&](char * address, uint64_t offset, uint64_t size) {
        unsigned char * vec = out.data() + (offset / ps - first);
        if (mincore(address, size, vec) != 0) { return; }
        for (uint64_t i = 0; i < (size + ps - 1) / ps; ++i) { vec[i] &= 1; }
    });
}

uint64_t file_residency::resident_bytes(const byte_range & range) const {
    const uint64_t ps = page_size_;
    const uint64_t first = range.offset / ps * ps;
    const uint64_t last = (range.offset + range.size + ps - 1) / ps * ps;
    uint64_t bytes = 0;
    thread_local std::vector<unsigned char> vec;
    for_each_mapped(first, last, [&](char * address, uint64_t, uint64_t size) {
        const size_t n_pages = size_t((size + ps - 1) / ps);
        vec.resize(n_pages);
        if (mincore(address, size, vec.data()) != 0) { return; }
        for (size_t i = 0; i < n_pages; ++i) { bytes += (vec[i] & 1) ? ps : 0; }
    });
    return bytes;
}

unit_residency::unit_residency(const expert_file_map & map, const std::vector<mapping_segment> & before)
    : map_(map), file_(map.path, before) {
    const size_t n_units = map_.slices.size();
    resident_.reset(new std::atomic<uint8_t>[n_units]);
    for (size_t u = 0; u < n_units; ++u) { resident_[u].store(0, std::memory_order_relaxed); }
    drops_pending_.reserve(n_units);

    // Pages that hold expert bytes and nothing else, merged: what measured_resident_bytes counts.
    const uint64_t ps = map_.page_size;
    std::vector<std::pair<uint64_t, uint64_t>> pages;  // [first, last) page indices
    for (const auto & unit_slices : map_.slices) {
        for (const expert_slice & s : unit_slices) {
            uint64_t first = s.range.offset / ps;
            uint64_t last = (s.range.offset + s.range.size + ps - 1) / ps;
            if (s.head_owner == -2) { first++; }
            if (s.tail_owner == -2) { last--; }
            if (last > first) { pages.emplace_back(first, last); }
        }
    }
    std::sort(pages.begin(), pages.end());
    for (const auto & p : pages) {
        if (!expert_pages_.empty() && p.first * ps <= expert_pages_.back().offset + expert_pages_.back().size) {
            byte_range & back = expert_pages_.back();
            back.size = std::max(back.offset + back.size, p.second * ps) - back.offset;
        } else {
            expert_pages_.push_back(byte_range{p.first * ps, (p.second - p.first) * ps});
        }
    }
}

unit_residency::~unit_residency() {
    io_.reset();  // join the readers before the mapping bookkeeping goes
}

void unit_residency::establish(cache_policy & policy) {
    // Admission order: experts 0, 1, ... of every layer in turn (spread over layers).
    const int n_layers = policy.n_layers(), n_experts = policy.n_experts();
    for (int e = 0; e < n_experts; ++e) {
        for (int il = 0; il < n_layers; ++il) {
            const int32_t u = int32_t(il * n_experts + e);
            if (map_.unit_bytes[size_t(u)] > 0 && unit_resident_bytes(u) == map_.unit_bytes[size_t(u)] &&
                policy.admit_resident(u)) {
                resident_[size_t(u)].store(1, std::memory_order_release);
            }
        }
    }
    // Every page nothing needs goes, in maximal runs (one call per run, so whole large folios
    // inside a run go too); then the folios that straddle a kept page are split.
    std::vector<uint8_t> needed;
    needed_pages(0, file_.n_pages(), needed);
    for (uint64_t p = 0; p < needed.size();) {
        if (needed[p]) { ++p; continue; }
        uint64_t end = p;
        while (end < needed.size() && !needed[end]) { ++end; }
        file_.drop_pages(p, end);
        p = end;
    }
    std::vector<uint64_t> stray;
    stray_pages(0, file_.n_pages(), stray);
    split_folios(std::move(stray));
}

void unit_residency::start_io(int n_threads) {
    io_ = std::make_unique<io_pool>(map_.slices.size(), n_threads,
                                    [this](int32_t unit) { read_unit(unit); }, [this](int32_t unit) { drop_unit(unit); });
}

void unit_residency::needed_pages(uint64_t first, uint64_t end, std::vector<uint8_t> & needed) const {
    const uint64_t ps = map_.page_size;
    needed.assign(size_t(end > first ? end - first : 0), 0);
    if (end <= first) { return; }
    // the first extent that ends after the range starts (extents are sorted and disjoint)
    auto it = std::upper_bound(map_.extents.begin(), map_.extents.end(), first * ps,
                               [](uint64_t offset, const file_extent & x) { return offset < x.last; });
    for (; it != map_.extents.end() && it->first < end * ps; ++it) {
        if (it->unit != FILE_EXTENT_NON_EXPERT && !resident_[size_t(it->unit)].load(std::memory_order_acquire)) { continue; }
        const uint64_t lo = std::max(it->first / ps, first);
        const uint64_t hi = std::min((it->last + ps - 1) / ps, end);
        for (uint64_t p = lo; p < hi; ++p) { needed[size_t(p - first)] = 1; }
    }
}

void unit_residency::stray_pages(uint64_t first, uint64_t end, std::vector<uint64_t> & out) const {
    std::vector<uint8_t> needed, resident;
    needed_pages(first, end, needed);
    file_.resident_pages(first, end, resident);
    for (size_t i = 0; i < needed.size(); ++i) {
        if (resident[i] && !needed[i]) { out.push_back(first + i); }
    }
}

void unit_residency::split_folios(std::vector<uint64_t> pages) {
    constexpr int HELD_ELSEWHERE_LIMIT = 4;  // blocks seen held by another mapping before splits stop
    std::lock_guard<std::mutex> lock(split_mutex_);  // drops run on I/O threads too
    if (n_blocks_held_elsewhere_ >= HELD_ELSEWHERE_LIMIT) {
        counters_.n_pages_held_elsewhere += pages.size();
        return;
    }
    const uint64_t ps = map_.page_size;
    std::vector<uint8_t> needed, after;
    for (uint64_t block_bytes = 2u << 20; !pages.empty() && block_bytes <= (64u << 20); block_bytes *= 2) {
        const uint64_t block = std::max<uint64_t>(1, block_bytes / ps);  // pages
        std::vector<uint64_t> blocks;
        for (uint64_t p : pages) {
            if (blocks.empty() || blocks.back() != p / block) { blocks.push_back(p / block); }
        }
        std::vector<uint64_t> left;
        for (uint64_t b : blocks) {
            const uint64_t first = b * block, end = std::min(first + block, file_.n_pages());
            file_.drop_pages(first, end);
            counters_.n_folio_splits++;
            file_.resident_pages(first, end, after);
            const size_t n_stayed = size_t(std::count(after.begin(), after.end(), uint8_t(1)));
            needed_pages(first, end, needed);
            for (uint64_t p = first; p < end;) {
                if (!needed[size_t(p - first)]) { ++p; continue; }
                uint64_t run_end = p;
                while (run_end < end && needed[size_t(run_end - first)]) { ++run_end; }
                counters_.bytes_split_reread += file_.load_pages(p, run_end);
                p = run_end;
            }
            if (n_stayed == after.size()) {  // the whole block stayed: a folio larger than it, try a larger block
                stray_pages(first, end, left);
            } else if (n_stayed > 0) {  // some pages went, some stayed: mapped by another process
                std::vector<uint64_t> held;
                stray_pages(first, end, held);
                counters_.n_pages_held_elsewhere += held.size();
                if (!held.empty() && ++n_blocks_held_elsewhere_ >= HELD_ELSEWHERE_LIMIT) { return; }
            }
        }
        pages.swap(left);
    }
    if (!pages.empty()) {  // even 64 MiB blocks stayed whole: held elsewhere too
        counters_.n_pages_held_elsewhere += pages.size();
        ++n_blocks_held_elsewhere_;
    }
}

void unit_residency::read_unit(int32_t unit) {
    for (const expert_slice & s : map_.slices[size_t(unit)]) { file_.load(s.range); }
}

void unit_residency::drop_unit(int32_t unit) {
    // The pages of each slice; a boundary page that a resident neighbour or non-expert data
    // shares stays (it belongs to that neighbour's footprint). Checked afterwards: a page left
    // behind sits in a large folio that reaches beyond the slice, which split_folios divides.
    // Runs on an I/O thread (or the caller): residency is read from the mirror, not the policy.
    const uint64_t ps = map_.page_size;
    thread_local std::vector<uint8_t> pages;
    thread_local std::vector<uint64_t> stray;
    stray.clear();
    for (const expert_slice & s : map_.slices[size_t(unit)]) {
        uint64_t first = s.range.offset / ps;
        uint64_t end = (s.range.offset + s.range.size + ps - 1) / ps;
        needed_pages(first, first + 1, pages);
        if (pages[0]) { first++; }
        if (end > first) {
            needed_pages(end - 1, end, pages);
            if (pages[0]) { end--; }
        }
        if (end <= first) { continue; }
        file_.drop_pages(first, end);
        file_.resident_pages(first, end, pages);
        for (size_t i = 0; i < pages.size(); ++i) {
            if (pages[i]) { stray.push_back(first + i); }
        }
    }
    if (!stray.empty()) { split_folios(stray); }
}

void unit_residency::mark(const cache_plan & plan) {
    for (int32_t u : plan.evict) { resident_[size_t(u)].store(0, std::memory_order_release); }
    for (int32_t u : plan.load) { resident_[size_t(u)].store(1, std::memory_order_release); }
}

void unit_residency::drop_units(const std::vector<int32_t> & units) {
    for (int32_t u : units) {
        if (io_) {
            io_->drop_later(u);  // off the compute thread; a read of u before it runs cancels it
            drops_pending_.push_back(u);
        } else {
            drop_unit(u);
        }
    }
}

void unit_residency::flush_drops() {
    for (int32_t u : drops_pending_) { io_->wait(u); }
    drops_pending_.clear();
}

uint64_t unit_residency::measured_resident_bytes() const {
    uint64_t bytes = 0;
    for (const byte_range & r : expert_pages_) { bytes += file_.resident_bytes(r); }
    return bytes;
}

uint64_t unit_residency::unit_resident_bytes(int32_t unit) const {
    uint64_t resident = 0;
    for (const expert_slice & s : map_.slices[size_t(unit)]) { resident += file_.resident_bytes(s.range); }
    return resident;
}

int unit_residency::reconcile(cache_policy & policy) {
    const uint64_t ps = map_.page_size;
    std::vector<int32_t> lost;
    const int32_t n_units = int32_t(map_.slices.size());
    for (int32_t u = 0; u < n_units; ++u) {
        if (!policy.is_resident(u) || (io_ && !io_->idle(u))) { continue; }
        if (unit_resident_bytes(u) + ps < map_.unit_bytes[size_t(u)]) {  // more than one page gone
            policy.forget(u);
            resident_[size_t(u)].store(0, std::memory_order_release);
            lost.push_back(u);
        }
    }
    drop_units(lost);  // the rest of their pages: a unit is resident whole or not at all
    flush_drops();
    std::lock_guard<std::mutex> lock(split_mutex_);
    counters_.n_units_reclaimed += lost.size();
    return int(lost.size());
}

residency_counters unit_residency::counters() const {
    std::lock_guard<std::mutex> lock(split_mutex_);
    return counters_;
}
