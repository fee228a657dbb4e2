// io-pool.h — a small pool of threads that read expert units on demand and ahead of time.
//
// Every unit has an atomic I/O state (IDLE → QUEUED → RUNNING → IDLE). Demand reads are
// served before prefetches and the calling thread works on its own demand batch alongside
// the pool, so a miss costs one parallel read instead of a queue wait. A reader claims a
// unit with a compare-and-swap, so a queued prefetch that becomes urgent is simply read by
// whoever gets it first, exactly once. Knob: n_threads (0 = no pool: demand reads run on the
// caller and prefetches are refused). The destructor stops and joins the threads.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

enum io_state : uint8_t {
    IO_STATE_IDLE    = 0,
    IO_STATE_QUEUED  = 1,
    IO_STATE_RUNNING = 2,
};

class io_pool {
public:
    using read_fn = std::function<void(int32_t unit)>;

    io_pool(size_t n_units, int n_threads, read_fn read);
    ~io_pool();
    io_pool(const io_pool &) = delete;
    io_pool & operator=(const io_pool &) = delete;

    // Reads `units` now, on the pool and the calling thread; returns when all are read.
    void read_now(const int32_t * units, size_t n);
    // Queues a background read; returns false if there is no pool or the unit is busy.
    bool read_ahead(int32_t unit);
    // Returns once `unit` has no read pending (reading it here if nobody has started; else
    // sleeping until the reader is done).
    void wait(int32_t unit);
    bool idle(int32_t unit) const { return state_[size_t(unit)].load(std::memory_order_acquire) == IO_STATE_IDLE; }

private:
    bool claim(int32_t unit);
    void run(int32_t unit);
    void worker();

    read_fn read_;
    std::unique_ptr<std::atomic<uint8_t>[]> state_;
    std::mutex mutex_;
    std::condition_variable wake_;
    std::mutex done_mutex_;            // guards the RUNNING -> IDLE transition for waiters
    std::condition_variable done_;
    std::deque<int32_t> demand_;
    std::deque<int32_t> ahead_;
    bool stop_ = false;
    std::vector<std::thread> threads_;
};
