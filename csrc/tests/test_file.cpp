#include <fcntl.h>
#include <limits.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "ckptio/byte_source.hpp"
#include "ckptio/errors.hpp"
#include "ckptio/file.hpp"
#include "harness.hpp"

using ckptio::File;

namespace {

std::vector<std::uint8_t> read_all(const std::string& path) {
  File f = File::open(path, File::Mode::kRead);
  std::vector<std::uint8_t> out(static_cast<std::size_t>(f.size()));
  f.read_exact(out.data(), out.size(), 0);
  return out;
}

}  // namespace

TEST(file_write_read_round_trip) {
  harness::TempDir dir;
  const std::string path = dir.file("a.bin");
  const auto data = harness::pattern(100000, 1);
  {
    File f = File::open(path, File::Mode::kCreate);
    CHECK(f.is_open());
    f.write_all(data.data(), 60000, 0);
    f.write_all(data.data() + 60000, data.size() - 60000, 60000);
    f.sync();
    f.close();
    CHECK(!f.is_open());
    f.close();  // closing twice is harmless
  }
  File f = File::open(path, File::Mode::kRead);
  CHECK_EQ(f.size(), data.size());
  CHECK_EQ(f.name(), path);
  std::vector<std::uint8_t> back(data.size());
  f.read_exact(back.data(), back.size(), 0);
  CHECK(back == data);
  std::vector<std::uint8_t> middle(777);
  f.read_exact(middle.data(), middle.size(), 12345);
  CHECK(std::memcmp(middle.data(), data.data() + 12345, middle.size()) == 0);
  f.read_exact(nullptr, 0, 1u << 30);  // an empty read anywhere is fine
}

TEST(file_write_at_offset_leaves_hole_of_zeros) {
  harness::TempDir dir;
  const std::string path = dir.file("hole.bin");
  File f = File::open(path, File::Mode::kCreate);
  const char msg[] = "tail";
  f.write_all(msg, 4, 10000);
  CHECK_EQ(f.size(), 10004u);
  f.close();
  const auto back = read_all(path);
  CHECK_EQ(back.size(), 10004u);
  CHECK(back[0] == 0 && back[9999] == 0);
  CHECK(std::memcmp(back.data() + 10000, "tail", 4) == 0);
}

TEST(file_read_past_end_is_truncation_format_error) {
  harness::TempDir dir;
  const std::string path = dir.file("short.bin");
  {
    File f = File::open(path, File::Mode::kCreate);
    f.write_all("0123456789", 10, 0);
  }
  File f = File::open(path, File::Mode::kRead);
  char buf[32];
  CHECK_THROWS(f.read_exact(buf, 11, 0), ckptio::FormatError);
  CHECK_THROWS(f.read_exact(buf, 1, 10), ckptio::FormatError);
  CHECK_THROWS(f.read_exact(buf, 4, UINT64_MAX - 1), ckptio::FormatError);
  try {
    f.read_exact(buf, 20, 5);
    CHECK(false);
  } catch (const ckptio::FormatError& e) {
    const std::string what = e.what();
    CHECK_EQ(what, path + ": truncated: wanted 20 bytes at offset 5, file has 10 bytes");
  }
  f.read_exact(buf, 10, 0);
  CHECK(std::memcmp(buf, "0123456789", 10) == 0);
}

TEST(file_open_directory_is_eisdir) {
  harness::TempDir dir;
  for (File::Mode mode : {File::Mode::kRead, File::Mode::kReadWrite, File::Mode::kCreate}) {
    try {
      File::open(dir.path(), mode);
      CHECK(false);
    } catch (const ckptio::IoError& e) {
      CHECK_EQ(e.code(), EISDIR);
      CHECK_EQ(e.path(), dir.path());
    }
  }
}

TEST(file_open_missing_is_enoent) {
  harness::TempDir dir;
  const std::string path = dir.file("missing.bin");
  for (File::Mode mode : {File::Mode::kRead, File::Mode::kReadWrite}) {
    try {
      File::open(path, mode);
      CHECK(false);
    } catch (const ckptio::IoError& e) {
      CHECK_EQ(e.code(), ENOENT);
      CHECK_EQ(e.path(), path);
      CHECK_EQ(std::string(e.what()), "open '" + path + "': No such file or directory");
    }
  }
  CHECK_THROWS(File::open(dir.file("no/such/dir"), File::Mode::kCreate), ckptio::IoError);
}

