#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "ckptio/memory.hpp"
#include "harness.hpp"

using ckptio::HostBuffer;

namespace {

bool aligned(const void* p, std::uintptr_t alignment) {
  return reinterpret_cast<std::uintptr_t>(p) % alignment == 0;
}

// How many pages of [p, p + n) are resident (p page-aligned); all ones where some are unmapped.
std::size_t resident_pages(const void* p, std::size_t n) {
  const auto page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> vec((n + page - 1) / page);
  if (mincore(const_cast<void*>(p), n, vec.data()) != 0) return ~std::size_t{0};
  std::size_t count = 0;
  for (unsigned char v : vec) count += v & 1;
  return count;
}

}  // namespace

TEST(host_buffer_small_blocks_come_from_the_heap_64_byte_aligned) {
  for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{63}, std::size_t{4097},
                        HostBuffer::kHugePageBytes - 1}) {
    HostBuffer b(n, true);
    CHECK_EQ(b.size(), n);
    CHECK(b.data() != nullptr);
    CHECK(aligned(b.data(), 64));
    CHECK(!b.huge());
    std::memset(b.data(), 0xAB, n);  // the whole block is ours (ASan checks the bounds)
  }
}

TEST(host_buffer_large_blocks_are_huge_page_aligned_mappings) {
  const std::size_t n = 3 * HostBuffer::kHugePageBytes + 12345;
  HostBuffer b(n, true);
  CHECK(b.huge());
  CHECK(aligned(b.data(), HostBuffer::kHugePageBytes));
  auto* bytes = static_cast<std::uint8_t*>(b.data());
  std::memset(bytes, 0x5A, n);
  CHECK_EQ(bytes[0], 0x5A);
  CHECK_EQ(bytes[n - 1], 0x5A);
}

TEST(host_buffer_tail_is_not_a_huge_page) {
  // A block just over one huge page: its last partial 2 MiB must not become resident as a
  // whole huge page when one byte of it is touched (the block would then use twice its size).
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  const std::size_t n = HostBuffer::kHugePageBytes + page;
  HostBuffer b(n, true);
  CHECK(b.huge());
  auto* tail = static_cast<std::uint8_t*>(b.data()) + HostBuffer::kHugePageBytes;
  tail[0] = 1;
  CHECK_EQ(resident_pages(tail, HostBuffer::kHugePageBytes), std::size_t{1});
}

TEST(host_buffer_without_huge_pages_stays_on_the_heap) {
  const std::size_t n = 2 * HostBuffer::kHugePageBytes;
  HostBuffer b(n, false);
  CHECK(!b.huge());
  CHECK(!b.mapped());
  CHECK(aligned(b.data(), 64));
  std::memset(b.data(), 1, n);
}

TEST(recycled_block_without_huge_pages_is_a_mapping_kept_apart_from_huge_ones) {
  ckptio::drop_recycled();
  constexpr std::size_t kPage = HostBuffer::kHugePageBytes;
  void* plain_first = nullptr;
  {
    HostBuffer b(2 * kPage, false, 64 * kPage);
    CHECK(b.mapped());
    CHECK(!b.huge());
    CHECK(aligned(b.data(), kPage));
    std::memset(b.data(), 1, b.size());
    plain_first = b.data();
  }
  {
    HostBuffer huge(2 * kPage, true, 64 * kPage);  // advised otherwise: not the kept block
    CHECK(huge.huge());
    CHECK(huge.data() != plain_first);
    HostBuffer plain(2 * kPage, false, 64 * kPage);
    CHECK_EQ(plain.data(), plain_first);
  }
  CHECK_EQ(ckptio::drop_recycled(), 4 * kPage);
}

