#include "ckptio/thread_pool.hpp"

#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

#include "ckptio/errors.hpp"

namespace ckptio {
namespace {

// One parallel_for call. Its caller and any idle workers pull indices from `next` until the
// range is exhausted or an exception has been recorded.
struct Job {
  Job(std::size_t n_, const std::function<void(std::size_t)>& fn_) : n(n_), fn(fn_) {}

  const std::size_t n;
  const std::function<void(std::size_t)>& fn;
  std::atomic<std::size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::exception_ptr error;
  std::size_t active_workers = 0;  // guarded by the pool mutex

  bool has_work() const {
    return !failed.load(std::memory_order_relaxed) && next.load(std::memory_order_relaxed) < n;
  }

  void run() noexcept {
    while (!failed.load(std::memory_order_relaxed)) {
      const std::size_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) return;
      try {
        fn(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        failed.store(true, std::memory_order_relaxed);
      }
    }
  }
};

}  // namespace

struct ThreadPool::Impl {
  explicit Impl(std::size_t threads_) : threads(threads_), owner(::getpid()) {}

  const std::size_t threads;
  const pid_t owner;  // workers exist only in the process that started them
  std::mutex mutex;
  std::condition_variable work_ready;  // a job was queued, or stop was set
  std::condition_variable job_done;    // some job's active_workers dropped to zero
  std::deque<Job*> jobs;
  bool stop = false;
  std::vector<std::thread> workers;

  Job* find_job() {
    for (Job* job : jobs) {
      if (job->has_work()) return job;
    }
    return nullptr;
  }

  void worker_loop() {
    std::unique_lock<std::mutex> lock(mutex);
    for (;;) {
      Job* job = nullptr;
      work_ready.wait(lock, [&] { return stop || (job = find_job()) != nullptr; });
      if (stop) return;
      ++job->active_workers;
      lock.unlock();
      job->run();
      lock.lock();
      if (--job->active_workers == 0) job_done.notify_all();
    }
  }

  void shut_down() noexcept {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stop = true;
    }
    work_ready.notify_all();
    for (auto& t : workers) {
      if (t.joinable()) t.join();
    }
  }
};

ThreadPool::ThreadPool(std::size_t threads) {
  if (threads == 0) throw InvalidArgument("ThreadPool: thread count must be at least 1");
  impl_ = std::make_unique<Impl>(threads);
  try {
    impl_->workers.reserve(threads - 1);
    for (std::size_t i = 1; i < threads; ++i) {
      impl_->workers.emplace_back([impl = impl_.get()] { impl->worker_loop(); });
    }
  } catch (...) {
    impl_->shut_down();
    throw;
  }
}

ThreadPool::~ThreadPool() {
  // In a forked child the worker threads do not exist and the mutex may have been copied in
  // a locked state: joining or locking would hang, so the parent's pool is leaked instead.
  if (impl_->owner != ::getpid()) {
    (void)impl_.release();
    return;
  }
  impl_->shut_down();
}

std::size_t ThreadPool::size() const noexcept { return impl_->threads; }

void ThreadPool::parallel_for(std::size_t n, const std::function<void(std::size_t)>& fn) {
  if (n == 0) return;
  // Without workers (or in a forked child, where they are gone) the caller does everything.
  if (n == 1 || impl_->workers.empty() || impl_->owner != ::getpid()) {
    for (std::size_t i = 0; i < n; ++i) fn(i);
    return;
  }

  Job job(n, fn);
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->jobs.push_back(&job);
  }
  impl_->work_ready.notify_all();

  job.run();

  {
    std::unique_lock<std::mutex> lock(impl_->mutex);
    // Dequeued first, so no worker can join after we start waiting for the ones inside.
    for (auto it = impl_->jobs.begin(); it != impl_->jobs.end(); ++it) {
      if (*it == &job) {
        impl_->jobs.erase(it);
        break;
      }
    }
    impl_->job_done.wait(lock, [&] { return job.active_workers == 0; });
  }
  if (job.error) std::rethrow_exception(job.error);
}

// ---------------------------------------------------------------- process-wide pool

namespace {

struct SharedState {
  std::mutex mutex;
  std::shared_ptr<ThreadPool> pool;
};

// Never destroyed: the pool must outlive every static destructor that might still use it, and
// a forked child abandons (leaks) its parent's state rather than touching it.
SharedState*& shared_state() {
  static SharedState* state = new SharedState();
  return state;
}

void reset_after_fork() noexcept {
  // Runs in the child, single-threaded, right after fork(). The inherited mutex may be locked
  // by a thread that no longer exists and the inherited pool's workers are gone, so neither is
  // touched: the old state is leaked and a fresh one takes its place.
  shared_state() = new (std::nothrow) SharedState();
}

}  // namespace

void run_on_own_threads(std::size_t n, const std::function<void(std::size_t)>& fn) {
  std::vector<std::exception_ptr> errors(n);
  auto guarded = [&](std::size_t i) {
    try {
      fn(i);
    } catch (...) {
      errors[i] = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  std::vector<std::size_t> on_caller;
  if (n > 1) threads.reserve(n - 1);
  for (std::size_t i = 1; i < n; ++i) {
    try {
      threads.emplace_back(guarded, i);
    } catch (const std::system_error&) {
      on_caller.push_back(i);
    }
  }
  if (n > 0) guarded(0);
  for (std::size_t i : on_caller) guarded(i);
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

std::shared_ptr<ThreadPool> shared_pool(std::size_t threads) {
  static const int registered = ::pthread_atfork(nullptr, nullptr, reset_after_fork);
  (void)registered;
  SharedState* state = shared_state();
  if (state == nullptr) throw std::bad_alloc();
  std::lock_guard<std::mutex> lock(state->mutex);
  if (!state->pool || state->pool->size() != threads) {
    state->pool = std::make_shared<ThreadPool>(threads);
  }
  return state->pool;
}

}  // namespace ckptio
