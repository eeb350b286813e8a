// CRC-32 (the IEEE/zip polynomial) for zip interoperability: torch ignores it, zip tools
// check it. Backed by zlib when the build found it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ckptio {

/// True when the library was built with a CRC-32 implementation (zlib).
bool crc32_available() noexcept;

/// Continues `crc` over `n` bytes (start with 0). Throws InvalidArgument when unavailable.
std::uint32_t crc32_update(std::uint32_t crc, const void* data, std::size_t n);

/// CRC of A||B from crc(A), crc(B) and len(B): lets chunks be checksummed in parallel.
std::uint32_t crc32_combine(std::uint32_t crc_a, std::uint32_t crc_b, std::uint64_t len_b);

}  // namespace ckptio
