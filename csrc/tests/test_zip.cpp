#include <fcntl.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "ckptio/archive_writer.hpp"
#include "ckptio/byte_source.hpp"
#include "ckptio/checksum.hpp"
#include "ckptio/errors.hpp"
#include "ckptio/file.hpp"
#include "ckptio/thread_pool.hpp"
#include "ckptio/zip.hpp"
#include "harness.hpp"

using ckptio::ArchiveLayout;
using ckptio::RecordSpec;
using ckptio::ZipDirectory;
using Bytes = std::vector<std::uint8_t>;

namespace {

constexpr std::uint64_t k4G = 0xFFFFFFFFull;

std::uint16_t le16(const std::uint8_t* p) { return static_cast<std::uint16_t>(p[0] | (p[1] << 8)); }
std::uint32_t le32(const std::uint8_t* p) {
  return static_cast<std::uint32_t>(le16(p)) | (static_cast<std::uint32_t>(le16(p + 2)) << 16);
}
std::uint64_t le64(const std::uint8_t* p) {
  return static_cast<std::uint64_t>(le32(p)) | (static_cast<std::uint64_t>(le32(p + 4)) << 32);
}
void set16(Bytes& b, std::size_t at, std::uint16_t v) {
  b[at] = static_cast<std::uint8_t>(v);
  b[at + 1] = static_cast<std::uint8_t>(v >> 8);
}
void set32(Bytes& b, std::size_t at, std::uint32_t v) {
  set16(b, at, static_cast<std::uint16_t>(v));
  set16(b, at + 2, static_cast<std::uint16_t>(v >> 16));
}
void set64(Bytes& b, std::size_t at, std::uint64_t v) {
  set32(b, at, static_cast<std::uint32_t>(v));
  set32(b, at + 4, static_cast<std::uint32_t>(v >> 32));
}

struct Record {
  std::string name;
  Bytes payload;
  std::uint32_t alignment;
};

std::vector<RecordSpec> specs_of(const std::vector<Record>& records) {
  std::vector<RecordSpec> specs;
  for (const auto& r : records) specs.push_back({r.name, r.payload.size(), r.alignment});
  return specs;
}

// Assembles an archive in memory exactly as plan_archive lays it out.
Bytes build(const std::string& archive, const std::vector<Record>& records, bool crc = true) {
  const ArchiveLayout layout = ckptio::plan_archive(archive, specs_of(records));
  Bytes out(static_cast<std::size_t>(layout.total_size), 0xAB);
  std::vector<std::uint32_t> crcs;
  for (std::size_t i = 0; i < records.size(); ++i) {
    const auto& rec = layout.records[i];
    const auto& payload = records[i].payload;
    const std::uint32_t c =
        crc && ckptio::crc32_available() ? ckptio::crc32_update(0, payload.data(), payload.size()) : 0;
    crcs.push_back(c);
    const Bytes header = ckptio::local_header_bytes(rec);
    std::copy(header.begin(), header.end(), out.begin() + static_cast<long>(rec.header_offset));
    std::copy(payload.begin(), payload.end(), out.begin() + static_cast<long>(rec.data_offset));
    const Bytes d = ckptio::data_descriptor(rec, c);
    CHECK_EQ(d.size(), rec.descriptor_size);
    std::copy(d.begin(), d.end(), out.begin() + static_cast<long>(rec.descriptor_offset));
  }
  const Bytes cd = ckptio::central_directory(layout, crcs);
  CHECK_EQ(layout.central_directory_offset + cd.size(), layout.total_size);
  std::copy(cd.begin(), cd.end(), out.begin() + static_cast<long>(layout.central_directory_offset));
  return out;
}

// Writes `records` through an ArchiveWriter; records whose index is in `reserved` are
// reserved and then written by the caller, as a device payload is. Returns the CRCs; with
// options.file_crc32, the whole file's goes to *file_crc.
std::vector<std::uint32_t> write_with(const ckptio::File& f, const std::string& archive,
                                      const std::vector<Record>& records,
                                      const ckptio::WriteOptions& options,
                                      const std::vector<std::size_t>& reserved = {},
                                      std::uint32_t* file_crc = nullptr) {
  ckptio::ArchiveWriter writer(f, archive, options);
  for (std::size_t i = 0; i < records.size(); ++i) {
    const auto& r = records[i];
    const bool later = std::find(reserved.begin(), reserved.end(), i) != reserved.end();
    const std::size_t index = later ? writer.reserve(r.name, r.alignment, r.payload.size())
                                    : writer.add(r.name, r.alignment, r.payload.data(), r.payload.size());
    CHECK_EQ(index, i);
  }
  std::vector<std::pair<std::size_t, std::uint32_t>> crcs;
  for (std::size_t i : reserved) {
    const auto& payload = records[i].payload;
    f.write_all(payload.data(), payload.size(), writer.data_offset(i));
    if (options.crc32 || options.file_crc32) {
      crcs.emplace_back(i, ckptio::crc32_update(0, payload.data(), payload.size()));
    }
  }
  std::vector<std::uint32_t> out = writer.finish(crcs);
  if (options.file_crc32) *file_crc = writer.file_crc32();
  return out;
}

ZipDirectory parse(const Bytes& bytes) {
  ckptio::MemorySource src(bytes.data(), bytes.size(), "test.pt");
  return ckptio::read_zip_directory(src);
}

std::string format_error_of(const Bytes& bytes) {
  try {
    parse(bytes);
  } catch (const ckptio::FormatError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("WRONG TYPE: ") + e.what();
  }
  return "NO ERROR";
}

#define CHECK_FORMAT_ERROR(bytes, substring)                                       \
  do {                                                                             \
    const std::string harness_msg_ = format_error_of(bytes);                       \
    if (harness_msg_.rfind("test.pt: ", 0) != 0 ||                                 \
        harness_msg_.find(substring) == std::string::npos) {                       \
      ::harness::fail(__FILE__, __LINE__,                                          \
                      std::string("expected FormatError containing '") + (substring) + \
                          "', got: " + harness_msg_);                              \
    }                                                                              \
  } while (0)

void replace_all(Bytes& b, const std::string& from, const std::string& to) {
  CHECK_EQ(from.size(), to.size());
  auto it = b.begin();
  int count = 0;
  while ((it = std::search(it, b.end(), from.begin(), from.end())) != b.end()) {
    std::copy(to.begin(), to.end(), it);
    it += static_cast<long>(from.size());
    ++count;
  }
  CHECK(count > 0);
}

std::vector<Record> small_records(std::uint32_t align = 64) {
  return {{"data.pkl", harness::pattern(37, 1), align},
          {".format_version", {'1'}, align},
          {"data/0", harness::pattern(1000, 2), 4096},
          {"data/1", {}, 4096},
          {"data/2", harness::pattern(4099, 3), 4096},
          {"version", {'3', '\n'}, align}};
}

// Offsets of the end records of an archive written by plan_archive/central_directory.
struct Ends {
  std::size_t eocd, locator, zip64;
};
Ends ends_of(const Bytes& b) {
  const std::size_t eocd = b.size() - 22;
  return {eocd, eocd - 20, eocd - 20 - 56};
}

// A file of `size` zero bytes with some planned pieces laid over it: lets zip64 layouts be
// parsed without writing 4 GiB.
class SparseSource final : public ckptio::ByteSource {
 public:
  SparseSource(std::uint64_t size, std::map<std::uint64_t, Bytes> pieces)
      : size_(size), pieces_(std::move(pieces)) {}
  std::uint64_t size() const override { return size_; }
  const std::string& name() const override { return name_; }
  void read_exact(void* dst, std::size_t n, std::uint64_t offset) const override {
    if (offset > size_ || n > size_ - offset) throw ckptio::FormatError(name_ + ": truncated");
    auto* out = static_cast<std::uint8_t*>(dst);
    std::memset(out, 0, n);
    for (const auto& [at, bytes] : pieces_) {
      const std::uint64_t lo = std::max(at, offset);
      const std::uint64_t hi = std::min(at + bytes.size(), offset + n);
      if (lo < hi) std::memcpy(out + (lo - offset), bytes.data() + (lo - at), static_cast<std::size_t>(hi - lo));
    }
  }

