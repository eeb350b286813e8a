#include <fcntl.h>
#include <sys/mman.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "ckptio/checksum.hpp"
#include "ckptio/detail/chunking.hpp"
#include "ckptio/errors.hpp"
#include "ckptio/file.hpp"
#include "ckptio/parallel_io.hpp"
#include "ckptio/thread_pool.hpp"
#include "harness.hpp"

using ckptio::File;
using ckptio::ReadRequest;
using ckptio::ThreadPool;
using ckptio::WriteRequest;

namespace {

std::string make_file(const harness::TempDir& dir, const std::vector<std::uint8_t>& data) {
  const std::string path = dir.file("src.bin");
  File f = File::open(path, File::Mode::kCreate);
  f.write_all(data.data(), data.size(), 0);
  return path;
}

std::vector<std::uint8_t> read_all(const std::string& path) {
  File f = File::open(path, File::Mode::kRead);
  std::vector<std::uint8_t> out(static_cast<std::size_t>(f.size()));
  f.read_exact(out.data(), out.size(), 0);
  return out;
}

// Memory that counts its reads (read_exact calls and vectored reads apart), so a test can prove
// that validation happens before any I/O, or how a plan read. `cold` makes it say it is out
// of the page cache: the cold paths without evicting a file.
class CountingSource final : public ckptio::ByteSource {
 public:
  explicit CountingSource(const std::vector<std::uint8_t>& data, bool cold = false)
      : inner_(data.data(), data.size(), cold ? "<cold>" : "<counting>"), cold_(cold) {}
  std::uint64_t size() const override { return inner_.size(); }
  void read_exact(void* dst, std::size_t n, std::uint64_t offset) const override {
    reads.fetch_add(1);
    inner_.read_exact(dst, n, offset);
  }
  void read_vectored(struct iovec* iov, int count, std::uint64_t offset) const override {
    vectored.fetch_add(1);
    for (int i = 0; i < count; ++i) {
      inner_.read_exact(iov[i].iov_base, iov[i].iov_len, offset);
      offset += iov[i].iov_len;
    }
  }
  bool cached(std::uint64_t) const override { return !cold_; }
  const std::string& name() const override { return inner_.name(); }
  mutable std::atomic<int> reads{0};
  mutable std::atomic<int> vectored{0};

 private:
  ckptio::MemorySource inner_;
  bool cold_;
};

struct Lcg {
  std::uint64_t x;
  std::uint64_t next(std::uint64_t bound) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    return (x >> 33) % bound;
  }
};

}  // namespace

TEST(read_ranges_odd_sizes_and_chunk_splitting) {
  harness::TempDir dir;
  const auto data = harness::pattern((3u << 20) + 13, 11);
  const std::string path = make_file(dir, data);
  File f = File::open(path, File::Mode::kRead);
  for (std::size_t threads : {1, 4}) {
    ThreadPool pool(threads);
    for (std::size_t chunk : {std::size_t{1}, std::size_t{999}, std::size_t{4096},
                              std::size_t{1} << 20, std::size_t{8} << 20}) {
      const std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges = {
          {0, data.size()}, {1, 12345}, {data.size() - 1, 1}, {777, 0}, {data.size(), 0},
          {4095, 4097},     {100, 1},   {(1u << 20) + 3, (1u << 20) + 7}};
      if (chunk == 1) {
        // Byte-sized tasks over megabytes would only measure the harness.
        std::vector<std::uint8_t> small(5000);
        ckptio::read_ranges(f, {{1000, 5000, small.data()}}, pool, chunk);
        CHECK(std::memcmp(small.data(), data.data() + 1000, small.size()) == 0);
        continue;
      }
      std::vector<std::vector<std::uint8_t>> bufs;
      std::vector<ReadRequest> reqs;
      for (const auto& r : ranges) bufs.emplace_back(static_cast<std::size_t>(r.second) + 1, 0xEE);
      for (std::size_t i = 0; i < ranges.size(); ++i) {
        reqs.push_back({ranges[i].first, ranges[i].second, bufs[i].data()});
      }
      ckptio::read_ranges(f, reqs, pool, chunk);
      for (std::size_t i = 0; i < ranges.size(); ++i) {
        const auto len = static_cast<std::size_t>(ranges[i].second);
        CHECK(std::memcmp(bufs[i].data(), data.data() + ranges[i].first, len) == 0);
        CHECK(bufs[i][len] == 0xEE);  // nothing past the range
      }
    }
  }
}