TEST(file_open_sets_cloexec) {
  harness::TempDir dir;
  File f = File::open(dir.file("x"), File::Mode::kCreate);
  CHECK((::fcntl(f.fd(), F_GETFD) & FD_CLOEXEC) != 0);
  File g = File::adopt(f.fd(), "adopted");
  CHECK((::fcntl(g.fd(), F_GETFD) & FD_CLOEXEC) != 0);
}

TEST(file_writev_many_buffers_beyond_iov_max) {
  harness::TempDir dir;
  const std::string path = dir.file("v.bin");
  constexpr int kCount = 3 * IOV_MAX + 17;
  const auto data = harness::pattern(kCount * 40, 2);
  std::vector<struct iovec> iov;
  std::vector<std::uint8_t> expected;
  std::size_t at = 0;
  for (int i = 0; i < kCount; ++i) {
    const std::size_t len = static_cast<std::size_t>((i * 7) % 41);  // includes empty buffers
    iov.push_back({const_cast<std::uint8_t*>(data.data() + at), len});
    expected.insert(expected.end(), data.begin() + static_cast<long>(at),
                    data.begin() + static_cast<long>(at + len));
    at += len;
  }
  {
    File f = File::open(path, File::Mode::kCreate);
    f.write_all("X", 1, 0);
    f.writev_all(iov.data(), static_cast<int>(iov.size()), 1);
  }
  const auto back = read_all(path);
  CHECK_EQ(back.size(), expected.size() + 1);
  CHECK(back[0] == 'X');
  CHECK(std::memcmp(back.data() + 1, expected.data(), expected.size()) == 0);
}

TEST(file_writev_zero_buffers_is_noop) {
  harness::TempDir dir;
  File f = File::open(dir.file("e"), File::Mode::kCreate);
  f.writev_all(nullptr, 0, 0);
  struct iovec empty[2] = {{nullptr, 0}, {nullptr, 0}};
  f.writev_all(empty, 2, 100);
  CHECK_EQ(f.size(), 0u);
}

TEST(file_preallocate_and_truncate) {
  harness::TempDir dir;
  File f = File::open(dir.file("p.bin"), File::Mode::kCreate);
  f.preallocate(1 << 20);
  CHECK_EQ(f.size(), 1u << 20);
  f.preallocate(1000);  // never shrinks
  CHECK_EQ(f.size(), 1u << 20);
  f.preallocate(0);
  CHECK_EQ(f.size(), 1u << 20);
  f.preallocate(3 << 20, 1 << 20);  // only the new range
  CHECK_EQ(f.size(), 3u << 20);
  f.preallocate(2 << 20, 3 << 20);  // nothing new
  CHECK_EQ(f.size(), 3u << 20);
  f.truncate(5);
  CHECK_EQ(f.size(), 5u);
  CHECK_THROWS(f.preallocate(UINT64_MAX), ckptio::IoError);
}

TEST(file_write_on_read_only_is_ioerror) {
  harness::TempDir dir;
  const std::string path = dir.file("ro.bin");
  { File::open(path, File::Mode::kCreate).write_all("abc", 3, 0); }
  File f = File::open(path, File::Mode::kRead);
  try {
    f.write_all("z", 1, 0);
    CHECK(false);
  } catch (const ckptio::IoError& e) {
    CHECK_EQ(e.code(), EBADF);
  }
}

TEST(file_adopt_keeps_working_after_original_closes) {
  harness::TempDir dir;
  const std::string path = dir.file("adopt.bin");
  { File::open(path, File::Mode::kCreate).write_all("hello", 5, 0); }
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  CHECK(fd >= 0);
  File f = File::adopt(fd, "my stream");
  ::close(fd);
  char buf[5];
  f.read_exact(buf, 5, 0);
  CHECK(std::memcmp(buf, "hello", 5) == 0);
  CHECK_EQ(f.name(), std::string("my stream"));
  CHECK_THROWS(File::adopt(-1, "bad"), ckptio::IoError);
}

