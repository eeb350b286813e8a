// CRC-32: every implementation against a bit-at-a-time reference and, when the build has it,
// zlib; lengths from 0 to several MB at every alignment; continuation and combining.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "ckptio/byte_source.hpp"
#include "ckptio/checksum.hpp"
#include "ckptio/errors.hpp"
#include "ckptio/parallel_io.hpp"
#include "ckptio/thread_pool.hpp"
#include "harness.hpp"

#ifdef CKPTIO_HAVE_ZLIB
#include <zlib.h>
// With _FILE_OFFSET_BITS=64 zlib makes crc32_combine a macro for crc32_combine64, which would
// also rename ckptio::crc32_combine here.
#ifdef crc32_combine
#undef crc32_combine
#define CKPTIO_ZLIB_COMBINE ::crc32_combine64
#else
#define CKPTIO_ZLIB_COMBINE ::crc32_combine
#endif
#endif

namespace {

using Bytes = std::vector<std::uint8_t>;

// The definition, one bit at a time: the reference every implementation must match.
std::uint32_t crc_bitwise(std::uint32_t crc, const std::uint8_t* p, std::size_t n) {
  std::uint32_t s = ~crc;
  for (std::size_t i = 0; i < n; ++i) {
    s ^= p[i];
    for (int b = 0; b < 8; ++b) s = (s & 1) ? (s >> 1) ^ 0xEDB88320u : s >> 1;
  }
  return ~s;
}

using Fn = std::uint32_t (*)(std::uint32_t, const void*, std::size_t);

struct Named {
  const char* name;
  Fn fn;
};

std::vector<Named> implementations() {
  std::vector<Named> out = {
      {"crc32_update", [](std::uint32_t c, const void* d, std::size_t n) {
         return ckptio::crc32_update(c, d, n);
       }},
      {"table", [](std::uint32_t c, const void* d, std::size_t n) {
         return ckptio::detail::crc32_table(c, d, n);
       }},
  };
  if (ckptio::detail::crc32_pclmul_supported()) {
    out.push_back({"pclmul", [](std::uint32_t c, const void* d, std::size_t n) {
                     return ckptio::detail::crc32_pclmul(c, d, n);
                   }});
  }
  if (ckptio::detail::crc32_vpclmul_supported()) {
    out.push_back({"vpclmul", [](std::uint32_t c, const void* d, std::size_t n) {
                     return ckptio::detail::crc32_vpclmul(c, d, n);
                   }});
  }
  return out;
}

// A small deterministic generator for lengths and offsets.
struct Rng {
  std::uint64_t s;
  std::uint64_t next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  }
  std::size_t below(std::size_t n) { return static_cast<std::size_t>(next() % n); }
};

void check_all(const Bytes& buf, std::size_t at, std::size_t n, std::uint32_t init,
               std::uint32_t expected, const char* what) {
  for (const Named& impl : implementations()) {
    const std::uint32_t got = impl.fn(init, buf.data() + at, n);
    if (got != expected) {
      harness::fail(__FILE__, __LINE__,
                    std::string(impl.name) + " " + what + ": length " + std::to_string(n) +
                        " at offset " + std::to_string(at) + " init " + std::to_string(init) +
                        ": " + std::to_string(got) + " != " + std::to_string(expected));
      return;
    }
  }
}

}  // namespace

TEST(crc32_check_value_and_empty_input) {
  const char* check = "123456789";
  for (const Named& impl : implementations()) {
    CHECK_EQ(impl.fn(0, check, 9), 0xCBF43926u);
    CHECK_EQ(impl.fn(0, nullptr, 0), 0u);
    CHECK_EQ(impl.fn(0x12345678u, nullptr, 0), 0x12345678u);
  }
  CHECK(ckptio::crc32_available());
}

TEST(crc32_implementation_is_pclmul_where_the_cpu_has_it) {
  const std::string name = ckptio::crc32_implementation();
  if (ckptio::detail::crc32_vpclmul_supported()) {
    CHECK_EQ(name, std::string("vpclmulqdq"));
  } else if (ckptio::detail::crc32_pclmul_supported()) {
    CHECK_EQ(name, std::string("pclmulqdq"));
  } else {
    CHECK(name == "zlib" || name == "table");
  }
}

TEST(crc32_every_length_to_1100_at_every_alignment_matches_the_definition) {
  // Covers the table path, the pclmul entry (64 bytes) and threshold, each fold count and
  // every tail length, with and without a starting CRC.
  const Bytes buf = harness::pattern(1100 + 16, 7);
  for (std::size_t at = 0; at < 16; ++at) {
    for (std::size_t n = 0; n + at <= 1100; ++n) {
      const std::uint32_t init = static_cast<std::uint32_t>(n * 2654435761u);
      check_all(buf, at, n, 0, crc_bitwise(0, buf.data() + at, n), "from 0");
      check_all(buf, at, n, init, crc_bitwise(init, buf.data() + at, n), "continued");
    }
  }
}