TEST(read_ranges_ten_thousand_small_requests) {
  harness::TempDir dir;
  const auto data = harness::pattern(1u << 20, 12);
  File f = File::open(make_file(dir, data), File::Mode::kRead);
  ThreadPool pool(4);
  Lcg rng{42};
  std::vector<std::uint8_t> out(10000 * 300);
  std::vector<ReadRequest> reqs;
  for (std::size_t i = 0; i < 10000; ++i) {
    const std::uint64_t len = rng.next(300);
    const std::uint64_t off = rng.next(data.size() - len + 1);
    reqs.push_back({off, len, out.data() + i * 300});
  }
  ckptio::read_ranges(f, reqs, pool, 64 << 10);
  bool ok = true;
  for (const auto& r : reqs) {
    ok = ok && std::memcmp(r.dst, data.data() + r.offset, static_cast<std::size_t>(r.length)) == 0;
  }
  CHECK(ok);
}

TEST(read_ranges_validates_everything_before_any_io) {
  const auto data = harness::pattern(1000, 13);
  CountingSource src(data);
  ThreadPool pool(2);
  std::vector<std::uint8_t> buf(1000);
  std::vector<ReadRequest> reqs = {{0, 10, buf.data()}, {10, 10, buf.data()}, {995, 6, buf.data()}};
  try {
    ckptio::read_ranges(src, reqs, pool, 4096);
    CHECK(false);
  } catch (const ckptio::FormatError& e) {
    CHECK(std::string(e.what()).find("<counting>") == 0);
  }
  CHECK_EQ(src.reads.load(), 0);
  reqs = {{0, 10, buf.data()}, {UINT64_MAX - 2, 5, buf.data()}};
  CHECK_THROWS(ckptio::read_ranges(src, reqs, pool, 4096), ckptio::FormatError);
  reqs = {{1001, 0, buf.data()}};
  CHECK_THROWS(ckptio::read_ranges(src, reqs, pool, 4096), ckptio::FormatError);
  CHECK_EQ(src.reads.load(), 0);
  reqs = {{0, 10, buf.data()}};
  CHECK_THROWS(ckptio::read_ranges(src, reqs, pool, 0), ckptio::InvalidArgument);
  reqs = {{0, 10, nullptr}};
  CHECK_THROWS(ckptio::read_ranges(src, reqs, pool, 4096), ckptio::InvalidArgument);
  CHECK_EQ(src.reads.load(), 0);
  ckptio::read_ranges(src, {}, pool, 4096);
  ckptio::read_ranges(src, {{1000, 0, nullptr}}, pool, 4096);
  CHECK_EQ(src.reads.load(), 0);
}

TEST(read_ranges_many_sources_one_plan) {
  // Eight sources of different sizes, many ranges each, read as one batch: every byte lands
  // from its own source.
  std::vector<std::vector<std::uint8_t>> datas;
  std::vector<std::unique_ptr<CountingSource>> sources;
  for (std::uint32_t s = 0; s < 8; ++s) {
    datas.push_back(harness::pattern(1000 + 7919 * s, 100 + s));
  }
  for (const auto& d : datas) sources.push_back(std::make_unique<CountingSource>(d));
  ThreadPool pool(3);
  Lcg rng{7};
  std::vector<std::vector<std::uint8_t>> outs(8);
  std::vector<ckptio::SourceReads> batches;
  for (std::size_t s = 0; s < 8; ++s) {
    outs[s].resize(200 * 64);
    ckptio::SourceReads batch{sources[s].get(), {}};
    for (std::size_t i = 0; i < 200; ++i) {
      const std::uint64_t len = rng.next(65);
      const std::uint64_t off = rng.next(datas[s].size() - len + 1);
      batch.requests.push_back({off, len, outs[s].data() + i * 64});
    }
    batches.push_back(std::move(batch));
  }
  ckptio::read_ranges_many(batches, pool, 1024);
  bool ok = true;
  for (std::size_t s = 0; s < 8; ++s) {
    for (const auto& r : batches[s].requests) {
      ok = ok && std::memcmp(r.dst, datas[s].data() + r.offset,
                             static_cast<std::size_t>(r.length)) == 0;
    }
  }
  CHECK(ok);
}

