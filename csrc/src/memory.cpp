#include "ckptio/memory.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <utility>

namespace ckptio {

namespace {

// The one freed recycled mapping kept for reuse (2 MiB-aligned, `bytes` long), or none.
std::mutex recycled_mutex;
void* recycled_base = nullptr;
std::size_t recycled_bytes = 0;

// Takes the kept mapping if it is `rounded` bytes long (the same block size: the next load of
// a file of the same shape), else leaves it kept.
void* take_recycled(std::size_t rounded) noexcept {
  const std::lock_guard<std::mutex> lock(recycled_mutex);
  if (recycled_base == nullptr || recycled_bytes != rounded) return nullptr;
  void* base = recycled_base;
  recycled_base = nullptr;
  recycled_bytes = 0;
  return base;
}

// Makes (base, bytes) the kept mapping (nullptr, 0: none) and unmaps the one kept before;
// returns that one's size.
std::size_t keep_recycled(void* base, std::size_t bytes) noexcept {
  {
    const std::lock_guard<std::mutex> lock(recycled_mutex);
    std::swap(base, recycled_base);
    std::swap(bytes, recycled_bytes);
  }
  if (base == nullptr) return 0;
  (void)munmap(base, bytes);
  return bytes;
}

}  // namespace

std::size_t drop_recycled() noexcept { return keep_recycled(nullptr, 0); }

HostBuffer::HostBuffer(std::size_t size, bool huge_pages, bool recycle) : size_(size) {
  // No object may exceed PTRDIFF_MAX; refusing here also keeps the rounding below from
  // wrapping around to a small block.
  if (size > static_cast<std::size_t>(PTRDIFF_MAX) - 2 * kHugePageBytes) throw std::bad_alloc();
  if (huge_pages && size >= kHugePageBytes) {
    const std::size_t rounded = (size + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
    recycle_ = recycle;
    if (recycle) {
      if (void* kept = take_recycled(rounded)) {
        // Its pages are resident unless the kernel took them back (MADV_FREE): then they
        // fault in again, still advised for huge pages.
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
    (void)madvise(data_, size & ~(kHugePageBytes - 1), MADV_HUGEPAGE);  // best effort
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
  if (mapped_ != 0 && recycle_) {
#ifdef MADV_FREE
    (void)madvise(base_, mapped_, MADV_FREE);  // best effort: kept resident otherwise
#endif
    (void)keep_recycled(base_, mapped_);
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
