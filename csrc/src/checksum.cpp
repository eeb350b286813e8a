#include "ckptio/checksum.hpp"

#include <array>
#include <cstdint>
#include <cstring>

#ifdef CKPTIO_HAVE_ZLIB
#include <zlib.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CKPTIO_CRC_PCLMUL 1
#include <immintrin.h>
#endif

// Notation. The zip CRC is "reflected": the first bit of the message is the least significant
// bit of its first byte, and it is the highest-degree coefficient of the message polynomial
// M(x). A 32-bit CRC state s holds coefficients of x^31 (bit 0) ... x^0 (bit 31). The raw
// (uninverted) update over n bits is  s' = (s(x) * x^n + M(x)) * x^32 mod P(x),  with
// P = x^32 + 0x04C11DB7 (0xEDB88320 reflected). The zip value is ~raw(~crc, M).

namespace ckptio {
namespace {

constexpr std::uint32_t kReflectedPoly = 0xEDB88320u;

// ---------------------------------------------------------------------------------- tables
struct Tables {
  // t[k][b]: the raw CRC of byte b followed by k zero bytes. t[0] is the classic byte table.
  std::uint32_t t[8][256];
};

constexpr Tables make_tables() {
  Tables tables{};
  for (std::uint32_t b = 0; b < 256; ++b) {
    std::uint32_t c = b;
    for (int i = 0; i < 8; ++i) c = (c & 1) ? (c >> 1) ^ kReflectedPoly : c >> 1;
    tables.t[0][b] = c;
  }
  for (int k = 1; k < 8; ++k) {
    for (std::uint32_t b = 0; b < 256; ++b) {
      const std::uint32_t prev = tables.t[k - 1][b];
      tables.t[k][b] = (prev >> 8) ^ tables.t[0][prev & 0xFF];
    }
  }
  return tables;
}

constexpr Tables kTables = make_tables();
static_assert(kTables.t[0][1] == 0x77073096u, "the byte table of the zip CRC-32");

// Raw (uninverted) update by tables: bytes one at a time up to an 8-byte boundary, then eight
// at a time (slicing-by-8, little-endian words), then the tail.
std::uint32_t raw_table(std::uint32_t s, const std::uint8_t* p, std::size_t n) noexcept {
  const auto& t = kTables.t;
  while (n > 0 && (reinterpret_cast<std::uintptr_t>(p) & 7) != 0) {
    s = t[0][(s ^ *p++) & 0xFF] ^ (s >> 8);
    --n;
  }
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  while (n >= 8) {
    std::uint64_t w;
    std::memcpy(&w, p, 8);
    w ^= s;
    s = t[7][w & 0xFF] ^ t[6][(w >> 8) & 0xFF] ^ t[5][(w >> 16) & 0xFF] ^
        t[4][(w >> 24) & 0xFF] ^ t[3][(w >> 32) & 0xFF] ^ t[2][(w >> 40) & 0xFF] ^
        t[1][(w >> 48) & 0xFF] ^ t[0][w >> 56];
    p += 8;
    n -= 8;
  }
#endif
  while (n-- > 0) s = t[0][(s ^ *p++) & 0xFF] ^ (s >> 8);
  return s;
}

// ------------------------------------------------------------------------------ combining
// a(x) * b(x) mod P for reflected 32-bit polynomials (bit 0 is x^31).
constexpr std::uint32_t multiply_mod_p(std::uint32_t a, std::uint32_t b) noexcept {
  std::uint32_t product = 0;
  for (std::uint32_t bit = 1u << 31; bit != 0; bit >>= 1) {
    if (a & bit) product ^= b;
    b = (b & 1) ? (b >> 1) ^ kReflectedPoly : b >> 1;  // b *= x
  }
  return product;
}

// x^(2^k) mod P, reflected, for k = 0..66: x^(8n) for any 64-bit n is a product of them.
constexpr std::array<std::uint32_t, 67> make_power_table() {
  std::array<std::uint32_t, 67> powers{};
  std::uint32_t p = 1u << 30;  // x^1
  for (std::size_t k = 0; k < powers.size(); ++k) {
    powers[k] = p;
    p = multiply_mod_p(p, p);
  }
  return powers;
}

constexpr std::array<std::uint32_t, 67> kPowers = make_power_table();

// x^(8 * n) mod P: the factor that shifts a CRC state past n bytes of zeros.
std::uint32_t x_pow_8n(std::uint64_t n) noexcept {
  std::uint32_t result = 1u << 31;  // x^0
  for (std::size_t k = 3; n != 0; ++k, n >>= 1) {
    if (n & 1) result = multiply_mod_p(kPowers[k], result);
  }
  return result;
}

// ------------------------------------------------------------------------------ PCLMULQDQ
#ifdef CKPTIO_CRC_PCLMUL
// Folding. A 128-bit register R loaded little-endian from 16 message bytes holds, in bit k,
// the coefficient of x^(127-k): its low 64 bits are L(x) * x^64, its high 64 bits H(x), so
// R = L * x^64 + H. Moving R forward by T bits (onto a block T bits later) multiplies it by
// x^T; modulo P that is  L * (x^(T+64) mod P) + H * (x^T mod P),  under 96 bits, which is
// XORed into the later block. The carry-less product of a 64-bit reflected value and a 33-bit
// reflected constant c (bit j <-> x^(32-j)) lands in bits 0..95 with bit k <-> x^(95-k), i.e.
// it is the polynomial product times x^32 in R's convention. So the constant for L is
// x^(T+32) mod P and the one for H is x^(T-32) mod P, each reflected and shifted left by one.

// x^n mod P (normal bit order, degree < 32).
constexpr std::uint64_t x_pow_mod_p(unsigned n) {
  std::uint64_t v = 1;
  for (unsigned i = 0; i < n; ++i) {
    v <<= 1;
    if (v & (std::uint64_t{1} << 32)) v ^= 0x104C11DB7ull;
  }
  return v;
}

constexpr std::uint64_t fold_constant(unsigned n) {
  std::uint64_t reflected = 0;
  const std::uint64_t v = x_pow_mod_p(n);
  for (int i = 0; i < 32; ++i) {
    if (v & (std::uint64_t{1} << i)) reflected |= std::uint64_t{1} << (31 - i);
  }
  return reflected << 1;
}

constexpr unsigned kFold4Bits = 4 * 128;  // four accumulators, 64 bytes a step
constexpr unsigned kFold1Bits = 128;
constexpr std::uint64_t kFold4Low = fold_constant(kFold4Bits + 32);
constexpr std::uint64_t kFold4High = fold_constant(kFold4Bits - 32);
constexpr std::uint64_t kFold1Low = fold_constant(kFold1Bits + 32);
constexpr std::uint64_t kFold1High = fold_constant(kFold1Bits - 32);
// The values Intel's white paper "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ
// Instruction" lists for this polynomial (k1..k4): a check on the derivation above.
static_assert(kFold4Low == 0x154442BD4ull && kFold4High == 0x1C6E41596ull, "fold-by-4 constants");
static_assert(kFold1Low == 0x1751997D0ull && kFold1High == 0x0CCAA009Eull, "fold-by-1 constants");
constexpr unsigned kFold8Bits = 8 * 128;  // four 256-bit accumulators, 128 bytes a step
constexpr std::uint64_t kFold8Low = fold_constant(kFold8Bits + 32);
constexpr std::uint64_t kFold8High = fold_constant(kFold8Bits - 32);

__attribute__((target("pclmul,sse2"))) inline __m128i fold(__m128i r, __m128i k, __m128i next) {
  const __m128i low = _mm_clmulepi64_si128(r, k, 0x00);   // L * k.low
  const __m128i high = _mm_clmulepi64_si128(r, k, 0x11);  // H * k.high
  return _mm_xor_si128(_mm_xor_si128(low, high), next);
}

__attribute__((target("pclmul,sse2"))) inline __m128i load(const std::uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// Raw update over n >= 64 bytes: four accumulators fold 64 bytes a step (independent
// multiplications keep the multiplier busy), then merge into one, fold the remaining 16-byte
// blocks, and hand the last 128-bit remainder plus the < 16 byte tail to the tables. The
// remainder R is congruent to everything folded so far, so the raw CRC of its 16 bytes from
// state 0 is the state after them.
__attribute__((target("pclmul,sse2"))) std::uint32_t raw_pclmul(std::uint32_t s,
                                                                 const std::uint8_t* p,
                                                                 std::size_t n) noexcept {
  const __m128i k4 = _mm_set_epi64x(static_cast<long long>(kFold4High),
                                    static_cast<long long>(kFold4Low));
  const __m128i k1 = _mm_set_epi64x(static_cast<long long>(kFold1High),
                                    static_cast<long long>(kFold1Low));
  // The state enters as the first 32 message bits XORed with it (s(x) * x^n, above).
  __m128i x0 = _mm_xor_si128(load(p), _mm_cvtsi32_si128(static_cast<int>(s)));
  __m128i x1 = load(p + 16);
  __m128i x2 = load(p + 32);
  __m128i x3 = load(p + 48);
  p += 64;
  n -= 64;
  while (n >= 64) {
    x0 = fold(x0, k4, load(p));
    x1 = fold(x1, k4, load(p + 16));
    x2 = fold(x2, k4, load(p + 32));
    x3 = fold(x3, k4, load(p + 48));
    p += 64;
    n -= 64;
  }
  x0 = fold(x0, k1, x1);
  x0 = fold(x0, k1, x2);
  x0 = fold(x0, k1, x3);
  while (n >= 16) {
    x0 = fold(x0, k1, load(p));
    p += 16;
    n -= 16;
  }
  alignas(16) std::uint8_t remainder[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(remainder), x0);
  return raw_table(raw_table(0, remainder, sizeof remainder), p, n);
}

// The same folding on 256-bit registers (VPCLMULQDQ multiplies both 128-bit lanes at once):
// four accumulators of two lanes each, every lane moved 1024 bits forward per step; then the
// eight lanes, in message order, are folded into one 128-bit remainder as above. Twice the
// bytes per multiply instruction of raw_pclmul. Needs n >= 128.
__attribute__((target("avx2,vpclmulqdq,pclmul"))) inline __m256i fold256(__m256i r, __m256i k,
                                                                          __m256i next) {
  const __m256i low = _mm256_clmulepi64_epi128(r, k, 0x00);
  const __m256i high = _mm256_clmulepi64_epi128(r, k, 0x11);
  return _mm256_xor_si256(_mm256_xor_si256(low, high), next);
}

__attribute__((target("avx2,vpclmulqdq,pclmul"))) inline __m256i load256(const std::uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

__attribute__((target("avx2,vpclmulqdq,pclmul"))) std::uint32_t raw_vpclmul(
    std::uint32_t s, const std::uint8_t* p, std::size_t n) noexcept {
  const __m256i k8 = _mm256_set_epi64x(
      static_cast<long long>(kFold8High), static_cast<long long>(kFold8Low),
      static_cast<long long>(kFold8High), static_cast<long long>(kFold8Low));
  const __m128i k1 = _mm_set_epi64x(static_cast<long long>(kFold1High),
                                    static_cast<long long>(kFold1Low));
  __m256i y0 = _mm256_xor_si256(load256(p), _mm256_set_epi64x(0, 0, 0, static_cast<long long>(s)));
  __m256i y1 = load256(p + 32);
  __m256i y2 = load256(p + 64);
  __m256i y3 = load256(p + 96);
  p += 128;
  n -= 128;
  while (n >= 128) {
    y0 = fold256(y0, k8, load256(p));
    y1 = fold256(y1, k8, load256(p + 32));
    y2 = fold256(y2, k8, load256(p + 64));
    y3 = fold256(y3, k8, load256(p + 96));
    p += 128;
    n -= 128;
  }
  __m128i x = _mm256_castsi256_si128(y0);
  x = fold(x, k1, _mm256_extracti128_si256(y0, 1));
  x = fold(x, k1, _mm256_castsi256_si128(y1));
  x = fold(x, k1, _mm256_extracti128_si256(y1, 1));
  x = fold(x, k1, _mm256_castsi256_si128(y2));
  x = fold(x, k1, _mm256_extracti128_si256(y2, 1));
  x = fold(x, k1, _mm256_castsi256_si128(y3));
  x = fold(x, k1, _mm256_extracti128_si256(y3, 1));
  while (n >= 16) {
    x = fold(x, k1, load(p));
    p += 16;
    n -= 16;
  }
  alignas(16) std::uint8_t remainder[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(remainder), x);
  return raw_table(raw_table(0, remainder, sizeof remainder), p, n);
}

bool cpu_has_vpclmul() noexcept {
  __builtin_cpu_init();
  return __builtin_cpu_supports("vpclmulqdq") && __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("pclmul");
}

bool cpu_has_pclmul() noexcept {
  __builtin_cpu_init();
  return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse2");
}
#endif  // CKPTIO_CRC_PCLMUL

// Below this many bytes the tables win (and raw_pclmul needs 64).
constexpr std::size_t kPclmulMinBytes = 256;

std::uint32_t update_pclmul(std::uint32_t crc, const void* data, std::size_t n) noexcept {
  const auto* p = static_cast<const std::uint8_t*>(data);
#ifdef CKPTIO_CRC_PCLMUL
  if (n >= kPclmulMinBytes) return ~raw_pclmul(~crc, p, n);
#endif
  return ~raw_table(~crc, p, n);
}

std::uint32_t update_vpclmul(std::uint32_t crc, const void* data, std::size_t n) noexcept {
  const auto* p = static_cast<const std::uint8_t*>(data);
#ifdef CKPTIO_CRC_PCLMUL
  if (n >= kPclmulMinBytes) return ~raw_vpclmul(~crc, p, n);
#endif
  return ~raw_table(~crc, p, n);
}

std::uint32_t update_table(std::uint32_t crc, const void* data, std::size_t n) noexcept {
  return ~raw_table(~crc, static_cast<const std::uint8_t*>(data), n);
}

#ifdef CKPTIO_HAVE_ZLIB
std::uint32_t update_zlib(std::uint32_t crc, const void* data, std::size_t n) noexcept {
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
#endif

struct Implementation {
  std::uint32_t (*update)(std::uint32_t, const void*, std::size_t) noexcept;
  const char* name;
};

Implementation choose() noexcept {
  if (detail::crc32_vpclmul_supported()) return {&update_vpclmul, "vpclmulqdq"};
  if (detail::crc32_pclmul_supported()) return {&update_pclmul, "pclmulqdq"};
#ifdef CKPTIO_HAVE_ZLIB
  return {&update_zlib, "zlib"};
#else
  return {&update_table, "table"};
#endif
}

const Implementation& implementation() noexcept {
  static const Implementation chosen = choose();
  return chosen;
}

}  // namespace

bool crc32_available() noexcept { return true; }

const char* crc32_implementation() noexcept { return implementation().name; }

std::uint32_t crc32_update(std::uint32_t crc, const void* data, std::size_t n) noexcept {
  if (n == 0) return crc;
  return implementation().update(crc, data, n);
}

std::uint32_t crc32_combine(std::uint32_t crc_a, std::uint32_t crc_b, std::uint64_t len_b) noexcept {
  // crc(A||B) = crc(A) * x^(8 len B) + crc(B) mod P: the pre- and post-inversions of the
  // three values cancel out (they are the CRCs of the same-length zero message).
  return multiply_mod_p(x_pow_8n(len_b), crc_a) ^ crc_b;
}

namespace detail {

std::uint32_t crc32_table(std::uint32_t crc, const void* data, std::size_t n) noexcept {
  return update_table(crc, data, n);
}

bool crc32_pclmul_supported() noexcept {
#ifdef CKPTIO_CRC_PCLMUL
  static const bool supported = cpu_has_pclmul();
  return supported;
#else
  return false;
#endif
}

std::uint32_t crc32_pclmul(std::uint32_t crc, const void* data, std::size_t n) noexcept {
  // Folds from 64 bytes on (crc32_update waits for kPclmulMinBytes), so tests reach every path.
  const auto* p = static_cast<const std::uint8_t*>(data);
#ifdef CKPTIO_CRC_PCLMUL
  if (n >= 64) return ~raw_pclmul(~crc, p, n);
#endif
  return ~raw_table(~crc, p, n);
}

bool crc32_vpclmul_supported() noexcept {
#ifdef CKPTIO_CRC_PCLMUL
  static const bool supported = cpu_has_vpclmul();
  return supported;
#else
  return false;
#endif
}

std::uint32_t crc32_vpclmul(std::uint32_t crc, const void* data, std::size_t n) noexcept {
  const auto* p = static_cast<const std::uint8_t*>(data);
#ifdef CKPTIO_CRC_PCLMUL
  if (n >= 128) return ~raw_vpclmul(~crc, p, n);
#endif
  return ~raw_table(~crc, p, n);
}

}  // namespace detail
}  // namespace ckptio