TEST(read_ranges_many_checks_every_source_before_any_io) {
  const auto a = harness::pattern(1000, 1);
  const auto b = harness::pattern(500, 2);
  CountingSource sa(a);
  CountingSource sb(b);
  ThreadPool pool(2);
  std::vector<std::uint8_t> buf(1000);
  // The bad range is in the second source: the first is not read either.
  std::vector<ckptio::SourceReads> batches = {{&sa, {{0, 1000, buf.data()}}},
                                              {&sb, {{400, 101, buf.data()}}}};
  CHECK_THROWS(ckptio::read_ranges_many(batches, pool, 4096), ckptio::FormatError);
  CHECK_EQ(sa.reads.load() + sb.reads.load(), 0);
  ckptio::read_ranges_many({}, pool, 4096);
}

TEST(write_ranges_ten_thousand_small_requests_with_crcs) {
  if (!ckptio::crc32_available()) return;
  harness::TempDir dir;
  const std::string path = dir.file("out.bin");
  const auto data = harness::pattern(2u << 20, 14);
  Lcg rng{7};
  // Mostly adjacent runs (coalesced into pwritev) with occasional gaps and empty requests.
  std::vector<WriteRequest> reqs;
  std::uint64_t pos = 0;
  std::uint64_t src_at = 0;
  for (int i = 0; i < 10000; ++i) {
    const std::uint64_t len = rng.next(200);
    if (rng.next(10) == 0) pos += rng.next(50);
    reqs.push_back({pos, len, data.data() + src_at});
    pos += len;
    src_at = (src_at + len) % (data.size() - 200);
  }
  for (std::size_t threads : {1, 3}) {
    ThreadPool pool(threads);
    {
      File f = File::open(path, File::Mode::kCreate);
      std::vector<std::uint32_t> crcs;
      ckptio::write_ranges(f, reqs, pool, 4096, &crcs);
      CHECK_EQ(crcs.size(), reqs.size());
      bool ok = true;
      for (std::size_t i = 0; i < reqs.size(); ++i) {
        ok = ok && crcs[i] == ckptio::crc32_update(0, reqs[i].src, static_cast<std::size_t>(reqs[i].length));
        if (reqs[i].length == 0) ok = ok && crcs[i] == 0;
      }
      CHECK(ok);
    }
    const auto back = read_all(path);
    bool ok = true;
    for (const auto& r : reqs) {
      ok = ok && r.offset + r.length <= back.size() &&
           std::memcmp(back.data() + r.offset, r.src, static_cast<std::size_t>(r.length)) == 0;
    }
    CHECK(ok);
  }
}

TEST(write_ranges_splits_long_ranges_and_crc_matches_single_pass) {
  if (!ckptio::crc32_available()) return;
  harness::TempDir dir;
  const std::string path = dir.file("big.bin");
  const auto data = harness::pattern((5u << 20) + 3, 15);
  ThreadPool pool(4);
  File f = File::open(path, File::Mode::kCreate);
  const std::vector<WriteRequest> reqs = {{0, 1000001, data.data()},
                                          {1000001, data.size() - 1000001, data.data() + 1000001},
                                          {data.size() + 10, 7, data.data()}};
  std::vector<std::uint32_t> crcs;
  ckptio::write_ranges(f, reqs, pool, 65536 + 1, &crcs);
  CHECK_EQ(crcs[0], ckptio::crc32_update(0, data.data(), 1000001));
  CHECK_EQ(crcs[1], ckptio::crc32_update(0, data.data() + 1000001, data.size() - 1000001));
  CHECK_EQ(crcs[2], ckptio::crc32_update(0, data.data(), 7));
  const std::uint32_t whole = ckptio::crc32_update(0, data.data(), data.size());
  CHECK_EQ(ckptio::crc32_combine(crcs[0], crcs[1], data.size() - 1000001), whole);
  f.close();
  const auto back = read_all(path);
  CHECK_EQ(back.size(), data.size() + 17);
  CHECK(std::memcmp(back.data(), data.data(), data.size()) == 0);
  CHECK(back[data.size()] == 0);
  CHECK(std::memcmp(back.data() + data.size() + 10, data.data(), 7) == 0);
}

