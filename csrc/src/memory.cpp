#include "ckptio/memory.hpp"

#include <sys/mman.h>

#include <cstdint>

namespace ckptio {

void advise_huge_pages(void* data, std::size_t n) noexcept {
#ifdef MADV_HUGEPAGE
  constexpr std::uintptr_t kHuge = std::uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<std::uintptr_t>(data);
  const std::uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t last = (begin + n) & ~(kHuge - 1);
  if (last > first) {
    // Only the aligned interior: the advice applies to whole VMAs' pages it covers and a
    // partial huge page could never be used anyway.
    (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#else
  (void)data;
  (void)n;
#endif
}

}  // namespace ckptio
