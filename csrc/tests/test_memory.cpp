#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "ckptio/memory.hpp"
#include "harness.hpp"

using ckptio::HostBuffer;

namespace {

bool aligned(const void* p, std::uintptr_t alignment) {
  return reinterpret_cast<std::uintptr_t>(p) % alignment == 0;
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

TEST(host_buffer_without_huge_pages_stays_on_the_heap) {
  const std::size_t n = 2 * HostBuffer::kHugePageBytes;
  HostBuffer b(n, false);
  CHECK(!b.huge());
  CHECK(aligned(b.data(), 64));
  std::memset(b.data(), 1, n);
}

TEST(host_buffer_refuses_impossible_sizes) {
  CHECK_THROWS(HostBuffer(~std::size_t{0} - 4096, true), std::bad_alloc);
  CHECK_THROWS(HostBuffer(~std::size_t{0} - 4096, false), std::bad_alloc);
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