TEST(crc32_random_lengths_and_alignments_up_to_several_mb) {
  const std::size_t max = (6u << 20) + 77;
  const Bytes buf = harness::pattern(max + 64, 11);
  Rng rng{0x9E3779B97F4A7C15ull};
  for (int i = 0; i < 40; ++i) {
    const std::size_t at = rng.below(64);
    // Half the lengths small (where paths switch), half up to several MB.
    const std::size_t n = (i % 2) ? rng.below(max) : rng.below(4096);
    const auto init = static_cast<std::uint32_t>(rng.next());
#ifdef CKPTIO_HAVE_ZLIB
    const auto expected = static_cast<std::uint32_t>(
        ::crc32(init, buf.data() + at, static_cast<uInt>(n)));
#else
    const std::uint32_t expected = crc_bitwise(init, buf.data() + at, n);
#endif
    check_all(buf, at, n, init, expected, "random");
  }
  // Edge content: all zeros and all ones, where a lost carry would show.
  for (std::uint8_t fill : {std::uint8_t{0}, std::uint8_t{0xFF}}) {
    const Bytes flat(100000, fill);
    check_all(flat, 0, flat.size(), 0, crc_bitwise(0, flat.data(), flat.size()), "flat");
  }
}

TEST(crc32_continuation_equals_one_pass) {
  const Bytes buf = harness::pattern(5000, 3);
  const std::uint32_t whole = crc_bitwise(0, buf.data(), buf.size());
  for (std::size_t cut = 0; cut <= buf.size(); cut += 37) {
    for (const Named& impl : implementations()) {
      const std::uint32_t first = impl.fn(0, buf.data(), cut);
      CHECK_EQ(impl.fn(first, buf.data() + cut, buf.size() - cut), whole);
    }
  }
}

TEST(crc32_combine_joins_pieces) {
  const Bytes buf = harness::pattern(300000, 5);
  const std::uint32_t whole = ckptio::crc32_update(0, buf.data(), buf.size());
  Rng rng{42};
  for (int i = 0; i < 200; ++i) {
    const std::size_t cut = rng.below(buf.size() + 1);
    const std::uint32_t a = ckptio::crc32_update(0, buf.data(), cut);
    const std::uint32_t b = ckptio::crc32_update(0, buf.data() + cut, buf.size() - cut);
    CHECK_EQ(ckptio::crc32_combine(a, b, buf.size() - cut), whole);
  }
  // Identities: nothing appended; appended to nothing.
  const std::uint32_t a = ckptio::crc32_update(0, "12345", 5);
  const std::uint32_t b = ckptio::crc32_update(0, "6789", 4);
  CHECK_EQ(ckptio::crc32_combine(a, b, 4), 0xCBF43926u);
  CHECK_EQ(ckptio::crc32_combine(0, b, 4), b);
  CHECK_EQ(ckptio::crc32_combine(a, 0, 0), a);
}

TEST(crc32_combine_matches_zlib_for_large_lengths) {
  // Lengths past 4 GiB (records of that size are split into pieces and combined) against
  // zlib's combine, else against the CRC of zeros computed by combining smaller zero runs.
  Rng rng{7};
  for (int i = 0; i < 50; ++i) {
    const auto a = static_cast<std::uint32_t>(rng.next());
    const auto b = static_cast<std::uint32_t>(rng.next());
    const std::uint64_t len = rng.next() >> (i % 40);
#ifdef CKPTIO_HAVE_ZLIB
    static_assert(sizeof(z_off_t) >= 8 || sizeof(void*) < 8, "64-bit zlib offsets");
    const auto expected = static_cast<std::uint32_t>(
        CKPTIO_ZLIB_COMBINE(a, b, static_cast<z_off_t>(len & 0x7FFFFFFFFFFFFFFFull)));
    CHECK_EQ(ckptio::crc32_combine(a, b, len & 0x7FFFFFFFFFFFFFFFull), expected);
#else
    // combine over len == combine over len/2 twice (the same shift), then the odd byte.
    const std::uint64_t half = len / 2;
    std::uint32_t twice = ckptio::crc32_combine(ckptio::crc32_combine(a, 0, half), 0, half);
    if (len & 1) twice = ckptio::crc32_combine(twice, 0, 1);
    CHECK_EQ(ckptio::crc32_combine(a, 0, len) ^ b, twice ^ b);
#endif
  }
  // A combined zero run equals the CRC of the zeros themselves.
  const Bytes zeros(1 << 20, 0);
  const std::uint32_t z = ckptio::crc32_update(0, zeros.data(), zeros.size());
  const std::uint32_t head = ckptio::crc32_update(0, "ab", 2);
  CHECK_EQ(ckptio::crc32_combine(head, z, zeros.size()),
           ckptio::crc32_update(head, zeros.data(), zeros.size()));
}

