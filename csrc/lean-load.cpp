// lean-load.cpp — see lean-load.h.
#include "lean-load.h"

#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

namespace {

struct file_id {
    uint64_t device, inode;
    bool operator==(const file_id & o) const { return device == o.device && inode == o.inode; }
};

struct mapped_range {
    uintptr_t first, last;
    file_id file;
};

std::mutex g_mutex;
std::vector<file_id> g_files;        // registered (a file may be registered more than once)
std::vector<mapped_range> g_ranges;  // mappings made without MAP_POPULATE, while their file is registered
std::atomic<uint64_t> g_n_lean_maps{0};

bool registered_fd(int fd, file_id & out) {
    struct stat st {};
    if (fd < 0 || fstat(fd, &st) != 0) { return false; }
    out = {uint64_t(st.st_dev), uint64_t(st.st_ino)};
    std::lock_guard<std::mutex> lock(g_mutex);
    return std::find(g_files.begin(), g_files.end(), out) != g_files.end();
}

void * lean_mmap(void * addr, size_t length, int prot, int flags, int fd, off_t offset) {
    file_id file{};
    if ((flags & MAP_POPULATE) && registered_fd(fd, file)) {
        void * mapped = ::mmap(addr, length, prot, flags & ~MAP_POPULATE, fd, offset);
        if (mapped != MAP_FAILED) {
            std::lock_guard<std::mutex> lock(g_mutex);
            g_ranges.push_back({uintptr_t(mapped), uintptr_t(mapped) + length, file});
            g_n_lean_maps.fetch_add(1, std::memory_order_relaxed);
        }
        return mapped;
    }
    return ::mmap(addr, length, prot, flags, fd, offset);
}

int lean_posix_madvise(void * addr, size_t length, int advice) {
    if (advice == POSIX_MADV_WILLNEED) {
        const uintptr_t first = uintptr_t(addr), last = first + length;
        std::lock_guard<std::mutex> lock(g_mutex);
        for (const mapped_range & r : g_ranges) {
            if (first >= r.first && last <= r.last) { return 0; }  // the lean load's prefetch: skipped
        }
    }
    return ::posix_madvise(addr, length, advice);
}

// The dynamic section's pointers: absolute in the loaded image on most targets, relative to the
// load base where the loader leaves them unrelocated.
uintptr_t dyn_pointer(uintptr_t value, uintptr_t base) { return value < base ? value + base : value; }

struct import_patch {
    const char * name;
    void * replacement;
    int n_patched = 0;
};

void patch_slot(uintptr_t slot, void * replacement) {
    const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
    void * page_start = reinterpret_cast<void *>(slot & ~(page - 1));
    // a GOT under full RELRO is read-only after relocation; it stays writable here afterwards,
    // as under partial RELRO (the loader's own choice for lazily bound imports)
    if (mprotect(page_start, page, PROT_READ | PROT_WRITE) != 0) { return; }
    *reinterpret_cast<void **>(slot) = replacement;
}

int patch_object(struct dl_phdr_info * info, size_t, void * data) {
    auto * patches = static_cast<std::vector<import_patch> *>(data);
    const char * name = info->dlpi_name ? info->dlpi_name : "";
    const char * base_name = std::strrchr(name, '/');
    base_name = base_name ? base_name + 1 : name;
    if (std::strncmp(base_name, "libllama.so", 11) != 0) { return 0; }
    const uintptr_t base = info->dlpi_addr;
    const ElfW(Dyn) * dyn = nullptr;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        if (info->dlpi_phdr[i].p_type == PT_DYNAMIC) {
            dyn = reinterpret_cast<const ElfW(Dyn) *>(base + info->dlpi_phdr[i].p_vaddr);
        }
    }
    if (dyn == nullptr) { return 1; }
    const ElfW(Sym) * symtab = nullptr;
    const char * strtab = nullptr;
    uintptr_t jmprel = 0, rela = 0;
    size_t jmprel_size = 0, rela_size = 0;
    for (; dyn->d_tag != DT_NULL; ++dyn) {
        switch (dyn->d_tag) {
            case DT_SYMTAB:   symtab = reinterpret_cast<const ElfW(Sym) *>(dyn_pointer(dyn->d_un.d_ptr, base)); break;
            case DT_STRTAB:   strtab = reinterpret_cast<const char *>(dyn_pointer(dyn->d_un.d_ptr, base)); break;
            case DT_JMPREL:   jmprel = dyn_pointer(dyn->d_un.d_ptr, base); break;
            case DT_PLTRELSZ: jmprel_size = dyn->d_un.d_val; break;
            case DT_RELA:     rela = dyn_pointer(dyn->d_un.d_ptr, base); break;
            case DT_RELASZ:   rela_size = dyn->d_un.d_val; break;
            default: break;
        }
    }
    if (symtab == nullptr || strtab == nullptr) { return 1; }
    // PLT slots (JUMP_SLOT) and, for code built with -fno-plt, GOT entries (GLOB_DAT)
    for (const auto & [table, size] : {std::pair{jmprel, jmprel_size}, std::pair{rela, rela_size}}) {
        if (table == 0) { continue; }
        const auto * relocs = reinterpret_cast<const ElfW(Rela) *>(table);
        for (size_t i = 0; i < size / sizeof(ElfW(Rela)); ++i) {
            const auto type = ELF64_R_TYPE(relocs[i].r_info);
#if defined(__x86_64__)
            if (type != R_X86_64_JUMP_SLOT && type != R_X86_64_GLOB_DAT) { continue; }
#elif defined(__aarch64__)
            if (type != R_AARCH64_JUMP_SLOT && type != R_AARCH64_GLOB_DAT) { continue; }
#else
            continue;
#endif
            const char * sym = strtab + symtab[ELF64_R_SYM(relocs[i].r_info)].st_name;
            for (import_patch & p : *patches) {
                if (std::strcmp(sym, p.name) == 0) {
                    patch_slot(base + relocs[i].r_offset, p.replacement);
                    ++p.n_patched;
                }
            }
        }
    }
    return 1;
}