TEST(write_ranges_rejects_bad_arguments) {
  harness::TempDir dir;
  File f = File::open(dir.file("bad.bin"), File::Mode::kCreate);
  ThreadPool pool(2);
  const char x = 'x';
  CHECK_THROWS(ckptio::write_ranges(f, {{0, 1, &x}}, pool, 0), ckptio::InvalidArgument);
  CHECK_THROWS(ckptio::write_ranges(f, {{0, 1, nullptr}}, pool, 16), ckptio::InvalidArgument);
  CHECK_THROWS(ckptio::write_ranges(f, {{UINT64_MAX, 2, &x}}, pool, 16), ckptio::InvalidArgument);
  CHECK_EQ(f.size(), 0u);
  std::vector<std::uint32_t> crcs = {99};
  if (ckptio::crc32_available()) {
    ckptio::write_ranges(f, {{5, 0, nullptr}}, pool, 16, &crcs);
    CHECK_EQ(crcs.size(), 1u);
    CHECK_EQ(crcs[0], 0u);
  }
  CHECK_EQ(f.size(), 0u);
}

TEST(checksum_known_values) {
  if (!ckptio::crc32_available()) {
    CHECK_THROWS(ckptio::crc32_update(0, "a", 1), ckptio::InvalidArgument);
    return;
  }
  CHECK_EQ(ckptio::crc32_update(0, "123456789", 9), 0xCBF43926u);
  CHECK_EQ(ckptio::crc32_update(0, nullptr, 0), 0u);
  const std::uint32_t a = ckptio::crc32_update(0, "12345", 5);
  const std::uint32_t b = ckptio::crc32_update(0, "6789", 4);
  CHECK_EQ(ckptio::crc32_combine(a, b, 4), 0xCBF43926u);
  CHECK_EQ(ckptio::crc32_combine(0, b, 4), b);
  CHECK_EQ(ckptio::crc32_combine(a, 0, 0), a);
}

TEST(parallel_crc32_matches_single_pass) {
  if (!ckptio::crc32_available()) return;
  const auto data = harness::pattern(3u << 20, 16);
  ThreadPool pool(3);
  std::vector<ckptio::detail::CrcInput> inputs = {
      {data.data(), data.size()}, {nullptr, 0}, {data.data() + 5, 17}, {data.data(), 1u << 20}};
  const auto crcs = ckptio::detail::parallel_crc32(inputs, pool, 100000);
  CHECK_EQ(crcs.size(), 4u);
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    CHECK_EQ(crcs[i], ckptio::crc32_update(0, inputs[i].data, static_cast<std::size_t>(inputs[i].size)));
  }
}

TEST(plan_tasks_groups_and_splits) {
  const std::vector<std::uint64_t> lengths = {10, 0, 25, 3, 100};
  const auto plan = ckptio::detail::plan_tasks(
      lengths.size(), [&](std::size_t i) { return lengths[i]; }, 20, 1);
  // 138 bytes in tasks of 20 -> 7 tasks; every byte covered once, in order.
  CHECK_EQ(plan.task_count(), 7u);
  std::vector<std::uint64_t> covered(lengths.size(), 0);
  for (const auto& p : plan.pieces) {
    CHECK_EQ(p.offset, covered[p.request]);
    CHECK(p.length > 0);
    covered[p.request] += p.length;
  }
  CHECK(covered == lengths);
  for (std::size_t t = 0; t + 1 < plan.task_count(); ++t) {
    std::uint64_t bytes = 0;
    for (std::size_t k = plan.task_start[t]; k < plan.task_start[t + 1]; ++k) bytes += plan.pieces[k].length;
    CHECK_EQ(bytes, 20u);
  }
  const auto empty = ckptio::detail::plan_tasks(
      3, [](std::size_t) { return std::uint64_t{0}; }, 20, 4);
  CHECK_EQ(empty.task_count(), 0u);
}

