// CRC-32 of the zip format (polynomial 0x04C11DB7, bit-reflected, pre- and post-inverted:
// the value zlib's crc32() and Python's zlib.crc32 return).
//
// On x86-64 CPUs with PCLMULQDQ it is computed by carry-less multiplication folding (on 256-bit
// registers where the CPU has VPCLMULQDQ and AVX2), several times faster than zlib's
// table-driven code (docs/verify.md); elsewhere by zlib when the build found it, else by
// slicing-by-8 tables. The choice is made once, at first use, from the CPU's features.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ckptio {

/// True: CRC-32 is always available (kept for callers written when it needed zlib).
bool crc32_available() noexcept;

/// The implementation crc32_update uses on this CPU: "vpclmulqdq", "pclmulqdq", "zlib" or
/// "table".
const char* crc32_implementation() noexcept;

/// Continues `crc` over `n` bytes (start with 0), as zlib's crc32(crc, data, n).
std::uint32_t crc32_update(std::uint32_t crc, const void* data, std::size_t n) noexcept;

/// CRC of A||B from crc(A), crc(B) and len(B) in bytes (zlib's crc32_combine): lets pieces
/// be checksummed in parallel and joined in O(log len(B)).
std::uint32_t crc32_combine(std::uint32_t crc_a, std::uint32_t crc_b, std::uint64_t len_b) noexcept;

namespace detail {

/// The portable slicing-by-8 implementation (any length, any alignment).
std::uint32_t crc32_table(std::uint32_t crc, const void* data, std::size_t n) noexcept;

/// Whether this CPU and build can run crc32_pclmul.
bool crc32_pclmul_supported() noexcept;

/// The PCLMULQDQ folding implementation; call only where crc32_pclmul_supported().
std::uint32_t crc32_pclmul(std::uint32_t crc, const void* data, std::size_t n) noexcept;

/// Whether this CPU and build can run crc32_vpclmul (VPCLMULQDQ and AVX2).
bool crc32_vpclmul_supported() noexcept;

/// The 256-bit folding implementation; call only where crc32_vpclmul_supported().
std::uint32_t crc32_vpclmul(std::uint32_t crc, const void* data, std::size_t n) noexcept;

}  // namespace detail
}  // namespace ckptio