 private:
  std::uint64_t size_;
  std::map<std::uint64_t, Bytes> pieces_;
  std::string name_ = "<sparse>";
};

// An archive written by CPython's zipfile (ZIP_STORED, comment "a comment PK"): plain local
// headers with sizes, no padding, no data descriptors, no zip64 records.
const Bytes kPythonZip = {
    0x50, 0x4b, 0x03, 0x04, 0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xb5, 0x7c, 0x5d, 0xf2, 0x91,
    0x02, 0xc5, 0x06, 0x00, 0x00, 0x00, 0x06, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x61, 0x72,
    0x63, 0x68, 0x69, 0x76, 0x65, 0x2f, 0x64, 0x61, 0x74, 0x61, 0x2e, 0x70, 0x6b, 0x6c, 0x80, 0x02,
    0x7d, 0x71, 0x00, 0x2e, 0x50, 0x4b, 0x03, 0x04, 0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xb5,
    0x7c, 0x5d, 0x88, 0xe2, 0xce, 0xce, 0x10, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x0e, 0x00,
    0x00, 0x00, 0x61, 0x72, 0x63, 0x68, 0x69, 0x76, 0x65, 0x2f, 0x64, 0x61, 0x74, 0x61, 0x2f, 0x30,
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
    0x50, 0x4b, 0x03, 0x04, 0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xb5, 0x7c, 0x5d, 0xd1, 0x9e,
    0x67, 0x55, 0x02, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x0f, 0x00, 0x00, 0x00, 0x61, 0x72,
    0x63, 0x68, 0x69, 0x76, 0x65, 0x2f, 0x76, 0x65, 0x72, 0x73, 0x69, 0x6f, 0x6e, 0x33, 0x0a, 0x50,
    0x4b, 0x01, 0x02, 0x14, 0x03, 0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xb5, 0x7c, 0x5d, 0xf2,
    0x91, 0x02, 0xc5, 0x06, 0x00, 0x00, 0x00, 0x06, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0x01, 0x00, 0x00, 0x00, 0x00, 0x61, 0x72, 0x63,
    0x68, 0x69, 0x76, 0x65, 0x2f, 0x64, 0x61, 0x74, 0x61, 0x2e, 0x70, 0x6b, 0x6c, 0x50, 0x4b, 0x01,
    0x02, 0x14, 0x03, 0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xb5, 0x7c, 0x5d, 0x88, 0xe2, 0xce,
    0xce, 0x10, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x0e, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0x01, 0x34, 0x00, 0x00, 0x00, 0x61, 0x72, 0x63, 0x68, 0x69,
    0x76, 0x65, 0x2f, 0x64, 0x61, 0x74, 0x61, 0x2f, 0x30, 0x50, 0x4b, 0x01, 0x02, 0x14, 0x03, 0x14,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xb5, 0x7c, 0x5d, 0xd1, 0x9e, 0x67, 0x55, 0x02, 0x00, 0x00,
    0x00, 0x02, 0x00, 0x00, 0x00, 0x0f, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x80, 0x01, 0x70, 0x00, 0x00, 0x00, 0x61, 0x72, 0x63, 0x68, 0x69, 0x76, 0x65, 0x2f, 0x76,
    0x65, 0x72, 0x73, 0x69, 0x6f, 0x6e, 0x50, 0x4b, 0x05, 0x06, 0x00, 0x00, 0x00, 0x00, 0x03, 0x00,
    0x03, 0x00, 0xb7, 0x00, 0x00, 0x00, 0x9f, 0x00, 0x00, 0x00, 0x0c, 0x00, 0x61, 0x20, 0x63, 0x6f,
    0x6d, 0x6d, 0x65, 0x6e, 0x74, 0x20, 0x50, 0x4b};

void check_python_zip(const Bytes& bytes) {
  const ZipDirectory dir = parse(bytes);
  CHECK_EQ(dir.prefix, std::string("archive/"));
  CHECK_EQ(dir.entries.size(), 3u);
  if (dir.entries.size() != 3) return;
  CHECK_EQ(dir.entries[0].name, std::string("archive/data.pkl"));
  CHECK_EQ(dir.entries[0].data_offset, 46u);
  CHECK_EQ(dir.entries[0].size, 6u);
  CHECK_EQ(dir.entries[1].name, std::string("archive/data/0"));
  CHECK_EQ(dir.entries[1].size, 16u);
  CHECK_EQ(dir.entries[1].crc32, 0xcecee288u);
  CHECK_EQ(dir.entries[2].name, std::string("archive/version"));
  CHECK(std::memcmp(bytes.data() + dir.entries[2].data_offset, "3\n", 2) == 0);
  for (std::uint8_t i = 0; i < 16; ++i) CHECK(bytes[dir.entries[1].data_offset + i] == i);
  CHECK_EQ(dir.central_directory_offset, 0x9fu);
}

}  // namespace

