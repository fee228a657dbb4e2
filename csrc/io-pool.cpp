// io-pool.cpp — I/O thread pool for expert reads (see io-pool.h).
#include "io-pool.h"

io_pool::io_pool(size_t n_units, int n_threads, read_fn read)
    : read_(std::move(read)), state_(new std::atomic<uint8_t>[n_units]) {
    for (size_t i = 0; i < n_units; ++i) { state_[i].store(IO_STATE_IDLE, std::memory_order_relaxed); }
    for (int i = 0; i < n_threads; ++i) { threads_.emplace_back([this] { worker(); }); }
}

io_pool::~io_pool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_ = true;
    }
    wake_.notify_all();
    for (std::thread & t : threads_) { t.join(); }
}

bool io_pool::claim(int32_t unit) {
    uint8_t expected = IO_STATE_QUEUED;
    return state_[size_t(unit)].compare_exchange_strong(expected, IO_STATE_RUNNING, std::memory_order_acq_rel);
}

void io_pool::run(int32_t unit) {
    read_(unit);
    {
        std::lock_guard<std::mutex> lock(done_mutex_);  // a waiter checks the state under this lock
        state_[size_t(unit)].store(IO_STATE_IDLE, std::memory_order_release);
    }
    done_.notify_all();
}

void io_pool::worker() {
    for (;;) {
        int32_t unit;
        {
            std::unique_lock<std::mutex> lock(mutex_);
            wake_.wait(lock, [this] { return stop_ || !demand_.empty() || !ahead_.empty(); });
            if (stop_) { return; }
            std::deque<int32_t> & queue = !demand_.empty() ? demand_ : ahead_;
            unit = queue.front();
            queue.pop_front();
        }
        if (claim(unit)) { run(unit); }
    }
}

void io_pool::read_now(const int32_t * units, size_t n) {
    if (n == 0) { return; }
    if (threads_.empty() || n == 1) {
        for (size_t i = 0; i < n; ++i) {
            state_[size_t(units[i])].store(IO_STATE_RUNNING, std::memory_order_release);
            run(units[i]);
        }
        return;
    }
    {
        std::lock_guard<std::mutex> lock(mutex_);
        for (size_t i = 0; i < n; ++i) {
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
    uint8_t expected = IO_STATE_IDLE;
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

void io_pool::wait(int32_t unit) {
    if (claim(unit)) {
        run(unit);
        return;
    }
    std::unique_lock<std::mutex> lock(done_mutex_);
    done_.wait(lock, [&] { return idle(unit); });
}