TEST(file_move_transfers_ownership) {
  harness::TempDir dir;
  File a = File::open(dir.file("m"), File::Mode::kCreate);
  const int fd = a.fd();
  File b(std::move(a));
  CHECK(!a.is_open());  // NOLINT(bugprone-use-after-move): documented moved-from state
  CHECK_EQ(b.fd(), fd);
  File c;
  c = std::move(b);
  CHECK_EQ(c.fd(), fd);
  CHECK(!b.is_open());  // NOLINT(bugprone-use-after-move)
}

TEST(file_read_write_mode) {
  harness::TempDir dir;
  const std::string path = dir.file("rw.bin");
  { File::open(path, File::Mode::kCreate).write_all("aaaa", 4, 0); }
  File f = File::open(path, File::Mode::kReadWrite);
  f.write_all("bb", 2, 1);
  char buf[4];
  f.read_exact(buf, 4, 0);
  CHECK(std::memcmp(buf, "abba", 4) == 0);
}

TEST(file_sync_directory) {
  harness::TempDir dir;
  ckptio::sync_directory(dir.path());
  try {
    ckptio::sync_directory(dir.file("missing"));
    CHECK(false);
  } catch (const ckptio::IoError& e) {
    CHECK_EQ(e.code(), ENOENT);
  }
  { File::open(dir.file("f"), File::Mode::kCreate); }
  CHECK_THROWS(ckptio::sync_directory(dir.file("f")), ckptio::IoError);
}

TEST(memory_source_bounds) {
  const auto data = harness::pattern(100, 3);
  ckptio::MemorySource src(data.data(), data.size(), "<buf>");
  CHECK_EQ(src.size(), 100u);
  std::uint8_t buf[100];
  src.read_exact(buf, 100, 0);
  CHECK(std::memcmp(buf, data.data(), 100) == 0);
  src.read_exact(buf, 0, 100);
  CHECK_THROWS(src.read_exact(buf, 1, 100), ckptio::FormatError);
  CHECK_THROWS(src.read_exact(buf, 2, UINT64_MAX), ckptio::FormatError);
  CHECK_THROWS(src.read_exact(buf, 50, 51), ckptio::FormatError);
  ckptio::MemorySource empty(nullptr, 0, "<empty>");
  CHECK_THROWS(empty.read_exact(buf, 1, 0), ckptio::FormatError);
}

TEST(file_exchange_paths) {
  harness::TempDir dir;
  {
    File a = File::open(dir.file("a"), File::Mode::kCreate);
    a.write_all("A", 1, 0);
    File b = File::open(dir.file("b"), File::Mode::kCreate);
    b.write_all("BB", 2, 0);
  }
  if (ckptio::exchange_paths(dir.file("a"), dir.file("b"))) {
    CHECK_EQ(File::open(dir.file("a"), File::Mode::kRead).size(), 2u);
    CHECK_EQ(File::open(dir.file("b"), File::Mode::kRead).size(), 1u);
    // A missing path is an error, not "unsupported".
    CHECK_THROWS(ckptio::exchange_paths(dir.file("a"), dir.file("missing")), ckptio::IoError);
  }
}


TEST(file_cached_tells_a_page_out_of_the_cache_without_reading_it) {
  harness::TempDir dir;
  const auto data = harness::pattern(4u << 20, 11);
  const std::string path = dir.file("cold.bin");
  {
    File f = File::open(path, File::Mode::kCreate);
    f.write_all(data.data(), data.size(), 0);
  }
  if (!harness::evict(path)) return;  // a file system that keeps every page (tmpfs)
  File f = File::open(path, File::Mode::kRead);
  const std::uint64_t middle = data.size() / 2;
  CHECK(!f.cached(middle));
  // With cachestat the question reads nothing, so asking again gets the same answer (the
  // preadv2 fallback starts a readahead that may have finished by then).
  struct {
    std::uint64_t off, len;
  } range{middle, 1};
  std::uint64_t stat[5] = {};
  if (::syscall(451 /* cachestat */, f.fd(), &range, stat, 0) == 0) {
    for (int i = 0; i < 100; ++i) CHECK(!f.cached(middle));
    CHECK(!harness::page_cached(path, middle));
  }
  std::vector<std::uint8_t> page(4096);
  f.read_exact(page.data(), page.size(), middle);
  CHECK(f.cached(middle));
  CHECK(f.cached(data.size() + 100));  // past the end: nothing to wait for
}