TEST(zip_archive_writer_then_read_round_trips) {
  harness::TempDir dir;
  const auto records = small_records();
  const ArchiveLayout layout = ckptio::plan_archive("ckpt", specs_of(records));
  for (int mode = 0; mode < 4; ++mode) {
    // CRCs recorded or not, the whole file's CRC-32 asked for or not.
    const bool crc = mode & 1;
    const bool file_crc = mode & 2;
    if ((crc || file_crc) && !ckptio::crc32_available()) continue;
    for (std::size_t threads : {std::size_t{1}, std::size_t{3}}) {
      // Record 1 is reserved and written by the caller; chunk_bytes of 1000 splits the larger
      // payloads into pieces and groups the small records into shared writes.
      const std::string path =
          dir.file("t" + std::to_string(threads) + "-" + std::to_string(mode) + ".pt");
      std::vector<std::uint32_t> crcs;
      std::uint32_t whole_crc = 0;
      {
        ckptio::File f = ckptio::File::open(path, ckptio::File::Mode::kCreate);
        ckptio::WriteOptions options;
        options.threads = threads;
        options.crc32 = crc;
        options.file_crc32 = file_crc;
        options.chunk_bytes = 1000;
        crcs = write_with(f, "ckpt", records, options, {1}, &whole_crc);
      }
      ckptio::File f = ckptio::File::open(path, ckptio::File::Mode::kRead);
      CHECK_EQ(f.size(), layout.total_size);
      const ZipDirectory zd = ckptio::read_zip_directory(f);
      CHECK_EQ(zd.prefix, std::string("ckpt/"));
      CHECK_EQ(zd.central_directory_offset, layout.central_directory_offset);
      CHECK_EQ(zd.entries.size(), records.size());
      if (zd.entries.size() != records.size()) continue;
      for (std::size_t i = 0; i < records.size(); ++i) {
        const auto& e = zd.entries[i];
        const auto& p = layout.records[i];
        CHECK_EQ(e.name, "ckpt/" + records[i].name);
        CHECK_EQ(e.header_offset, p.header_offset);
        CHECK_EQ(e.data_offset, p.data_offset);
        CHECK_EQ(e.size, records[i].payload.size());
        CHECK_EQ(e.uncompressed_size, records[i].payload.size());
        CHECK_EQ(e.method, 0);
        CHECK_EQ(e.data_offset % records[i].alignment, 0u);
        const std::uint32_t want = crc ? ckptio::crc32_update(0, records[i].payload.data(),
                                                              records[i].payload.size())
                                       : 0;
        CHECK_EQ(e.crc32, want);
        CHECK_EQ(crcs[i], want);
        Bytes back(records[i].payload.size());
        f.read_exact(back.data(), back.size(), e.data_offset);
        CHECK(back == records[i].payload);
      }
      // The file the writer produced is the one build() assembles from plan_archive.
      Bytes whole(static_cast<std::size_t>(f.size()));
      f.read_exact(whole.data(), whole.size(), 0);
      CHECK(whole == build("ckpt", records, crc));
      // The CRC combined from the writes is the one of the bytes on disk.
      if (file_crc) CHECK_EQ(whole_crc, ckptio::crc32_update(0, whole.data(), whole.size()));
    }
  }
}

TEST(zip_data_offsets_follow_requested_alignment) {
  for (std::uint32_t align : {1u, 2u, 3u, 8u, 63u, 64u, 4096u, 65000u, 65531u}) {
    std::vector<Record> records;
    for (int i = 0; i < 5; ++i) {
      records.push_back({"data/" + std::to_string(i), harness::pattern(static_cast<std::size_t>(i * 13), 5), align});
    }
    const Bytes bytes = build("a", records);
    const ArchiveLayout layout = ckptio::plan_archive("a", specs_of(records));
    for (const auto& rec : layout.records) {
      CHECK_EQ(rec.data_offset % align, 0u);
      CHECK_EQ(rec.data_offset, rec.header_offset + ckptio::local_header_bytes(rec).size());
    }
    const ZipDirectory zd = parse(bytes);
    CHECK_EQ(zd.entries.size(), 5u);
    for (std::size_t i = 0; i < zd.entries.size(); ++i) CHECK_EQ(zd.entries[i].data_offset % align, 0u);
  }
  CHECK_THROWS(ckptio::plan_archive("a", {{"x", 1, 0}}), ckptio::InvalidArgument);
  CHECK_THROWS(ckptio::plan_archive("a", {{"x", 1, 65536}}), ckptio::InvalidArgument);
  // "a/y" lands where (offset + 30 + 3 + 4) % 65535 == 1: 65534 pad bytes + "FB" + u16 > u16.
  CHECK_THROWS(ckptio::plan_archive("a", {{"x", 65446, 1}, {"y", 1, 65535}}), ckptio::InvalidArgument);
  CHECK_EQ(ckptio::plan_archive("a", {{"x", 65445, 1}, {"y", 1, 65535}}).records[1].data_offset % 65535, 0u);
  CHECK_THROWS(ckptio::plan_archive("", {{"x", 1, 64}}), ckptio::InvalidArgument);
  CHECK_THROWS(ckptio::plan_archive("a/b", {{"x", 1, 64}}), ckptio::InvalidArgument);
  CHECK_THROWS(ckptio::plan_archive(std::string("a\0b", 3), {{"x", 1, 64}}), ckptio::InvalidArgument);
  CHECK_EQ(parse(build("we\\ird name", {{"x", {1}, 64}})).prefix, std::string("we\\ird name/"));
  CHECK_THROWS(ckptio::plan_archive("a", {{"", 1, 64}}), ckptio::InvalidArgument);
}

