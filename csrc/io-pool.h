// io-pool.h — a small pool of threads that read expert units (on demand and ahead of time) and
// drop evicted ones off the compute thread.
//
// Every unit has an atomic I/O state (IDLE → QUEUED → RUNNING → IDLE) and the kind of job that
// is queued or running on it (READ or DROP). Demand reads are served first, then reads ahead,
// then drops; the calling thread works on its own demand batch alongside the pool, so a miss
// costs one parallel read instead of a queue wait. A job is claimed with a compare-and-swap, so
// a queued read that becomes urgent is simply run by whoever gets it first, exactly once. A
// read of a unit whose drop is still queued cancels the drop (the pages are wanted again); a
// read of a unit whose drop is running waits for it, so a drop never removes pages read after
// it was asked for. Knob: n_threads (0 = no pool: demand reads and drops run on the caller and
// reads ahead are refused). Waiting sleeps on a condition variable. The destructor runs the
// drops still queued, then stops and joins the threads.
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

enum io_job : uint8_t {
    IO_JOB_READ = 0,
    IO_JOB_DROP = 1,
};

class io_pool {
public:
    using unit_fn = std::function<void(int32_t unit)>;

    io_pool(size_t n_units, int n_threads, unit_fn read, unit_fn drop);
    ~io_pool();
    io_pool(const io_pool &) = delete;
    io_pool & operator=(const io_pool &) = delete;

    // Reads `units` now, on the pool and the calling thread; returns when all are read.
    void read_now(const int32_t * units, size_t n);
    // Queues a background read; returns false if there is no pool or a read of it is already
    // queued or running (a drop still queued is cancelled first).
    bool read_ahead(int32_t unit);
    // Queues a drop (run on the caller at once when there is no pool or the unit is busy).
    void drop_later(int32_t unit);
    // Returns once `unit` has no job pending (running a queued one here if nobody has started;
    // else sleeping until its runner is done).
    void wait(int32_t unit);
    bool idle(int32_t unit) const { return state_[size_t(unit)].load(std::memory_order_acquire) == IO_STATE_IDLE; }

private:
    bool claim(int32_t unit);
    bool cancel_drop(int32_t unit);  // a queued drop of `unit` will not run; false if none was queued
    void run(int32_t unit);
    void finish(int32_t unit);
    void worker();

    unit_fn read_;
    unit_fn drop_;
    std::unique_ptr<std::atomic<uint8_t>[]> state_;
    std::unique_ptr<std::atomic<uint8_t>[]> job_;
    std::mutex mutex_;
    std::condition_variable wake_;
    std::mutex done_mutex_;            // guards the RUNNING -> IDLE transition for waiters
    std::condition_variable done_;
    std::deque<int32_t> demand_;
    std::deque<int32_t> ahead_;
    std::deque<int32_t> drops_;
    bool stop_ = false;
    std::vector<std::thread> threads_;
};
