// io-pool.cpp — I/O thread pool for expert reads and drops (see io-pool.h).
#include "io-pool.h"

io_pool::io_pool(size_t n_units, int n_threads, unit_fn read, unit_fn drop)
    : read_(std::move(read)), drop_(std::move(drop)),
      state_(new std::atomic<uint8_t>[n_units]), job_(new std::atomic<uint8_t>[n_units]) {
    for (size_t i = 0; i < n_units; ++i) {
        state_[i].store(IO_STATE_IDLE, std::memory_order_relaxed);
        job_[i].store(IO_JOB_READ, std::memory_order_relaxed);
    }
    for (int i = 0; i < n_threads; ++i) { threads_.emplace_back([this] { worker(); }); }
}

io_pool::~io_pool() {
    std::deque<int32_t> drops;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_ = true;
        drops.swap(drops_);
    }
    wake_.notify_all();
    for (std::thread & t : threads_) { t.join(); }
    for (int32_t unit : drops) {  // evicted pages leave memory even when the cache goes
        if (claim(unit)) { run(unit); }
    }
}

bool io_pool::claim(int32_t unit) {
    uint8_t expected = IO_STATE_QUEUED;
    return state_[size_t(unit)].compare_exchange_strong(expected, IO_STATE_RUNNING, std::memory_order_acq_rel);
}

bool io_pool::cancel_drop(int32_t unit) {
    if (job_[size_t(unit)].load(std::memory_order_acquire) != IO_JOB_DROP || !claim(unit)) { return false; }
    if (job_[size_t(unit)].load(std::memory_order_acquire) != IO_JOB_DROP) {  // claimed a read after all: run it
        run(unit);
        return false;
    }
    finish(unit);  // the queue entry finds the unit idle and skips it
    return true;
}

void io_pool::finish(int32_t unit) {
    {
        std::lock_guard<std::mutex> lock(done_mutex_);  // a waiter checks the state under this lock
        state_[size_t(unit)].store(IO_STATE_IDLE, std::memory_order_release);
    }
    done_.notify_all();
}

void io_pool::run(int32_t unit) {
    (job_[size_t(unit)].load(std::memory_order_acquire) == IO_JOB_DROP ? drop_ : read_)(unit);
    finish(unit);
}

void io_pool::worker() {
    for (;;) {
        int32_t unit;
        {
            std::unique_lock<std::mutex> lock(mutex_);
            wake_.wait(lock, [this] { return stop_ || !demand_.empty() || !ahead_.empty() || !drops_.empty(); });
            if (stop_) { return; }
            std::deque<int32_t> & queue = !demand_.empty() ? demand_ : !ahead_.empty() ? ahead_ : drops_;
            unit = queue.front();
            queue.pop_front();
        }
        if (claim(unit)) { run(unit); }
    }
}

void io_pool::read_now(const int32_t * units, size_t n) {
    if (n == 0) { return; }
    for (size_t i = 0; i < n; ++i) {  // a drop asked for earlier must not run after this read
        if (!cancel_drop(units[i]) && !idle(units[i])) { wait(units[i]); }
    }
    if (threads_.empty() || n == 1) {
        for (size_t i = 0; i < n; ++i) {
            job_[size_t(units[i])].store(IO_JOB_READ, std::memory_order_release);
            state_[size_t(units[i])].store(IO_STATE_RUNNING, std::memory_order_release);
            run(units[i]);
        }
        return;
    }
    {
        std::lock_guard<std::mutex> lock(mutex_);
        for (size_t i = 0; i < n; ++i) {
            job_[size_t(units[i])].store(IO_JOB_READ, std::memory_order_release);
            state_[size_t(units[i])].store(IO_STATE_QUEUED, std::memory_order_release);
            demand_.push_back(units[i]);
        }
    }
    wake_.notify_all();
    // Work on this batch too: claim what the pool has not started yet.
    for (size_t i = 0; i < n; ++i) {
        if (claim(units[i])) { run(units[i]); }
    }
    for (size_t i = 0; i < n; ++i) { wait(units[i]); }
}

bool io_pool::read_ahead(int32_t unit) {
    if (threads_.empty()) { return false; }
    if (!cancel_drop(unit) && !idle(unit)) {
        if (job_[size_t(unit)].load(std::memory_order_acquire) == IO_JOB_READ) { return false; }
        wait(unit);  // its drop is running: the read comes after it
    }
    uint8_t expected = IO_STATE_IDLE;
    job_[size_t(unit)].store(IO_JOB_READ, std::memory_order_release);
    if (!state_[size_t(unit)].compare_exchange_strong(expected, IO_STATE_QUEUED, std::memory_order_acq_rel)) {
        return false;
    }
    {
        std::lock_guard<std::mutex> lock(mutex_);
        ahead_.push_back(unit);
    }
    wake_.notify_one();
    return true;
}

void io_pool::drop_later(int32_t unit) {
    uint8_t expected = IO_STATE_IDLE;
    if (threads_.empty() || !idle(unit)) {
        wait(unit);
        job_[size_t(unit)].store(IO_JOB_DROP, std::memory_order_release);
        drop_(unit);
        return;
    }
    job_[size_t(unit)].store(IO_JOB_DROP, std::memory_order_release);
    if (!state_[size_t(unit)].compare_exchange_strong(expected, IO_STATE_QUEUED, std::memory_order_acq_rel)) {
        wait(unit);
        drop_(unit);
        return;
    }
    {
        std::lock_guard<std::mutex> lock(mutex_);
        drops_.push_back(unit);
    }
    wake_.notify_one();
}

void io_pool::wait(int32_t unit) {
    if (claim(unit)) {
        run(unit);
        return;
    }
    std::unique_lock<std::mutex> lock(done_mutex_);
    done_.wait(lock, [&] { return idle(unit); });
}
