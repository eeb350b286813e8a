#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "ckptio/errors.hpp"
#include "ckptio/file.hpp"
#include "ckptio/mmap.hpp"
#include "harness.hpp"

using ckptio::File;
using ckptio::Mapping;

namespace {

std::string make_file(const harness::TempDir& dir, const std::vector<std::uint8_t>& data) {
  const std::string path = dir.file("m.bin");
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

}  // namespace

TEST(mmap_private_writes_stay_in_process) {
  harness::TempDir dir;
  const auto data = harness::pattern(10000, 21);
  const std::string path = make_file(dir, data);
  {
    File f = File::open(path, File::Mode::kRead);
    auto m = Mapping::map_file(f, false);
    f.close();  // the mapping outlives the descriptor
    CHECK_EQ(m->size(), data.size());
    CHECK(!m->shared());
    CHECK_EQ(m->name(), path);
    CHECK(std::memcmp(m->data(), data.data(), data.size()) == 0);
    m->data()[0] ^= 0xFF;
    m->data()[9999] ^= 0xFF;
    CHECK(m->data()[0] == static_cast<std::uint8_t>(data[0] ^ 0xFF));
    m->will_need(0, m->size());
  }
  CHECK(read_all(path) == data);
}

TEST(mmap_shared_writes_reach_file) {
  harness::TempDir dir;
  const auto data = harness::pattern(10000, 22);
  const std::string path = make_file(dir, data);
  {
    File f = File::open(path, File::Mode::kReadWrite);
    auto m = Mapping::map_file(f, true);
    CHECK(m->shared());
    std::memcpy(m->data() + 5000, "shared!", 7);
  }
  const auto back = read_all(path);
  CHECK(std::memcmp(back.data() + 5000, "shared!", 7) == 0);
  CHECK(std::memcmp(back.data(), data.data(), 5000) == 0);
}

TEST(mmap_shared_needs_writable_descriptor) {
  harness::TempDir dir;
  const std::string path = make_file(dir, harness::pattern(100, 23));
  File f = File::open(path, File::Mode::kRead);
  try {
    Mapping::map_file(f, true);
    CHECK(false);
  } catch (const ckptio::IoError& e) {
    CHECK_EQ(e.code(), EACCES);
  }
}

TEST(mmap_empty_file_maps_to_nothing) {
  harness::TempDir dir;
  const std::string path = dir.file("empty.bin");
  { File::open(path, File::Mode::kCreate); }
  File f = File::open(path, File::Mode::kRead);
  for (bool shared : {false, true}) {
    File g = File::open(path, shared ? File::Mode::kReadWrite : File::Mode::kRead);
    auto m = Mapping::map_file(g, shared);
    CHECK(m->data() == nullptr);
    CHECK_EQ(m->size(), 0u);
    m->will_need(0, 100);
  }
}

TEST(mmap_will_need_clamps_any_range) {
  harness::TempDir dir;
  const std::string path = make_file(dir, harness::pattern(3 * 4096 + 5, 24));
  File f = File::open(path, File::Mode::kRead);
  auto m = Mapping::map_file(f, false);
  m->will_need(0, 0);
  m->will_need(1, 1);
  m->will_need(4097, UINT64_MAX);
  m->will_need(UINT64_MAX, UINT64_MAX);
  m->will_need(m->size() - 1, 10);
  m->will_need(m->size(), 10);
  CHECK(m->data() != nullptr);
}