TEST(parallel_io_errors_from_tasks_propagate) {
  harness::TempDir dir;
  const auto data = harness::pattern(1u << 20, 17);
  const std::string path = make_file(dir, data);
  File ro = File::open(path, File::Mode::kRead);
  ThreadPool pool(3);
  std::vector<WriteRequest> reqs;
  for (std::size_t i = 0; i < 64; ++i) reqs.push_back({i * 16384, 16384, data.data() + i * 16384});
  try {
    ckptio::write_ranges(ro, reqs, pool, 16384);
    CHECK(false);
  } catch (const ckptio::IoError& e) {
    CHECK_EQ(e.code(), EBADF);
    CHECK_EQ(e.path(), path);
  }
  // An error raised by one read task reaches the caller with its type intact.
  class FailingSource final : public ckptio::ByteSource {
   public:
    std::uint64_t size() const override { return 1u << 20; }
    const std::string& name() const override { return name_; }
    void read_exact(void*, std::size_t, std::uint64_t offset) const override {
      if (offset >= (1u << 19)) throw ckptio::IoError(EIO, "pread", name_);
    }

   private:
    std::string name_ = "<failing>";
  } failing;
  std::vector<std::uint8_t> buf(1u << 20);
  try {
    ckptio::read_ranges(failing, {{0, buf.size(), buf.data()}}, pool, 4096);
    CHECK(false);
  } catch (const ckptio::IoError& e) {
    CHECK_EQ(e.code(), EIO);
  }
}

TEST(read_ranges_of_a_cold_file_use_more_readers_with_the_same_bytes) {
  harness::TempDir dir;
  const auto data = harness::pattern((5u << 20) + 17, 21);
  const std::string path = make_file(dir, data);
  if (!harness::evict(path)) return;  // a file system that keeps every page (tmpfs)
  File f = File::open(path, File::Mode::kRead);
  ThreadPool pool(2);
  std::vector<std::uint8_t> whole(data.size(), 0xEE);
  std::vector<std::uint8_t> tail(4099, 0xEE);
  ckptio::read_ranges(f, {{0, data.size(), whole.data()}, {data.size() - 4099, 4099, tail.data()}},
                      pool, 64 << 10);
  CHECK(whole == data);
  CHECK(std::memcmp(tail.data(), data.data() + data.size() - 4099, 4099) == 0);
  CHECK(harness::page_cached(path, data.size() / 2));
}

TEST(read_ranges_of_a_cold_file_into_fresh_memory_fill_every_destination) {
  // Cold, one more thread faults in the destinations ahead of the readers: a fresh mapping
  // (never touched) gets every byte, unaligned destinations and ones sharing pages included.
  harness::TempDir dir;
  const auto data = harness::pattern((24u << 20) + 333, 41);
  const std::string path = make_file(dir, data);
  if (!harness::evict(path)) return;  // a file system that keeps every page (tmpfs)
  const std::size_t size = data.size() + (1u << 20);
  void* map = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(map != MAP_FAILED);
  auto* fresh = static_cast<std::uint8_t*>(map);
  File f = File::open(path, File::Mode::kRead);
  ThreadPool pool(2);
  std::vector<ReadRequest> reqs;
  std::uint64_t at = 0;
  std::size_t out = 5;  // unaligned, and 5 bytes apart: neighbours share pages
  for (std::uint64_t len : {std::uint64_t{1000}, std::uint64_t{3} << 20, std::uint64_t{77},
                            std::uint64_t{12} << 20}) {
    reqs.push_back({at, len, fresh + out});
    at += len + 4096;
    out += static_cast<std::size_t>(len) + 5;
  }
  reqs.push_back({at, data.size() - at, fresh + out});
  std::vector<std::uint32_t> crcs;
  ckptio::read_ranges(f, reqs, pool, 1 << 20, ckptio::crc32_available() ? &crcs : nullptr);
  bool same = true;
  for (const ReadRequest& r : reqs) {
    same = same && std::memcmp(r.dst, data.data() + r.offset, static_cast<std::size_t>(r.length)) == 0;
  }
  CHECK(same);
  if (ckptio::crc32_available()) {
    CHECK_EQ(crcs.back(), ckptio::crc32_update(0, data.data() + reqs.back().offset,
                                               static_cast<std::size_t>(reqs.back().length)));
  }
  ::munmap(map, size);
}

