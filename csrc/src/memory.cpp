#include "ckptio/memory.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <mutex>
#include <new>
#include <vector>

namespace ckptio {

namespace {

// Freed recycled mappings kept for reuse (each 2 MiB-aligned), oldest first. Allocated once
// and never destroyed: a block may be freed after static destructors run (at exit).
struct Kept {
  void* base;
  std::size_t bytes;
  bool huge;  // advised for huge pages
};
struct RecycledPool {
  std::mutex mutex;
  std::vector<Kept> kept;
  std::size_t bytes = 0;
};
RecycledPool& pool() {
  static auto* const instance = new RecycledPool();
  return *instance;
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
std::size_t keep_recycled(void* base, std::size_t bytes, bool huge, std::size_t limit) noexcept {
  std::vector<Kept> dropped;
  {
    RecycledPool& p = pool();
    const std::lock_guard<std::mutex> lock(p.mutex);
    try {
      if (base != nullptr && bytes <= limit) {
        p.kept.push_back({base, bytes, huge});
        p.bytes += bytes;
        base = nullptr;
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

std::size_t drop_recycled() noexcept { return keep_recycled(nullptr, 0, false, 0); }

HostBuffer::HostBuffer(std::size_t size, bool huge_pages, std::size_t recycle_limit)
    : size_(size) {
  // No object may exceed PTRDIFF_MAX; refusing here also keeps the rounding below from
  // wrapping around to a small block.
  if (size > static_cast<std::size_t>(PTRDIFF_MAX) - 2 * kHugePageBytes) throw std::bad_alloc();
  if ((huge_pages || recycle_limit != 0) && size >= kHugePageBytes) {
    const std::size_t rounded = (size + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
    recycle_limit_ = recycle_limit;
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
#ifdef MADV_FREE
    (void)madvise(base_, mapped_, MADV_FREE);  // best effort: kept resident otherwise
#endif
    (void)keep_recycled(base_, mapped_, huge_, recycle_limit_);
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

}  // namespace ckptio
