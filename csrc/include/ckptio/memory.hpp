// Host memory helpers.
#pragma once

#include <cstddef>

namespace ckptio {

/// Asks the kernel to back [data, data + n) with transparent huge pages (madvise
/// MADV_HUGEPAGE on the 2 MiB-aligned interior) before the memory is first touched. First-touch
/// page faults on fresh 4 KiB pages cost more than reading the file from the page cache; with
/// huge pages one fault maps 2 MiB. Best effort: errors and kernels without THP are ignored.
void advise_huge_pages(void* data, std::size_t n) noexcept;

}  // namespace ckptio