// ------------------------------------------------------------------ checksummed reads

TEST(read_ranges_with_crcs_fills_and_checksums_every_request) {
  // Requests of every size class (empty, tiny, split across chunks, longer than a CRC step),
  // from two sources in one plan: each CRC is the request's bytes', in request order.
  const Bytes a = harness::pattern((3u << 20) + 333, 21);
  const Bytes b = harness::pattern(100000, 22);
  const ckptio::MemorySource sa(a.data(), a.size(), "a");
  const ckptio::MemorySource sb(b.data(), b.size(), "b");
  Rng rng{99};
  std::vector<std::pair<std::size_t, std::size_t>> ranges_a = {
      {0, 0}, {5, 1}, {100, 4096}, {7, (2u << 20) + 17}, {a.size() - 10, 10}};
  for (int i = 0; i < 200; ++i) {
    const std::size_t at = rng.below(a.size());
    ranges_a.push_back({at, rng.below(std::min<std::size_t>(a.size() - at, 70000) + 1)});
  }
  std::vector<std::pair<std::size_t, std::size_t>> ranges_b = {{0, b.size()}, {3, 9}};
  std::vector<Bytes> out_a(ranges_a.size()), out_b(ranges_b.size());
  std::vector<ckptio::SourceReads> plan(2);
  plan[0].source = &sa;
  plan[1].source = &sb;
  for (std::size_t i = 0; i < ranges_a.size(); ++i) {
    out_a[i].resize(ranges_a[i].second + 1);
    plan[0].requests.push_back({ranges_a[i].first, ranges_a[i].second, out_a[i].data()});
  }
  for (std::size_t i = 0; i < ranges_b.size(); ++i) {
    out_b[i].resize(ranges_b[i].second + 1);
    plan[1].requests.push_back({ranges_b[i].first, ranges_b[i].second, out_b[i].data()});
  }
  for (std::size_t threads : {std::size_t{1}, std::size_t{3}}) {
    ckptio::ThreadPool pool(threads);
    std::vector<std::uint32_t> crcs;
    ckptio::read_ranges_many(plan, pool, 65536 + 3, &crcs);
    CHECK_EQ(crcs.size(), ranges_a.size() + ranges_b.size());
    bool ok = true;
    for (std::size_t i = 0; i < ranges_a.size(); ++i) {
      const auto [at, n] = ranges_a[i];
      ok = ok && std::memcmp(out_a[i].data(), a.data() + at, n) == 0;
      ok = ok && crcs[i] == crc_bitwise(0, a.data() + at, n);
    }
    for (std::size_t i = 0; i < ranges_b.size(); ++i) {
      const auto [at, n] = ranges_b[i];
      ok = ok && crcs[ranges_a.size() + i] == crc_bitwise(0, b.data() + at, n);
    }
    CHECK(ok);
  }
  // The single-source form, and no CRCs asked for: nothing returned.
  ckptio::ThreadPool pool(2);
  std::vector<std::uint32_t> crcs = {1, 2, 3};
  ckptio::read_ranges(sb, plan[1].requests, pool, 4096, &crcs);
  CHECK_EQ(crcs.size(), 2u);
  CHECK_EQ(crcs[0], crc_bitwise(0, b.data(), b.size()));
}

TEST(checksum_ranges_reads_nothing_into_the_caller_and_checks_bounds_first) {
  const Bytes data = harness::pattern((5u << 20) + 1, 23);
  const ckptio::MemorySource source(data.data(), data.size(), "src");
  std::vector<ckptio::ByteRange> ranges = {
      {0, data.size()}, {1, 0}, {data.size(), 0}, {12345, (1u << 20) + 1}, {77, 64}};
  for (std::size_t threads : {std::size_t{1}, std::size_t{4}}) {
    ckptio::ThreadPool pool(threads);
    const auto crcs = ckptio::checksum_ranges(source, ranges, pool, 1u << 20);
    CHECK_EQ(crcs.size(), ranges.size());
    for (std::size_t i = 0; i < ranges.size(); ++i) {
      CHECK_EQ(crcs[i], ckptio::crc32_update(0, data.data() + ranges[i].offset,
                                             static_cast<std::size_t>(ranges[i].length)));
    }
  }
  ckptio::ThreadPool pool(2);
  ranges.push_back({data.size() - 3, 4});
  CHECK_THROWS(ckptio::checksum_ranges(source, ranges, pool, 4096), ckptio::FormatError);
}