TEST(recycled_block_is_kept_for_the_next_of_its_size) {
  ckptio::drop_recycled();
  constexpr std::size_t kPage = HostBuffer::kHugePageBytes;
  constexpr std::size_t kLimit = 64 * kPage;
  const std::size_t n = 3 * kPage + 4096;  // maps 4 huge pages
  void* first = nullptr;
  {
    HostBuffer b(n, true, kLimit);
    CHECK(b.huge());
    first = b.data();
    std::memset(b.data(), 0x11, n);
  }
  {
    HostBuffer other_size(n + kPage, true, kLimit);  // maps 5: not reused
    CHECK(other_size.data() != first);
    HostBuffer plain(n, true);  // not recycled: never takes the kept block
    CHECK(plain.data() != first);
    HostBuffer same(n - 100, true, kLimit);  // maps 4 huge pages too: reuses it
    CHECK_EQ(same.data(), first);
    CHECK(aligned(same.data(), kPage));
    std::memset(same.data(), 0x22, same.size());  // writable end to end
    CHECK_EQ(static_cast<unsigned char*>(same.data())[same.size() - 1], 0x22);
    HostBuffer again(n, true, kLimit);  // the kept one is taken: a fresh mapping
    CHECK(again.data() != first);
  }
  // All three recycled blocks were kept (4 + 4 + 5 huge pages), and each is taken once.
  CHECK_EQ(ckptio::drop_recycled(), 13 * kPage);
  CHECK_EQ(ckptio::drop_recycled(), std::size_t{0});
  {
    HostBuffer small(4096, true, kLimit);  // heap blocks are never kept
    CHECK(!small.huge());
  }
  CHECK_EQ(ckptio::drop_recycled(), std::size_t{0});
}

TEST(recycled_blocks_are_marked_lazily_free_once_idle_and_still_reused) {
  ckptio::drop_recycled();
  constexpr std::size_t kPage = HostBuffer::kHugePageBytes;
  constexpr std::size_t kLimit = 64 * kPage;
  void* first = nullptr;
  {
    HostBuffer b(2 * kPage, false, kLimit, std::chrono::milliseconds(50));
    first = b.data();
    std::memset(b.data(), 0x33, b.size());
  }
  // Kept as freed first: reuse writes pages the kernel has not been told it may take.
  CHECK_EQ(ckptio::recycled_stats().dirty_bytes, 2 * kPage);
  // Idle past the idle time: the background thread marks it MADV_FREE.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (ckptio::recycled_stats().lazy_bytes != 2 * kPage &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK_EQ(ckptio::recycled_stats().lazy_bytes, 2 * kPage);
  CHECK_EQ(ckptio::recycled_stats().dirty_bytes, std::size_t{0});
  {
    // A marked block is reused all the same; freed again, it stays unmarked for 10 s.
    HostBuffer same(2 * kPage, false, kLimit);
    CHECK_EQ(same.data(), first);
    std::memset(same.data(), 0x44, same.size());
    CHECK_EQ(static_cast<unsigned char*>(same.data())[same.size() - 1], 0x44);
  }
  CHECK_EQ(ckptio::recycled_stats().dirty_bytes, 2 * kPage);  // freed again: unmarked
  CHECK_EQ(ckptio::drop_recycled(), 2 * kPage);
  CHECK_EQ(ckptio::recycled_stats().dirty_bytes + ckptio::recycled_stats().lazy_bytes,
           std::size_t{0});
}

