// Runs every registered test (or those whose name contains argv[1]).
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <string>
#include <system_error>

#include "harness.hpp"

namespace harness {
namespace {
const char* g_current = "";
int g_failures_in_test = 0;
}  // namespace

std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

void fail(const char* file, int line, const std::string& message) {
  ++g_failures_in_test;
  std::fprintf(stderr, "%s:%d: FAIL [%s] %s\n", file, line, g_current, message.c_str());
}

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string templ = std::string(base != nullptr && *base != '\0' ? base : "/tmp") +
                      "/ckptio-test-XXXXXX";
  if (::mkdtemp(templ.data()) == nullptr) {
    throw std::system_error(errno, std::generic_category(), "mkdtemp " + templ);
  }
  path_ = templ;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::vector<std::uint8_t> pattern(std::size_t n, std::uint64_t seed) {
  std::vector<std::uint8_t> out(n);
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (std::size_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    out[i] = static_cast<std::uint8_t>(x >> 24);
  }
  return out;
}

bool page_cached(const std::string& path, std::uint64_t offset) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::system_error(errno, std::generic_category(), "open " + path);
  struct stat st {};
  const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  bool resident = true;  // cannot tell: the caller's cold test is skipped
  if (::fstat(fd, &st) == 0 && offset < static_cast<std::uint64_t>(st.st_size)) {
    const std::uint64_t start = offset / page * page;
    void* map = ::mmap(nullptr, page, PROT_READ, MAP_SHARED, fd, static_cast<off_t>(start));
    if (map != MAP_FAILED) {
      unsigned char vec = 0;
      if (::mincore(map, page, &vec) == 0) resident = (vec & 1) != 0;
      ::munmap(map, page);
    }
  }
  ::close(fd);
  return resident;
}

bool evict(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::system_error(errno, std::generic_category(), "open " + path);
  struct stat st {};
  const bool sized = ::fstat(fd, &st) == 0;
  (void)::fdatasync(fd);
  (void)::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
  return sized && !page_cached(path, static_cast<std::uint64_t>(st.st_size) / 2);
}

}  // namespace harness

int main(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : nullptr;
  int passed = 0;
  int failed = 0;
  for (const harness::TestCase& t : harness::registry()) {
    if (filter != nullptr && std::strstr(t.name, filter) == nullptr) continue;
    harness::g_current = t.name;
    harness::g_failures_in_test = 0;
    const auto start = std::chrono::steady_clock::now();
    try {
      t.fn();
    } catch (const std::exception& e) {
      harness::fail("<test>", 0, std::string("uncaught exception: ") + e.what());
    } catch (...) {
      harness::fail("<test>", 0, "uncaught non-std exception");
    }
    const double ms = std::chrono::duration<double, std::milli>(
                          std::chrono::steady_clock::now() - start)
                          .count();
    if (harness::g_failures_in_test == 0) {
      ++passed;
      std::printf("ok   %s (%.0f ms)\n", t.name, ms);
    } else {
      ++failed;
      std::printf("FAIL %s (%.0f ms)\n", t.name, ms);
    }
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
