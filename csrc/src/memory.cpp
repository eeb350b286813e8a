#include "ckptio/memory.hpp"

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

namespace ckptio {

namespace {

using Clock = std::chrono::steady_clock;

// Freed recycled mappings kept for reuse (each 2 MiB-aligned), oldest first. Allocated once
// and never destroyed: a block may be freed after static destructors run (at exit).
struct Kept {
  void* base;
  std::size_t bytes;
  bool huge;               // advised for huge pages
  Clock::time_point idle;  // when it has been idle long enough to be marked MADV_FREE
  bool lazy = false;       // marked MADV_FREE
};
struct RecycledPool {
  std::mutex mutex;
  std::condition_variable kept_one;  // wakes the idle marker: a block kept
  std::vector<Kept> kept;
  std::size_t bytes = 0;
  pid_t marker_pid = 0;  // the process whose idle marker runs (0: none yet)
};
RecycledPool& pool() {
  static auto* const instance = new RecycledPool();
  return *instance;
}

// Marks the kept blocks whose idle time has passed at `now` MADV_FREE (lock held): the kernel
// may then take their pages back under memory pressure, without swap.
void mark_idle(RecycledPool& p, Clock::time_point now) noexcept {
  for (Kept& k : p.kept) {
    if (k.lazy || k.idle > now) continue;
#ifdef MADV_FREE
    (void)madvise(k.base, k.bytes, MADV_FREE);  // best effort: kept resident otherwise
#endif
    k.lazy = true;
  }
}

// The idle marker: sleeps until the first unmarked block's idle time has passed, marks it
// (and any other due). Under the pool's lock, so no block is handed out while it is being
// marked. Detached; never touches Python.
void idle_marker() noexcept {
  RecycledPool& p = pool();
  std::unique_lock<std::mutex> lock(p.mutex);
  for (;;) {
    Clock::time_point next = Clock::time_point::max();
    for (const Kept& k : p.kept) {
      if (!k.lazy && k.idle < next) next = k.idle;
    }
    if (next == Clock::time_point::max()) {
      p.kept_one.wait(lock);
    } else if (Clock::now() >= next) {
      mark_idle(p, Clock::now());
    } else {
      p.kept_one.wait_until(lock, next);
    }
  }
}

// Starts the idle marker in this process if it is not running (lock held). In a forked child
// the parent's marker does not exist: the child starts its own.
void ensure_idle_marker(RecycledPool& p) noexcept {
  const pid_t self = ::getpid();
  if (p.marker_pid == self) return;
  try {
    std::thread(idle_marker).detach();
    p.marker_pid = self;
  } catch (...) {
    // No thread: blocks are marked at once instead (slower reuse, same safety).
    mark_idle(p, Clock::time_point::max());
  }
}

void lock_pool_for_fork() noexcept { pool().mutex.lock(); }
void unlock_pool_in_parent() noexcept { pool().mutex.unlock(); }
void reset_pool_in_child() noexcept {
  // The child has one thread: the parent's marker does not exist, yet the copied condition
  // variable still counts it as a waiter. Fresh synchronization objects take their place
  // (the old ones are abandoned, not destroyed); the child starts its own marker when needed.
  RecycledPool& p = pool();
  new (&p.mutex) std::mutex();
  new (&p.kept_one) std::condition_variable();
}

// Takes the most recently kept mapping that is `rounded` bytes long (a block of the same size:
// the next load of a file of the same shape) and advised alike, if any.
void* take_recycled(std::size_t rounded, bool huge) noexcept {
  RecycledPool& p = pool();
  const std::lock_guard<std::mutex> lock(p.mutex);
  for (auto it = p.kept.rbegin(); it != p.kept.rend(); ++it) {
    if (it->bytes != rounded || it->huge != huge) continue;
    void* base = it->base;
    p.bytes -= rounded;
    p.kept.erase(std::next(it).base());
    return base;
  }
  return nullptr;
}

// Keeps (base, bytes) for reuse, then unmaps the oldest kept mappings until they total at most
// `limit` bytes (`base` itself when it alone is larger). Returns the bytes unmapped.
std::size_t keep_recycled(void* base, std::size_t bytes, bool huge, std::size_t limit,
                          Clock::duration idle) noexcept {
  // The marker holds the pool's lock while it marks: a fork meanwhile must not copy it locked.
  static const int registered =
      ::pthread_atfork(lock_pool_for_fork, unlock_pool_in_parent, reset_pool_in_child);
  (void)registered;
  std::vector<Kept> dropped;
  {
    RecycledPool& p = pool();
    const std::lock_guard<std::mutex> lock(p.mutex);
    try {
      if (base != nullptr && bytes <= limit) {
        p.kept.push_back({base, bytes, huge, Clock::now() + idle});
        p.bytes += bytes;
        base = nullptr;
        ensure_idle_marker(p);
        p.kept_one.notify_one();
      }
      std::size_t n = 0;
      std::size_t left = p.bytes;
      while (n < p.kept.size() && left > limit) left -= p.kept[n++].bytes;
      dropped.assign(p.kept.begin(), p.kept.begin() + static_cast<std::ptrdiff_t>(n));
      p.kept.erase(p.kept.begin(), p.kept.begin() + static_cast<std::ptrdiff_t>(n));
      p.bytes = left;
    } catch (const std::bad_alloc&) {
      // No memory for the bookkeeping: the block is unmapped below instead of kept.
    }
  }
  std::size_t unmapped = 0;
  if (base != nullptr) {
    (void)munmap(base, bytes);
    unmapped += bytes;
  }
  for (const Kept& k : dropped) {
    (void)munmap(k.base, k.bytes);
    unmapped += k.bytes;
  }
  return unmapped;
}

}  // namespace

std::size_t drop_recycled() noexcept {
  return keep_recycled(nullptr, 0, false, 0, Clock::duration::zero());
}

RecycledStats recycled_stats() noexcept {
  RecycledPool& p = pool();
  const std::lock_guard<std::mutex> lock(p.mutex);
  RecycledStats stats;
  for (const Kept& k : p.kept) (k.lazy ? stats.lazy_bytes : stats.dirty_bytes) += k.bytes;
  return stats;
}

HostBuffer::HostBuffer(std::size_t size, bool huge_pages, std::size_t recycle_limit,
                       std::chrono::milliseconds recycle_idle)
    : size_(size) {
  if (recycle_idle.count() < 0) recycle_idle = std::chrono::milliseconds::zero();
  // No object may exceed PTRDIFF_MAX; refusing here also keeps the rounding below from
  // wrapping around to a small block.
  if (size > static_cast<std::size_t>(PTRDIFF_MAX) - 2 * kHugePageBytes) throw std::bad_alloc();
  if ((huge_pages || recycle_limit != 0) && size >= kHugePageBytes) {
    const std::size_t rounded = (size + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
    recycle_limit_ = recycle_limit;
    recycle_idle_ = recycle_idle;
    huge_ = huge_pages;
    if (recycle_limit != 0) {
      if (void* kept = take_recycled(rounded, huge_pages)) {
        // Its pages are resident unless the kernel took them back (MADV_FREE): then they
        // fault in again, advised as before.
        base_ = data_ = kept;
        mapped_ = rounded;
        return;
      }
    }
    // Over-map by one huge page so the data can start on a 2 MiB boundary (only aligned 2 MiB
    // ranges can be backed by huge pages), then unmap the slack on either side.
    const std::size_t over = rounded + kHugePageBytes;
    void* p = mmap(nullptr, over, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    const auto addr = reinterpret_cast<std::uintptr_t>(p);
    const std::uintptr_t aligned = (addr + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
    const std::size_t head = aligned - addr;
    if (head != 0) (void)munmap(p, head);
    if (over - head > rounded) {
      (void)munmap(reinterpret_cast<void*>(aligned + rounded), over - head - rounded);
    }
    base_ = data_ = reinterpret_cast<void*>(aligned);
    mapped_ = rounded;
#ifdef MADV_HUGEPAGE
    // Only the whole huge pages of the data: a huge page for its last partial 2 MiB would
    // make the block resident beyond its size (up to 2 MiB more per block).
    if (huge_pages) (void)madvise(data_, size & ~(kHugePageBytes - 1), MADV_HUGEPAGE);
#endif
    return;
  }
  // 64-byte alignment (as torch's CPU allocator); aligned_alloc wants a multiple of it.
  const std::size_t padded = size == 0 ? 64 : (size + 63) & ~std::size_t{63};
  base_ = std::aligned_alloc(64, padded);
  if (base_ == nullptr) throw std::bad_alloc();
  data_ = base_;
}

HostBuffer::~HostBuffer() {
  if (mapped_ != 0 && recycle_limit_ != 0) {
    (void)keep_recycled(base_, mapped_, huge_, recycle_limit_, recycle_idle_);
  } else if (mapped_ != 0) {
    munmap(base_, mapped_);
  } else {
    std::free(base_);
  }
}

bool advise_huge_pages(void* address, std::size_t size) noexcept {
#ifdef MADV_HUGEPAGE
  const long page_size = ::sysconf(_SC_PAGESIZE);
  const std::uintptr_t kPage = page_size > 0 ? static_cast<std::uintptr_t>(page_size) : 4096;
  const auto addr = reinterpret_cast<std::uintptr_t>(address);
  if (size > UINTPTR_MAX - addr) return false;
  const std::uintptr_t begin = (addr + kPage - 1) & ~(kPage - 1);
  const std::uintptr_t end = (addr + size) & ~(kPage - 1);
  if (end <= begin) return false;
  return madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0;
#else
  (void)address;
  (void)size;
  return false;
#endif
}

bool populate_for_write(void* address, std::size_t size) noexcept {
#if defined(__linux__)
  constexpr int kPopulateWrite = 23;  // MADV_POPULATE_WRITE, absent from older headers
  if (size == 0) return true;
  const long page_size = ::sysconf(_SC_PAGESIZE);
  const std::uintptr_t kPage = page_size > 0 ? static_cast<std::uintptr_t>(page_size) : 4096;
  const auto addr = reinterpret_cast<std::uintptr_t>(address);
  if (size > UINTPTR_MAX - addr - kPage) return false;
  const std::uintptr_t begin = addr & ~(kPage - 1);
  const std::uintptr_t end = (addr + size + kPage - 1) & ~(kPage - 1);
  for (;;) {
    if (madvise(reinterpret_cast<void*>(begin), end - begin, kPopulateWrite) == 0) return true;
    if (errno != EINTR) return false;
  }
#else
  (void)address;
  (void)size;
  return false;
#endif
}

}  // namespace ckptio
