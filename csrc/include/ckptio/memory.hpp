// Host memory ckptio owns (async_save's snapshot buffers, the staging ring's host side, an
// eager load's storages of 2 MiB or more and its block of small storages), and huge-page
// advice for memory allocated elsewhere (torch's allocator, for the blocks in between).
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>

namespace ckptio {

/// A block of host memory for ckptio's own buffers (Python wraps it with torch.frombuffer).
///
/// Blocks of at least kHugePageBytes, when asked for huge pages or recycling, are mappings of
/// their own, 2 MiB-aligned. With huge pages their whole huge pages are advised to use
/// transparent huge pages before first touch: on fresh memory the 4 KiB page faults cost
/// more than copying the data from the page cache, and one huge-page fault maps 2 MiB. The
/// last partial 2 MiB stays on 4 KiB pages, so a block is never resident beyond its size.
/// Other blocks come from the C heap, 64-byte aligned. Contents start undefined.
class HostBuffer {
 public:
  static constexpr std::size_t kHugePageBytes = std::size_t{2} << 20;

  /// `huge_pages=false` keeps large blocks on ordinary pages (some VMs make huge-page faults
  /// on memory the host has reclaimed slow). Throws std::bad_alloc when the memory cannot be
  /// had.
  ///
  /// `recycle_limit > 0` (mapped blocks only): when the block is freed, its mapping is
  /// kept, and the oldest kept mappings are unmapped until those kept total at most
  /// `recycle_limit` bytes. A kept mapping stays as it is while it is reused soon; once idle
  /// for `recycle_idle` (10 s by default), a background thread marks it MADV_FREE, so the kernel may take its pages back under memory pressure. Not at once:
  /// writing pages marked MADV_FREE again cost 0.06 s per 700 MB more than writing them
  /// unmarked on the development VM (4 KiB pages), nearly what the copy itself costs.
  /// A later recycled block that maps as many bytes, advised alike, takes the most recent of
  /// them instead of faulting in fresh memory: an eager load in a loop reuses its blocks, as
  /// glibc's heap reuses freed blocks of up to 32 MiB (and not larger ones) for torch.load.
  HostBuffer(std::size_t size, bool huge_pages, std::size_t recycle_limit = 0,
             std::chrono::milliseconds recycle_idle = std::chrono::seconds(10));
  ~HostBuffer();
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  void* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  /// True when the block is a mapping of its own (2 MiB-aligned).
  bool mapped() const noexcept { return mapped_ != 0; }
  /// True when the block is a huge-page-advised mapping.
  bool huge() const noexcept { return mapped_ != 0 && huge_; }

 private:
  void* base_ = nullptr;     // what to free / unmap
  std::size_t mapped_ = 0;   // bytes mapped (0: heap block)
  std::size_t recycle_limit_ = 0;  // keep the mapping for reuse when freed (0: never)
  std::chrono::milliseconds recycle_idle_{0};  // kept unmarked this long once freed
  bool huge_ = false;              // the mapping is advised for huge pages
  void* data_ = nullptr;
  std::size_t size_ = 0;
};

/// Unmaps every block kept for reuse (HostBuffer's `recycle_limit`); returns their total size.
std::size_t drop_recycled() noexcept;

/// Bytes of the blocks kept for reuse: still as they were freed, and marked MADV_FREE.
struct RecycledStats {
  std::size_t dirty_bytes = 0;
  std::size_t lazy_bytes = 0;
};
RecycledStats recycled_stats() noexcept;

/// Advises the whole pages of [address, address + size) for transparent huge pages
/// (MADV_HUGEPAGE), before their first touch. For memory allocated elsewhere (torch's CPU
/// allocator): its fresh mappings then fault 2 MiB at a time, and memory it reuses is
/// unaffected. Best effort: returns false when the kernel refused (THP off, no whole page).
bool advise_huge_pages(void* address, std::size_t size) noexcept;

/// Faults in the pages holding [address, address + size) writable without writing them
/// (MADV_POPULATE_WRITE, Linux 5.14): what the first write to each would do, done ahead. False
/// where the kernel does not (an older kernel, memory it will not populate, such as device
/// mappings): then nothing changed, and each page faults on its first write as usual.
bool populate_for_write(void* address, std::size_t size) noexcept;

}  // namespace ckptio