TEST(zip_local_header_bytes_match_torch_rules) {
  const ArchiveLayout layout = ckptio::plan_archive("ckpt", {{"data.pkl", 37, 64}, {"data/0", 0, 64}});
  const auto& r0 = layout.records[0];
  const Bytes h = ckptio::local_header_bytes(r0);
  CHECK_EQ(r0.padding, 17u);
  CHECK_EQ(r0.local_header.size() + r0.padding, h.size());
  CHECK_EQ(le32(h.data()), 0x04034b50u);
  CHECK_EQ(le16(h.data() + 4), 0);       // version needed
  CHECK_EQ(le16(h.data() + 6), 0x0808);  // descriptor + utf-8
  for (int off = 8; off < 26; ++off) CHECK(h[static_cast<std::size_t>(off)] == 0);
  CHECK_EQ(le16(h.data() + 26), 13);     // "ckpt/data.pkl"
  CHECK(std::memcmp(h.data() + 30, "ckpt/data.pkl", 13) == 0);
  // pad = (-(0 + 30 + 13 + 0 + 4)) mod 64 = 17
  CHECK_EQ(le16(h.data() + 28), 4 + 17);
  CHECK(h[43] == 'F' && h[44] == 'B');
  CHECK_EQ(le16(h.data() + 45), 17);
  CHECK(std::all_of(h.begin() + 47, h.end(), [](std::uint8_t c) { return c == 'Z'; }));
  CHECK_EQ(r0.data_offset, 64u);
  CHECK_EQ(r0.descriptor_offset, 101u);
  CHECK_EQ(r0.descriptor_size, 16u);
  const Bytes d = ckptio::data_descriptor(r0, 0x12345678);
  CHECK_EQ(d.size(), 16u);
  CHECK_EQ(le32(d.data()), 0x08074b50u);
  CHECK_EQ(le32(d.data() + 4), 0x12345678u);
  CHECK_EQ(le32(d.data() + 8), 37u);
  CHECK_EQ(le32(d.data() + 12), 37u);

  const auto& r1 = layout.records[1];
  CHECK_EQ(r1.header_offset, 117u);
  CHECK_EQ(le16(r1.local_header.data() + 6), 0x0800);  // empty: no descriptor
  CHECK_EQ(r1.descriptor_size, 0u);
  CHECK(ckptio::data_descriptor(r1, 0).empty());
  CHECK_EQ(r1.data_offset % 64, 0u);
  CHECK_EQ(layout.central_directory_offset, r1.data_offset);

  const Bytes cd = ckptio::central_directory(layout, {0xAABBCCDD, 0});
  CHECK_EQ(cd.size(), 46u + 13 + 46 + 11 + 56 + 20 + 22);
  CHECK_EQ(le32(cd.data()), 0x02014b50u);
  CHECK_EQ(le16(cd.data() + 8), 0x0808);
  CHECK_EQ(le32(cd.data() + 16), 0xAABBCCDDu);
  CHECK_EQ(le32(cd.data() + 20), 37u);
  CHECK_EQ(le32(cd.data() + 24), 37u);
  CHECK_EQ(le16(cd.data() + 30), 0);  // no extra in the CD for small records
  const std::size_t z = 46 + 13 + 46 + 11;
  CHECK_EQ(le32(cd.data() + z), 0x06064b50u);
  CHECK_EQ(le64(cd.data() + z + 4), 44u);
  CHECK_EQ(le16(cd.data() + z + 12), 0x031E);
  CHECK_EQ(le16(cd.data() + z + 14), 45);
  CHECK_EQ(le64(cd.data() + z + 24), 2u);
  CHECK_EQ(le64(cd.data() + z + 40), 46u + 13 + 46 + 11);
  CHECK_EQ(le64(cd.data() + z + 48), layout.central_directory_offset);
  CHECK_EQ(le32(cd.data() + z + 56), 0x07064b50u);
  CHECK_EQ(le64(cd.data() + z + 64), layout.central_directory_offset + z);
  CHECK_EQ(le32(cd.data() + z + 72), 1u);
  CHECK_EQ(le32(cd.data() + z + 76), 0x06054b50u);
  CHECK_EQ(le16(cd.data() + z + 76 + 10), 2);
  CHECK_THROWS(ckptio::central_directory(layout, {1}), ckptio::InvalidArgument);
}

TEST(zip_zip64_planning_without_writing_4gib) {
  const std::uint64_t big = (std::uint64_t{5} << 30) + 3;
  const ArchiveLayout layout = ckptio::plan_archive(
      "ckpt", {{"data.pkl", 100, 64}, {"data/0", big, 64}, {"data/1", 10, 64}, {"data/2", 0, 64},
               {"data/3", k4G, 64}});
  const auto& r = layout.records;
  // Small record near the start: no zip64 extra, 16-byte descriptor.
  CHECK_EQ(r[0].descriptor_size, 16u);
  CHECK_EQ(le16(r[0].local_header.data() + 30 + 13), 0x4246);  // "FB" straight after the name
  // Big record at a small offset: extra [usize, 0] and a 24-byte descriptor.
  const Bytes& h1 = r[1].local_header;
  CHECK_EQ(le16(h1.data() + 30 + 11), 0x0001);
  CHECK_EQ(le16(h1.data() + 30 + 11 + 2), 16);
  CHECK_EQ(le64(h1.data() + 30 + 11 + 4), big);
  CHECK_EQ(le64(h1.data() + 30 + 11 + 12), 0u);
  CHECK(h1[30 + 11 + 20] == 'F' && h1[30 + 11 + 21] == 'B');
  CHECK_EQ(r[1].descriptor_size, 24u);
  CHECK_EQ(r[1].data_offset % 64, 0u);
  const Bytes d1 = ckptio::data_descriptor(r[1], 7);
  CHECK_EQ(d1.size(), 24u);
  CHECK_EQ(le64(d1.data() + 8), big);
  CHECK_EQ(le64(d1.data() + 16), big);
  // Small record past 4 GiB: extra [lho] and a 24-byte descriptor.
  CHECK(r[2].header_offset >= k4G);
  const Bytes& h2 = r[2].local_header;
  CHECK_EQ(le16(h2.data() + 30 + 11), 0x0001);
  CHECK_EQ(le16(h2.data() + 30 + 11 + 2), 8);
  CHECK_EQ(le64(h2.data() + 30 + 11 + 4), r[2].header_offset);
  CHECK_EQ(r[2].descriptor_size, 24u);
  CHECK_EQ(r[2].header_offset, r[1].descriptor_offset + 24);
  // Empty record past 4 GiB: extra [lho], no descriptor.
  CHECK_EQ(le16(r[3].local_header.data() + 30 + 11 + 2), 8);
  CHECK_EQ(r[3].descriptor_size, 0u);
  // Exactly 0xFFFFFFFF bytes far out: both [usize, 0] and [lho].
  CHECK_EQ(le16(r[4].local_header.data() + 30 + 11 + 2), 24);
  CHECK_EQ(le64(r[4].local_header.data() + 30 + 11 + 20), r[4].header_offset);
  for (const auto& rec : r) CHECK_EQ(rec.data_offset % 64, 0u);

  std::vector<std::uint32_t> crcs = {1, 2, 3, 0, 5};
  const Bytes cd = ckptio::central_directory(layout, crcs);
  // The big record's CD entry: sentinel sizes and [usize, csize] in the extra.
  const std::size_t e1 = 46 + 13;
  CHECK_EQ(le32(cd.data() + e1 + 20), 0xFFFFFFFFu);
  CHECK_EQ(le32(cd.data() + e1 + 24), 0xFFFFFFFFu);
  CHECK_EQ(le16(cd.data() + e1 + 30), 20);
  CHECK_EQ(le32(cd.data() + e1 + 42), r[1].header_offset);
  CHECK_EQ(le64(cd.data() + e1 + 46 + 11 + 4), big);
  CHECK_EQ(le64(cd.data() + e1 + 46 + 11 + 12), big);
  // The far record's CD entry: sentinel offset and [lho].
  const std::size_t e2 = e1 + 46 + 11 + 20;
  CHECK_EQ(le32(cd.data() + e2 + 42), 0xFFFFFFFFu);
  CHECK_EQ(le16(cd.data() + e2 + 30), 12);
  CHECK_EQ(le64(cd.data() + e2 + 46 + 11 + 4), r[2].header_offset);
  // EOCD: the CD offset does not fit in 32 bits.
  CHECK_EQ(le32(cd.data() + cd.size() - 22 + 16), 0xFFFFFFFFu);

  // Lay the headers, descriptors and CD over a sparse 10 GiB "file" and read it back.
  std::map<std::uint64_t, Bytes> pieces;
  for (std::size_t i = 0; i < r.size(); ++i) {
    pieces[r[i].header_offset] = ckptio::local_header_bytes(r[i]);
    if (r[i].descriptor_size != 0) pieces[r[i].descriptor_offset] = ckptio::data_descriptor(r[i], crcs[i]);
  }
  pieces[layout.central_directory_offset] = cd;
  SparseSource src(layout.total_size, pieces);
  const ZipDirectory zd = ckptio::read_zip_directory(src);
  CHECK_EQ(zd.entries.size(), r.size());
  for (std::size_t i = 0; i < zd.entries.size() && i < r.size(); ++i) {
    CHECK_EQ(zd.entries[i].header_offset, r[i].header_offset);
    CHECK_EQ(zd.entries[i].data_offset, r[i].data_offset);
    CHECK_EQ(zd.entries[i].size, r[i].size);
    CHECK_EQ(zd.entries[i].crc32, r[i].size == 0 ? 0u : crcs[i]);
  }
  CHECK_EQ(zd.central_directory_offset, layout.central_directory_offset);
}

