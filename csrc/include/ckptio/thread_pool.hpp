// A fixed pool of worker threads for data-parallel loops. The calling thread takes part in
// its own loop, so a loop always finishes even when every worker is busy with another
// caller's loop (two Python threads may run I/O at once with the GIL released).
#pragma once

#include <cstddef>
#include <functional>
#include <memory>

namespace ckptio {

class ThreadPool {
 public:
  /// `threads` is the total parallelism including the caller: 1 means no worker threads.
  explicit ThreadPool(std::size_t threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  std::size_t size() const noexcept;

  /// Runs fn(i) for every i in [0, n) and returns when all calls have finished. After the
  /// first exception no new index is started; that exception is rethrown here.
  void parallel_for(std::size_t n, const std::function<void(std::size_t)>& fn);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Runs fn(i) for every i in [0, n), each on a thread of its own started for the call (the
/// caller runs fn(0)), and returns when all have finished; an index whose thread cannot be
/// started runs on the caller. For work that waits on a device rather than on the CPU (reads
/// of a file that is not in the page cache), where more requests in flight than the pool has
/// threads pay off. Rethrows the exception of the lowest index that threw.
void run_on_own_threads(std::size_t n, const std::function<void(std::size_t)>& fn);

/// The process-wide pool with `threads` parallelism; re-created when the count changes
/// (callers that still hold the old one keep it alive). Safe to use in a forked child.
std::shared_ptr<ThreadPool> shared_pool(std::size_t threads);

}  // namespace ckptio