namespace {

// Small records as a torch archive holds them: payloads in file order, a few hundred bytes to
// 40 KiB apart, some adjacent, one out of order, one empty.
std::vector<ReadRequest> record_like_requests(std::vector<std::uint8_t>& out, std::uint64_t size) {
  Lcg rng{7};
  std::vector<ReadRequest> reqs;
  std::uint64_t at = 100;
  std::size_t used = 0;
  while (true) {
    const std::uint64_t len = 1 + rng.next(9000);
    const std::uint64_t kind = rng.next(4);  // adjacent, near (twice as often), far
    const std::uint64_t gap = kind == 0 ? 0 : kind < 3 ? rng.next(6000) : 20000 + rng.next(20000);
    if (at + gap + len > size || used + len > out.size()) break;
    reqs.push_back({at + gap, len, out.data() + used});
    at += gap + len;
    used += static_cast<std::size_t>(len);
  }
  reqs.push_back({7, 0, nullptr});
  reqs.push_back({50, 30, out.data() + used});  // behind the previous one: a run of its own
  return reqs;
}

}  // namespace

TEST(read_ranges_of_cold_small_records_read_runs_at_once_with_the_same_bytes_and_crcs) {
  // Cold, requests a few KiB apart are read as runs by one vectored read each (the gaps into
  // scratch memory); requests farther apart, or behind the previous one, on their own. Every
  // destination gets its bytes and every CRC is the one of its bytes.
  const auto data = harness::pattern(8u << 20, 31);
  std::vector<std::uint8_t> out(8u << 20, 0xEE);
  const std::vector<ReadRequest> reqs = record_like_requests(out, data.size());
  CHECK(reqs.size() > 300);
  for (std::size_t threads : {1, 3}) {
    ThreadPool pool(threads);
    for (std::size_t chunk : {std::size_t{64} << 10, std::size_t{8} << 20}) {
      std::fill(out.begin(), out.end(), 0xEE);
      CountingSource cold(data, /*cold=*/true);
      std::vector<std::uint32_t> crcs;
      ckptio::read_ranges(cold, reqs, pool, chunk, ckptio::crc32_available() ? &crcs : nullptr);
      bool same = true;
      for (const ReadRequest& r : reqs) {
        same = same && (r.length == 0 ||
                        std::memcmp(r.dst, data.data() + r.offset, static_cast<std::size_t>(r.length)) == 0);
      }
      CHECK(same);
      CHECK(cold.vectored.load() > 0);
      CHECK(cold.vectored.load() + cold.reads.load() < static_cast<int>(reqs.size()) / 2);
      if (ckptio::crc32_available()) {
        bool crcs_ok = crcs.size() == reqs.size();
        for (std::size_t i = 0; crcs_ok && i < reqs.size(); ++i) {
          crcs_ok = crcs[i] == (reqs[i].length == 0 ? 0u
                                : ckptio::crc32_update(0, data.data() + reqs[i].offset,
                                                       static_cast<std::size_t>(reqs[i].length)));
        }
        CHECK(crcs_ok);
      }
    }
  }
}

TEST(file_read_vectored_fills_every_buffer_and_refuses_a_short_file) {
  harness::TempDir dir;
  const auto data = harness::pattern(100000, 5);
  File f = File::open(make_file(dir, data), File::Mode::kRead);
  std::vector<std::uint8_t> a(10), b(0), c(70000), gap(5);
  struct iovec iov[] = {{a.data(), a.size()}, {b.data(), 0}, {gap.data(), gap.size()},
                        {c.data(), c.size()}};
  f.read_vectored(iov, 4, 1234);
  CHECK(std::memcmp(a.data(), data.data() + 1234, a.size()) == 0);
  CHECK(std::memcmp(c.data(), data.data() + 1234 + 15, c.size()) == 0);
  struct iovec past[] = {{c.data(), c.size()}};
  std::string message;
  try {
    f.read_vectored(past, 1, 50000);
  } catch (const ckptio::FormatError& e) {
    message = e.what();
  }
  CHECK(message.find("truncated") != std::string::npos);
}