std::string install() {
#if !(defined(__x86_64__) || defined(__aarch64__))
    return "redirecting libllama's imports is implemented for x86-64 and AArch64 only";
#else
    std::vector<import_patch> patches = {
        {"mmap", reinterpret_cast<void *>(&lean_mmap)},
        {"mmap64", reinterpret_cast<void *>(&lean_mmap)},
        {"posix_madvise", reinterpret_cast<void *>(&lean_posix_madvise)},
    };
    if (dl_iterate_phdr(patch_object, &patches) == 0) {
        return "libllama.so is not loaded in this process";
    }
    const int n_mmap = patches[0].n_patched + patches[1].n_patched;
    if (n_mmap == 0 || patches[2].n_patched == 0) {
        return "libllama.so imports no mmap/posix_madvise to redirect";
    }
    return "";
#endif
}

}  // namespace

lean_load::lean_load(const std::string & path) {
    struct stat st {};
    if (unavailable_reason().empty() && stat(path.c_str(), &st) == 0) {
        device_ = uint64_t(st.st_dev);
        inode_ = uint64_t(st.st_ino);
        std::lock_guard<std::mutex> lock(g_mutex);
        g_files.push_back({device_, inode_});
        registered_ = true;
    }
}

lean_load::~lean_load() {
    if (!registered_) { return; }
    const file_id me{device_, inode_};
    std::lock_guard<std::mutex> lock(g_mutex);
    g_files.erase(std::find(g_files.begin(), g_files.end(), me));
    if (std::find(g_files.begin(), g_files.end(), me) == g_files.end()) {
        g_ranges.erase(std::remove_if(g_ranges.begin(), g_ranges.end(),
                                      [&](const mapped_range & r) { return r.file == me; }), g_ranges.end());
    }
}

const std::string & lean_load::unavailable_reason() {
    static const std::string reason = install();  // once per process, thread-safe
    return reason;
}

uint64_t lean_load::n_lean_maps() { return g_n_lean_maps.load(std::memory_order_relaxed); }
