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

std::vector<mapping_segment> residency_find_mapping(uint64_t device, uint64_t inode, const std::string & real_path) {
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

uint64_t residency_preload(const std::string & path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        throw std::runtime_error("cannot open model file '" + path + "': " + std::strerror(errno));
    }
    struct stat st {};
    const uint64_t size = fstat(fd, &st) == 0 ? uint64_t(st.st_size) : 0;
    fdatasync(fd);                                   // dirty pages cannot be dropped
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);      // exactly these pages, nothing around them
    constexpr uint64_t CHUNK = 8u << 20;
    for (uint64_t off = 0; off < size; off += CHUNK) {
        readahead(fd, off64_t(off), size_t(std::min<uint64_t>(CHUNK, size - off)));
    }
    ::close(fd);
    return size;
}

file_residency::file_residency(const std::string & path) : page_size_(residency_page_size()) {
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
    segments_ = residency_find_mapping(uint64_t(st.st_dev), uint64_t(st.st_ino), real_path);
    if (segments_.empty()) {
        ::close(fd_);
        throw std::runtime_error("model file '" + path + "' is not memory-mapped by this process "
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