TEST(zip_reads_python_zipfile_archive) {
  check_python_zip(kPythonZip);
  // The same archive without its comment.
  Bytes plain(kPythonZip.begin(), kPythonZip.end() - 12);
  set16(plain, plain.size() - 2, 0);
  check_python_zip(plain);
  // Trailing bytes after the comment are tolerated (the EOCD is found by scanning back).
  Bytes trailing = plain;
  trailing.push_back(0);
  check_python_zip(trailing);
}

TEST(zip_looks_like_zip) {
  CHECK(ckptio::looks_like_zip("PK\x03\x04rest", 8));
  CHECK(!ckptio::looks_like_zip("PK\x03", 3));
  CHECK(!ckptio::looks_like_zip("PK\x05\x06", 4));
  CHECK(!ckptio::looks_like_zip(nullptr, 0));
  CHECK(ckptio::looks_like_zip(kPythonZip.data(), kPythonZip.size()));
}

TEST(zip_hostile_empty_and_tiny_files) {
  CHECK_FORMAT_ERROR(Bytes{}, "not a zip archive");
  CHECK_FORMAT_ERROR(Bytes(21, 0), "not a zip archive");
  CHECK_FORMAT_ERROR(Bytes(100000, 0), "end of central directory record not found");
  Bytes only_eocd(22, 0);
  set32(only_eocd, 0, 0x06054b50);
  const ZipDirectory zd = parse(only_eocd);  // an empty zip is well-formed
  CHECK(zd.entries.empty());
  CHECK(zd.prefix.empty());
}

TEST(zip_hostile_truncated_at_every_byte) {
  const Bytes full = build("ckpt", small_records(16));
  CHECK(parse(full).entries.size() == 6);
  int wrong = 0;
  for (std::size_t len = 0; len < full.size(); ++len) {
    const Bytes cut(full.begin(), full.begin() + static_cast<long>(len));
    const std::string msg = format_error_of(cut);
    if (msg.rfind("test.pt: ", 0) != 0) ++wrong;
  }
  CHECK_EQ(wrong, 0);
  int wrong_python = 0;
  for (std::size_t len = 0; len < kPythonZip.size() - 12; ++len) {
    const Bytes cut(kPythonZip.begin(), kPythonZip.begin() + static_cast<long>(len));
    if (format_error_of(cut).rfind("test.pt: ", 0) != 0) ++wrong_python;
  }
  CHECK_EQ(wrong_python, 0);
}

TEST(zip_hostile_byte_flips_parse_or_format_error) {
  const Bytes full = build("ckpt", small_records(16));
  int bad = 0;
  int parsed = 0;
  for (std::size_t i = 0; i < full.size(); ++i) {
    for (std::uint8_t mask : {0x01, 0x80, 0xFF}) {
      Bytes b = full;
      b[i] ^= mask;
      const std::string msg = format_error_of(b);
      if (msg == "NO ERROR") {
        ++parsed;
      } else if (msg.rfind("test.pt: ", 0) != 0) {
        ++bad;
        if (bad < 5) ::harness::fail(__FILE__, __LINE__, "flip at " + std::to_string(i) + ": " + msg);
      }
    }
  }
  CHECK_EQ(bad, 0);
  CHECK(parsed > 0);  // payload and padding flips must still parse
  for (std::size_t i = 0; i < kPythonZip.size(); ++i) {
    Bytes b = kPythonZip;
    b[i] ^= 0xFF;
    const std::string msg = format_error_of(b);
    CHECK(msg == "NO ERROR" || msg.rfind("test.pt: ", 0) == 0);
  }
}

TEST(zip_hostile_central_directory_beyond_eof) {
  Bytes b = build("ckpt", small_records());
  const Ends e = ends_of(b);
  set64(b, e.zip64 + 48, b.size() + 1000);
  set32(b, e.eocd + 16, 0xFFFFFFFF);
  CHECK_FORMAT_ERROR(b, "central directory (offset");
  // Classic EOCD disagreeing with the zip64 one.
  b = build("ckpt", small_records());
  set32(b, e.eocd + 16, 12);
  CHECK_FORMAT_ERROR(b, "disagrees");
  // Python's archive has no zip64 records.
  Bytes p = kPythonZip;
  set32(p, p.size() - 12 - 22 + 16, 100000);
  CHECK_FORMAT_ERROR(p, "extends past the end records");
  // Zip64 locator pointing past the locator itself, or at garbage.
  b = build("ckpt", small_records());
  set64(b, e.locator + 8, b.size());
  CHECK_FORMAT_ERROR(b, "zip64 end of central directory");
  b = build("ckpt", small_records());
  set64(b, e.locator + 8, 0);
  CHECK_FORMAT_ERROR(b, "zip64 end of central directory record not found");
}

