#include "ckptio/checksum.hpp"

#include <cstdint>
#include <limits>

#include "ckptio/errors.hpp"

#ifdef CKPTIO_HAVE_ZLIB
#include <zlib.h>
// With _FILE_OFFSET_BITS=64 zlib turns crc32_combine into a macro for crc32_combine64, which
// would also rename ckptio::crc32_combine in this file only and break the link.
#ifdef crc32_combine
#undef crc32_combine
#define CKPTIO_ZLIB_COMBINE64 1
#endif
#if defined(Z_LARGE64)
#define CKPTIO_ZLIB_COMBINE64 1
#endif
#endif

namespace ckptio {

#ifdef CKPTIO_HAVE_ZLIB

bool crc32_available() noexcept { return true; }

std::uint32_t crc32_update(std::uint32_t crc, const void* data, std::size_t n) {
  // zlib takes uInt lengths; larger buffers go in pieces.
  constexpr std::size_t kPiece = std::size_t{1} << 30;
  const auto* p = static_cast<const Bytef*>(data);
  uLong c = crc;
  while (n > 0) {
    const std::size_t len = n < kPiece ? n : kPiece;
    c = ::crc32(c, p, static_cast<uInt>(len));
    p += len;
    n -= len;
  }
  return static_cast<std::uint32_t>(c);
}

std::uint32_t crc32_combine(std::uint32_t crc_a, std::uint32_t crc_b, std::uint64_t len_b) {
  if (len_b > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
    throw InvalidArgument("crc32_combine: length out of range");
  }
  const auto len = static_cast<std::int64_t>(len_b);
#ifdef CKPTIO_ZLIB_COMBINE64
  return static_cast<std::uint32_t>(::crc32_combine64(crc_a, crc_b, len));
#else
  static_assert(sizeof(z_off_t) >= sizeof(std::int64_t), "zlib's z_off_t is narrower than 64 bits");
  return static_cast<std::uint32_t>(::crc32_combine(crc_a, crc_b, len));
#endif
}

#else  // !CKPTIO_HAVE_ZLIB

namespace {
[[noreturn]] void no_crc() {
  throw InvalidArgument("ckptio was built without zlib; CRC-32 is unavailable");
}
}  // namespace

bool crc32_available() noexcept { return false; }

std::uint32_t crc32_update(std::uint32_t, const void*, std::size_t) { no_crc(); }

std::uint32_t crc32_combine(std::uint32_t, std::uint32_t, std::uint64_t) { no_crc(); }

#endif

}  // namespace ckptio