TEST(a_forked_child_keeps_and_reuses_blocks_with_its_own_marker) {
  ckptio::drop_recycled();
  constexpr std::size_t kPage = HostBuffer::kHugePageBytes;
  { HostBuffer b(2 * kPage, false, 64 * kPage); }  // the parent's marker is running
  const pid_t child = ::fork();
  if (child == 0) {
    // Would hang on a mutex or condition variable copied in use; exits 0 when all works.
    void* kept = nullptr;
    {
      HostBuffer b(2 * kPage, false, 64 * kPage, std::chrono::milliseconds(20));
      kept = b.data();
    }
    for (int i = 0; i < 500 && ckptio::recycled_stats().lazy_bytes != 2 * kPage; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    const bool ok = ckptio::recycled_stats().lazy_bytes == 2 * kPage;
    HostBuffer again(2 * kPage, false, 64 * kPage);
    ::_exit(ok && again.data() == kept ? 0 : 1);
  }
  CHECK(child > 0);
  int status = 0;
  CHECK_EQ(::waitpid(child, &status, 0), child);
  CHECK(WIFEXITED(status));
  CHECK_EQ(WEXITSTATUS(status), 0);
  CHECK_EQ(ckptio::drop_recycled(), 2 * kPage);
}

TEST(recycled_blocks_beyond_the_limit_are_unmapped_oldest_first) {
  ckptio::drop_recycled();
  constexpr std::size_t kPage = HostBuffer::kHugePageBytes;
  void* oldest = nullptr;
  void* newer = nullptr;
  {
    auto a = std::make_unique<HostBuffer>(4 * kPage, true, 8 * kPage);
    auto b = std::make_unique<HostBuffer>(4 * kPage, true, 8 * kPage);
    auto c = std::make_unique<HostBuffer>(2 * kPage, true, 8 * kPage);
    oldest = a->data();
    newer = b->data();
    a.reset();
    b.reset();  // 8 pages kept: both
    c.reset();  // 10 > 8: `a`, the oldest, is unmapped
  }
  constexpr std::size_t kUnmapped = ~std::size_t{0};
  CHECK_EQ(resident_pages(oldest, kPage), kUnmapped);
  CHECK(resident_pages(newer, 4 * kPage) != kUnmapped);
  {
    HostBuffer taken(4 * kPage, true, 8 * kPage);
    CHECK_EQ(taken.data(), newer);  // the one left of that size
    HostBuffer fresh(4 * kPage, true, 8 * kPage);
    CHECK(fresh.data() != newer);
  }
  // `fresh` was kept after c (6 pages), then `taken` (10 > 8): c was unmapped.
  CHECK_EQ(ckptio::drop_recycled(), 8 * kPage);
  {
    HostBuffer too_big(4 * kPage, true, 2 * kPage);  // larger than its limit: never kept
  }
  CHECK_EQ(ckptio::drop_recycled(), std::size_t{0});
}

TEST(host_buffer_refuses_impossible_sizes) {
  CHECK_THROWS(HostBuffer(~std::size_t{0} - 4096, true), std::bad_alloc);
  CHECK_THROWS(HostBuffer(~std::size_t{0} - 4096, false), std::bad_alloc);
  ckptio::drop_recycled();
  CHECK_THROWS(HostBuffer(~std::size_t{0} - 4096, true, std::size_t{1} << 30), std::bad_alloc);
  CHECK_EQ(ckptio::drop_recycled(), std::size_t{0});  // nothing was kept
}

TEST(advise_huge_pages_keeps_data_and_refuses_ranges_without_a_whole_page) {
  // A heap block with data in it: advising its interior must not change a byte.
  const std::size_t n = 4 * HostBuffer::kHugePageBytes;
  auto* block = static_cast<std::uint8_t*>(std::malloc(n));
  CHECK(block != nullptr);
  for (std::size_t i = 0; i < n; i += 4096) block[i] = static_cast<std::uint8_t>(i >> 12);
  (void)ckptio::advise_huge_pages(block, n);  // true unless THP is off
  for (std::size_t i = 0; i < n; i += 4096) CHECK_EQ(block[i], static_cast<std::uint8_t>(i >> 12));
  // No whole page inside: nothing is advised.
  CHECK(!ckptio::advise_huge_pages(block + 1, 100));
  CHECK(!ckptio::advise_huge_pages(block, 0));
  std::free(block);
}

TEST(populate_for_write_faults_pages_in_without_writing_them) {
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  const std::size_t size = 64 * page;
  void* map = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(map != MAP_FAILED);
  auto* bytes = static_cast<std::uint8_t*>(map);
  std::vector<unsigned char> resident(64, 0);
  // Pages 3 to 9: an unaligned range touches the pages holding its first and last bytes.
  const bool populated = ckptio::populate_for_write(bytes + 3 * page + 100, 6 * page);
  CHECK_EQ(::mincore(map, size, resident.data()), 0);
  if (populated) {  // a kernel older than 5.14 says false and changes nothing
    for (std::size_t i = 0; i < 64; ++i) CHECK_EQ(resident[i] & 1, (i >= 3 && i <= 9) ? 1 : 0);
  }
  for (std::size_t i = 0; i < size; ++i) {
    if (bytes[i] != 0) CHECK_EQ(int{bytes[i]}, 0);  // nothing written
  }
  CHECK(ckptio::populate_for_write(bytes, 0));
  ::munmap(map, size);
  // Memory that cannot be written is refused, not faulted in.
  void* ro = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(ro != MAP_FAILED);
  CHECK(!ckptio::populate_for_write(ro, size));
  ::munmap(ro, size);
}