TEST(zip_hostile_huge_entry_count) {
  Bytes b = build("ckpt", small_records());
  const Ends e = ends_of(b);
  set64(b, e.zip64 + 24, std::uint64_t{1} << 60);
  set64(b, e.zip64 + 32, std::uint64_t{1} << 60);
  set16(b, e.eocd + 8, 0xFFFF);
  set16(b, e.eocd + 10, 0xFFFF);
  CHECK_FORMAT_ERROR(b, "more than a central directory");
  Bytes p = kPythonZip;
  set16(p, p.size() - 12 - 22 + 8, 0xFFFF);
  set16(p, p.size() - 12 - 22 + 10, 0xFFFF);
  CHECK_FORMAT_ERROR(p, "entries");
  // A count that fits but disagrees with the entries present.
  b = build("ckpt", small_records());
  set64(b, e.zip64 + 24, 5);
  set64(b, e.zip64 + 32, 5);
  set16(b, e.eocd + 8, 5);
  set16(b, e.eocd + 10, 5);
  CHECK_FORMAT_ERROR(b, "declares 5 entries but the central directory holds 6");
}

TEST(zip_hostile_duplicate_names) {
  CHECK_FORMAT_ERROR(build("ckpt", {{"data/0", {1, 2}, 1}, {"x", {3}, 1}, {"data/0", {4}, 1}}),
                     "duplicate record name 'ckpt/data/0'");
}

TEST(zip_hostile_names) {
  const std::vector<Record> base = {{"data.pkl", {1, 2, 3}, 1}, {"data/0", {4, 5}, 1}};
  Bytes b = build("ckpt", base);
  replace_all(b, "ckpt/data/0", "othr/data/0");
  CHECK_FORMAT_ERROR(b, "lies outside the archive prefix 'ckpt/'");
  b = build("ckpt", base);
  replace_all(b, "ckpt/data.pkl", "ckptXdata.pkl");
  CHECK_FORMAT_ERROR(b, "has no '<archive>/' prefix");
  b = build("ckpt", base);
  replace_all(b, "ckpt/data.pkl", "/kpt/data.pkl");
  CHECK_FORMAT_ERROR(b, "absolute");
  b = build("ckpt", base);
  replace_all(b, "ckpt/data/0", std::string("ckpt/dat\0/0", 11));
  CHECK_FORMAT_ERROR(b, "NUL");
  CHECK_FORMAT_ERROR(build("ckpt", {{"data.pkl", {1}, 1}, {"../../etc/x", {2}, 1}}), "'..'");
  CHECK(parse(build("ckpt", {{"data.pkl", {1}, 1}, {"a..b", {2}, 1}})).entries.size() == 2);
  // The local header must name the same record as the central directory.
  b = build("ckpt", base);
  const auto first = std::search(b.begin(), b.end(), std::begin("ckpt/data/0"), std::end("ckpt/data/0") - 1);
  first[5] = 'D';
  CHECK_FORMAT_ERROR(b, "names a different record");
}

TEST(zip_hostile_overlapping_records_and_records_into_cd) {
  const std::vector<Record> base = {{"data.pkl", harness::pattern(100, 9), 1}, {"data/0", {4, 5}, 1}};
  const ArchiveLayout layout = ckptio::plan_archive("ckpt", specs_of(base));
  const std::size_t cd = static_cast<std::size_t>(layout.central_directory_offset);
  // Record 0 grown to run into record 1's header.
  Bytes b = build("ckpt", base);
  const std::uint64_t grown = layout.records[1].header_offset - layout.records[0].data_offset + 1;
  set32(b, cd + 20, static_cast<std::uint32_t>(grown));
  set32(b, cd + 24, static_cast<std::uint32_t>(grown));
  CHECK_FORMAT_ERROR(b, "overlap");
  // Record 1 grown into the central directory.
  b = build("ckpt", base);
  const std::size_t e1 = cd + 46 + 13;
  const std::uint64_t past = layout.central_directory_offset - layout.records[1].data_offset + 1;
  set32(b, e1 + 20, static_cast<std::uint32_t>(past));
  set32(b, e1 + 24, static_cast<std::uint32_t>(past));
  CHECK_FORMAT_ERROR(b, "record 'ckpt/data/0' extends past the central directory (offset " +
                            std::to_string(layout.records[1].data_offset) + " + size " +
                            std::to_string(past) + " > " + std::to_string(cd) + ")");
  // Both entries pointing at the same local header.
  b = build("ckpt", {{"a", {1}, 1}, {"b", {2}, 1}});
  const ArchiveLayout l2 = ckptio::plan_archive("ckpt", {{"a", 1, 1}, {"b", 1, 1}});
  set32(b, static_cast<std::size_t>(l2.central_directory_offset) + 46 + 6 + 42, 0);
  CHECK_FORMAT_ERROR(b, "names a different record");
  // A stored record whose sizes disagree.
  b = build("ckpt", base);
  set32(b, cd + 20, 99);
  CHECK_FORMAT_ERROR(b, "compressed size 99");
}

TEST(zip_twenty_thousand_tiny_records) {
  harness::TempDir dir;
  std::vector<Record> records;
  records.push_back({"data.pkl", harness::pattern(5000, 1), 64});
  for (int i = 0; i < 20000; ++i) {
    records.push_back({"data/" + std::to_string(i), harness::pattern(static_cast<std::size_t>(i % 97), static_cast<std::uint64_t>(i)), 64});
  }
  records.push_back({"version", {'3', '\n'}, 64});
  const ArchiveLayout layout = ckptio::plan_archive("big", specs_of(records));
  for (bool crc : {false, true}) {
    if (crc && !ckptio::crc32_available()) continue;
    const std::string path = dir.file("many.pt");
    {
      ckptio::File f = ckptio::File::open(path, ckptio::File::Mode::kCreate);
      ckptio::WriteOptions options;
      options.threads = 2;
      options.crc32 = crc;
      write_with(f, "big", records, options);
    }
    ckptio::File f = ckptio::File::open(path, ckptio::File::Mode::kRead);
    CHECK_EQ(f.size(), layout.total_size);
    const ZipDirectory zd = ckptio::read_zip_directory(f);
    CHECK_EQ(zd.entries.size(), records.size());
    bool ok = zd.entries.size() == records.size();
    for (std::size_t i = 0; ok && i < records.size(); ++i) {
      const auto& e = zd.entries[i];
      ok = e.data_offset == layout.records[i].data_offset && e.size == records[i].payload.size() &&
           e.data_offset % 64 == 0 &&
           (!crc || e.crc32 == ckptio::crc32_update(0, records[i].payload.data(), records[i].payload.size()));
    }
    CHECK(ok);
    Bytes back(records[12345].payload.size());
    f.read_exact(back.data(), back.size(), zd.entries[12345].data_offset);
    CHECK(back == records[12345].payload);
  }
  if (!ckptio::crc32_available()) {
    ckptio::File f = ckptio::File::open(dir.file("nozlib.pt"), ckptio::File::Mode::kCreate);
    ckptio::WriteOptions options;
    options.crc32 = true;
    CHECK_THROWS(ckptio::ArchiveWriter(f, "big", options), ckptio::InvalidArgument);
  }
  {
    // Without preallocation the file still ends up exactly total_size long.
    ckptio::File f = ckptio::File::open(dir.file("noprealloc.pt"), ckptio::File::Mode::kCreate);
    ckptio::WriteOptions options;
    options.threads = 2;
    options.preallocate = false;
    options.chunk_bytes = 4096;
    write_with(f, "big", records, options);
    CHECK_EQ(f.size(), layout.total_size);
  }
}

TEST(zip_archive_writer_refuses_bad_records_and_keeps_going) {
  harness::TempDir dir;
  ckptio::File f = ckptio::File::open(dir.file("a.pt"), ckptio::File::Mode::kCreate);
  CHECK_THROWS(ckptio::ArchiveWriter(f, "a/b", {}), ckptio::InvalidArgument);
  ckptio::WriteOptions options;
  options.threads = 2;
  ckptio::ArchiveWriter writer(f, "a", options);
  const Bytes payload = harness::pattern(100, 7);
  CHECK_EQ(writer.add("data/0", 64, payload.data(), payload.size()), 0u);
  CHECK_THROWS(writer.add("data/1", 0, payload.data(), payload.size()), ckptio::InvalidArgument);
  CHECK_THROWS(writer.add("", 64, payload.data(), payload.size()), ckptio::InvalidArgument);
  CHECK_THROWS(writer.add("data/1", 64, nullptr, 10), ckptio::InvalidArgument);
  CHECK_EQ(writer.add_copy("version", 64, "3\n"), 1u);  // the refused ones took no index
  CHECK_EQ(writer.record_count(), 2u);
  CHECK_THROWS((writer.finish({{0, 1}})), ckptio::InvalidArgument);  // not a reserved record
  CHECK_THROWS(writer.add("data/2", 64, payload.data(), payload.size()), ckptio::InvalidArgument);
}

TEST(zip_archive_writer_reports_a_failed_write_and_abandons_cleanly) {
  harness::TempDir dir;
  const std::string path = dir.file("ro.pt");
  { ckptio::File::open(path, ckptio::File::Mode::kCreate); }
  // Writes into a read-only descriptor fail (EBADF) on the workers: finish, or the next add,
  // rethrows the first error.
  ckptio::File f = ckptio::File::open(path, ckptio::File::Mode::kRead);
  const Bytes payload = harness::pattern(3 << 20, 3);
  for (std::size_t threads : {std::size_t{1}, std::size_t{2}}) {
    ckptio::WriteOptions options;
    options.threads = threads;
    options.preallocate = false;
    options.chunk_bytes = 1 << 20;
    ckptio::ArchiveWriter writer(f, "ro", options);
    writer.add("data/0", 4096, payload.data(), payload.size());
    CHECK_THROWS(writer.finish(), ckptio::IoError);
    CHECK_THROWS(writer.finish(), ckptio::IoError);
  }
  // Abandoned with writes queued: returns once none is in flight; the destructor after it is
  // a no-op.
  ckptio::File out = ckptio::File::open(dir.file("abandoned.pt"), ckptio::File::Mode::kCreate);
  ckptio::WriteOptions options;
  options.threads = 3;
  options.chunk_bytes = 4096;
  ckptio::ArchiveWriter writer(out, "x", options);
  for (int i = 0; i < 200; ++i) writer.add("data/" + std::to_string(i), 64, payload.data(), 20000);
  writer.abandon();
  writer.abandon();
  CHECK_THROWS(writer.finish(), ckptio::InvalidArgument);
}

TEST(zip_local_headers_read_in_parallel_give_the_same_directory_and_the_same_error) {
  // 3,000 records 8 KiB apart: every local header is a read of its own, so the pool splits them.
  std::vector<Record> records;
  records.push_back({"data.pkl", harness::pattern(100, 1), 64});
  for (int i = 0; i < 3000; ++i) {
    records.push_back({"data/" + std::to_string(i), harness::pattern(8192, static_cast<std::uint64_t>(i)), 4096});
  }
  Bytes bytes = build("archive", records);
  ckptio::ThreadPool pool(4);
  ckptio::MemorySource src(bytes.data(), bytes.size(), "test.pt");
  const ZipDirectory serial = ckptio::read_zip_directory(src);
  const ZipDirectory parallel = ckptio::read_zip_directory(src, &pool);
  CHECK_EQ(parallel.entries.size(), serial.entries.size());
  bool same = parallel.entries.size() == serial.entries.size();
  for (std::size_t i = 0; same && i < serial.entries.size(); ++i) {
    same = parallel.entries[i].name == serial.entries[i].name &&
           parallel.entries[i].data_offset == serial.entries[i].data_offset &&
           parallel.entries[i].size == serial.entries[i].size;
  }
  CHECK(same);

  // Break two headers far apart: whatever the scheduling, the first in file order is named.
  const ArchiveLayout layout = ckptio::plan_archive("archive", specs_of(records));
  bytes[static_cast<std::size_t>(layout.records[2900].header_offset)] = 'X';
  bytes[static_cast<std::size_t>(layout.records[700].header_offset)] = 'X';
  ckptio::MemorySource broken(bytes.data(), bytes.size(), "test.pt");
  for (int round = 0; round < 20; ++round) {
    std::string message;
    try {
      ckptio::read_zip_directory(broken, &pool);
    } catch (const ckptio::FormatError& e) {
      message = e.what();
    }
    CHECK(message.find("data/699") != std::string::npos);
  }
}

TEST(zip_a_cold_file_reads_its_local_headers_concurrently_with_the_same_result) {
  // 600 records 8 KiB apart. With the file out of the page cache the headers are read by
  // threads of their own; the directory and the first error in file order are the same.
  std::vector<Record> records;
  records.push_back({"data.pkl", harness::pattern(100, 1), 64});
  for (int i = 0; i < 600; ++i) {
    records.push_back(
        {"data/" + std::to_string(i), harness::pattern(8192, static_cast<std::uint64_t>(i)), 4096});
  }
  Bytes bytes = build("archive", records);
  harness::TempDir dir;
  const std::string path = dir.file("cold.pt");
  {
    const ckptio::File f = ckptio::File::open(path, ckptio::File::Mode::kCreate);
    f.write_all(bytes.data(), bytes.size(), 0);
  }
  ckptio::MemorySource warm(bytes.data(), bytes.size(), "warm.pt");
  CHECK(warm.cached(0));  // memory: always
  const ZipDirectory expected = ckptio::read_zip_directory(warm);
  const ArchiveLayout layout = ckptio::plan_archive("archive", specs_of(records));
  if (!harness::evict(path)) return;  // a file system that keeps every page: nothing to test
  {
    const ckptio::File f = ckptio::File::open(path, ckptio::File::Mode::kRead);
    const ZipDirectory cold = ckptio::read_zip_directory(f);
    bool same = cold.entries.size() == expected.entries.size();
    for (std::size_t i = 0; same && i < expected.entries.size(); ++i) {
      same = cold.entries[i].name == expected.entries[i].name &&
             cold.entries[i].data_offset == expected.entries[i].data_offset &&
             cold.entries[i].size == expected.entries[i].size;
    }
    CHECK(same);
    CHECK(harness::page_cached(path, layout.records[300].header_offset));  // read now
  }
  bytes[static_cast<std::size_t>(layout.records[500].header_offset)] = 'X';
  bytes[static_cast<std::size_t>(layout.records[90].header_offset)] = 'X';
  {
    const ckptio::File f = ckptio::File::open(path, ckptio::File::Mode::kReadWrite);
    f.write_all(bytes.data(), bytes.size(), 0);
  }
  for (int round = 0; round < 5; ++round) {
    if (!harness::evict(path)) return;
    std::string message;
    try {
      ckptio::read_zip_directory(ckptio::File::open(path, ckptio::File::Mode::kRead));
    } catch (const ckptio::FormatError& e) {
      message = e.what();
    }
    CHECK(message.find("data/89") != std::string::npos);
  }
}

// Memory that says it is out of the page cache: read_zip_directory's predict_cold path without
// evicting a file.
class ColdSource final : public ckptio::ByteSource {
 public:
  explicit ColdSource(const Bytes& bytes) : bytes_(bytes) {}
  std::uint64_t size() const override { return bytes_.size(); }
  const std::string& name() const override { return name_; }
  void read_exact(void* dst, std::size_t n, std::uint64_t offset) const override {
    if (offset > bytes_.size() || n > bytes_.size() - offset) {
      throw ckptio::FormatError(name_ + ": truncated");
    }
    std::memcpy(dst, bytes_.data() + offset, n);
  }
  bool cached(std::uint64_t) const override { return false; }

 private:
  const Bytes& bytes_;
  std::string name_ = "<cold>";
};

bool same_offsets(const ZipDirectory& a, const ZipDirectory& b) {
  bool same = a.entries.size() == b.entries.size();
  for (std::size_t i = 0; same && i < a.entries.size(); ++i) {
    same = a.entries[i].name == b.entries[i].name &&
           a.entries[i].data_offset == b.entries[i].data_offset &&
           a.entries[i].size == b.entries[i].size;
  }
  return same;
}

TEST(zip_a_cold_archive_of_the_writers_layout_gets_the_offsets_its_headers_give) {
  // Records of every kind the writer lays out (empty: no descriptor; varied alignments and
  // sizes), far enough apart to be read as several groups: predicted from the layout, the
  // offsets are those the local headers give; asked without predict_cold, or warm, they are
  // read.
  std::vector<Record> records;
  records.push_back({".format_version", harness::pattern(1, 9), 64});
  for (int i = 0; i < 40; ++i) {
    const std::size_t size = i % 7 == 0 ? 0 : static_cast<std::size_t>(1 + i * 977);
    records.push_back({"data/" + std::to_string(i),
                       harness::pattern(size, static_cast<std::uint64_t>(i)),
                       i % 3 == 0 ? 4096u : 64u});
  }
  records.push_back({"data.pkl", harness::pattern(300, 2), 64});
  const Bytes bytes = build("archive", records);
  ckptio::MemorySource warm(bytes.data(), bytes.size(), "warm.pt");
  const ZipDirectory expected = ckptio::read_zip_directory(warm);
  CHECK(!expected.predicted);
  CHECK(!ckptio::read_zip_directory(warm, nullptr, true).predicted);  // warm: read
  const ColdSource cold(bytes);
  const ZipDirectory read = ckptio::read_zip_directory(cold);
  CHECK(!read.predicted && same_offsets(read, expected));
  const ZipDirectory predicted = ckptio::read_zip_directory(cold, nullptr, true);
  CHECK(predicted.predicted);
  CHECK(same_offsets(predicted, expected));
}

TEST(zip_a_layout_that_cannot_be_the_writers_is_read_not_predicted) {
  // A record moved up so that the next header lies closer to its payload than a data
  // descriptor: no payload fits where the writer's layout would put it, so the headers are
  // read (and the error they give is the usual one).
  std::vector<Record> records;
  for (int i = 0; i < 8; ++i) {
    records.push_back({"data/" + std::to_string(i), harness::pattern(20000, 3), 4096});
  }
  const Bytes bytes = build("archive", records);
  const ArchiveLayout layout = ckptio::plan_archive("archive", specs_of(records));
  Bytes shrunk(bytes);
  // Claim in the central directory that record 3 runs one byte farther than a payload and a
  // data descriptor can before record 4's header.
  auto u16 = [&](std::size_t at) {
    return static_cast<std::size_t>(shrunk[at] | (shrunk[at + 1] << 8));
  };
  std::size_t at = static_cast<std::size_t>(layout.central_directory_offset);
  for (int i = 0; i < 3; ++i) at += 46 + u16(at + 28) + u16(at + 30) + u16(at + 32);
  const std::uint64_t name_end = layout.records[3].header_offset + 30 + layout.records[3].name.size();
  const auto grown = static_cast<std::uint32_t>(layout.records[4].header_offset - name_end - 16 + 1);
  for (std::size_t field : {std::size_t{20}, std::size_t{24}}) {
    for (int b = 0; b < 4; ++b) {
      shrunk[at + field + b] = static_cast<std::uint8_t>((grown >> (8 * b)) & 0xFF);
    }
  }
  const ColdSource cold(shrunk);
  std::string message;
  try {
    ckptio::read_zip_directory(cold, nullptr, true);
  } catch (const ckptio::FormatError& e) {
    message = e.what();
  }
  CHECK(message.find("overlap") != std::string::npos);
}
