#include "ckptio/zip.hpp"

#include <algorithm>
#include <cstring>
#include <exception>
#include <numeric>
#include <string>
#include <vector>

#include "ckptio/errors.hpp"
#include "ckptio/thread_pool.hpp"

namespace ckptio {
namespace {

constexpr std::uint32_t kLocalHeaderSig = 0x04034b50;
constexpr std::uint32_t kCentralHeaderSig = 0x02014b50;
constexpr std::uint32_t kDescriptorSig = 0x08074b50;
constexpr std::uint32_t kZip64EocdSig = 0x06064b50;
constexpr std::uint32_t kZip64LocatorSig = 0x07064b50;
constexpr std::uint32_t kEocdSig = 0x06054b50;

constexpr std::uint64_t kLocalHeaderSize = 30;
constexpr std::uint64_t kCentralHeaderSize = 46;
constexpr std::uint64_t kZip64EocdSize = 56;
constexpr std::uint64_t kZip64LocatorSize = 20;
constexpr std::uint64_t kEocdSize = 22;
constexpr std::uint64_t kMaxComment = 0xFFFF;

constexpr std::uint16_t kZip64ExtraTag = 0x0001;
constexpr std::uint32_t kMax32 = 0xFFFFFFFF;
constexpr std::uint16_t kMax16 = 0xFFFF;

constexpr std::uint16_t kFlagEncrypted = 0x0001;
constexpr std::uint16_t kFlagDescriptor = 0x0008;
constexpr std::uint16_t kFlagUtf8 = 0x0800;

std::uint16_t get16(const std::uint8_t* p) {
  return static_cast<std::uint16_t>(p[0] | (p[1] << 8));
}
std::uint32_t get32(const std::uint8_t* p) {
  return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
         (static_cast<std::uint32_t>(p[2]) << 16) | (static_cast<std::uint32_t>(p[3]) << 24);
}
std::uint64_t get64(const std::uint8_t* p) {
  return static_cast<std::uint64_t>(get32(p)) | (static_cast<std::uint64_t>(get32(p + 4)) << 32);
}

void put16(std::vector<std::uint8_t>& out, std::uint64_t v) {
  out.push_back(static_cast<std::uint8_t>(v));
  out.push_back(static_cast<std::uint8_t>(v >> 8));
}
void put32(std::vector<std::uint8_t>& out, std::uint64_t v) {
  put16(out, v & 0xFFFF);
  put16(out, (v >> 16) & 0xFFFF);
}
void put64(std::vector<std::uint8_t>& out, std::uint64_t v) {
  put32(out, v & kMax32);
  put32(out, v >> 32);
}

// ---------------------------------------------------------------- reading helpers

// Names come from the file: keep messages printable and short whatever the bytes are.
std::string quote(const std::string& name) {
  static const char kHex[] = "0123456789abcdef";
  constexpr std::size_t kMaxShown = 200;
  std::string out = "'";
  for (std::size_t i = 0; i < name.size() && i < kMaxShown; ++i) {
    const auto c = static_cast<unsigned char>(name[i]);
    if (c >= 0x20 && c < 0x7F && c != '\\' && c != '\'') {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 0xF];
    }
  }
  if (name.size() > kMaxShown) out += "...";
  out += "'";
  return out;
}

std::string num(std::uint64_t v) { return std::to_string(v); }

class Reader {
 public:
  explicit Reader(const ByteSource& source) : source_(source), size_(source.size()) {}

  [[noreturn]] void fail(const std::string& what) const {
    throw FormatError(source_.name() + ": " + what);
  }

  std::uint64_t size() const { return size_; }

  bool cached(std::uint64_t offset) const { return source_.cached(offset); }

  std::vector<std::uint8_t> read(std::uint64_t offset, std::uint64_t n) const {
    // Callers have bounds-checked; this is a last guard so no path can over-allocate.
    if (offset > size_ || n > size_ - offset) {
      fail("internal bounds check failed reading " + num(n) + " bytes at offset " + num(offset));
    }
    std::vector<std::uint8_t> buf;
    read_into(buf, offset, n);
    return buf;
  }

  /// As read(), into `buf` (resized to n), so a loop of reads reuses one allocation.
  void read_into(std::vector<std::uint8_t>& buf, std::uint64_t offset, std::uint64_t n) const {
    if (offset > size_ || n > size_ - offset) {
      fail("internal bounds check failed reading " + num(n) + " bytes at offset " + num(offset));
    }
    buf.resize(static_cast<std::size_t>(n));
    source_.read_exact(buf.data(), buf.size(), offset);
  }

 private:
  const ByteSource& source_;
  std::uint64_t size_;
};

struct EndRecords {
  std::uint64_t entry_count;
  std::uint64_t cd_offset;
  std::uint64_t cd_size;
  std::uint64_t end_start;  // first byte of the end records (zip64 EOCD, or EOCD)
};

EndRecords read_end_records(const Reader& r) {
  const std::uint64_t size = r.size();
  if (size < kEocdSize) {
    r.fail("not a zip archive: file is too small (" + num(size) +
           " bytes) to hold an end of central directory record");
  }
  const std::uint64_t tail_len = std::min(size, kEocdSize + kMaxComment);
  const std::uint64_t tail_start = size - tail_len;
  const std::vector<std::uint8_t> tail = r.read(tail_start, tail_len);

  // The EOCD is followed only by its comment; scanning back from the end finds the last
  // signature whose comment fits in the file.
  std::uint64_t eocd = 0;
  bool found = false;
  for (std::uint64_t i = tail_len - kEocdSize + 1; i-- > 0;) {
    const std::uint8_t* p = tail.data() + i;
    if (get32(p) == kEocdSig && i + kEocdSize + get16(p + 20) <= tail_len) {
      eocd = tail_start + i;
      found = true;
      break;
    }
  }
  if (!found) r.fail("not a zip archive: end of central directory record not found");

  const std::uint8_t* e = tail.data() + (eocd - tail_start);
  const std::uint16_t disk = get16(e + 4);
  const std::uint16_t cd_disk = get16(e + 6);
  const std::uint16_t count_disk = get16(e + 8);
  const std::uint16_t count = get16(e + 10);
  const std::uint32_t cd_size32 = get32(e + 12);
  const std::uint32_t cd_offset32 = get32(e + 16);

  bool zip64 = false;
  if (eocd >= kZip64LocatorSize) {
    const std::uint64_t locator = eocd - kZip64LocatorSize;
    const std::vector<std::uint8_t> loc = r.read(locator, kZip64LocatorSize);
    zip64 = get32(loc.data()) == kZip64LocatorSig;
    if (zip64) {
      const std::uint32_t z64_disk = get32(loc.data() + 4);
      const std::uint64_t z64_offset = get64(loc.data() + 8);
      const std::uint32_t disks = get32(loc.data() + 16);
      if (z64_disk != 0 || disks > 1) r.fail("multi-disk (spanned) zip archives are not supported");
      if (z64_offset > locator || locator - z64_offset < kZip64EocdSize) {
        r.fail("zip64 end of central directory offset " + num(z64_offset) +
               " does not leave room for the record before its locator at offset " + num(locator));
      }
      const std::vector<std::uint8_t> z = r.read(z64_offset, kZip64EocdSize);
      if (get32(z.data()) != kZip64EocdSig) {
        r.fail("zip64 end of central directory record not found at offset " + num(z64_offset));
      }
      const std::uint64_t record_size = get64(z.data() + 4);
      if (record_size < kZip64EocdSize - 12 || record_size > locator - z64_offset - 12) {
        r.fail("zip64 end of central directory record at offset " + num(z64_offset) +
               " has an invalid size " + num(record_size));
      }
      const std::uint32_t z_disk = get32(z.data() + 16);
      const std::uint32_t z_cd_disk = get32(z.data() + 20);
      const std::uint64_t z_count_disk = get64(z.data() + 24);
      const std::uint64_t z_count = get64(z.data() + 32);
      const std::uint64_t z_cd_size = get64(z.data() + 40);
      const std::uint64_t z_cd_offset = get64(z.data() + 48);
      if (z_disk != 0 || z_cd_disk != 0 || z_count_disk != z_count ||
          (disk != 0 && disk != kMax16) || (cd_disk != 0 && cd_disk != kMax16)) {
        r.fail("multi-disk (spanned) zip archives are not supported");
      }
      // Each classic field is either the "see zip64" sentinel or the same value.
      if ((count != kMax16 && count != z_count) || (count_disk != kMax16 && count_disk != z_count) ||
          (cd_size32 != kMax32 && cd_size32 != z_cd_size) ||
          (cd_offset32 != kMax32 && cd_offset32 != z_cd_offset)) {
        r.fail("end of central directory record disagrees with the zip64 end of central directory "
               "record");
      }
      return EndRecords{z_count, z_cd_offset, z_cd_size, z64_offset};
    }
  }
  if (disk != 0 || cd_disk != 0 || count_disk != count) {
    r.fail("multi-disk (spanned) zip archives are not supported");
  }
  return EndRecords{count, cd_offset32, cd_size32, eocd};
}

// Whether `s` is well-formed UTF-8 as Python decodes it: no overlong forms, no surrogates,
// nothing above U+10FFFF.
bool is_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const auto* end = p + s.size();
  while (p < end) {
    const unsigned char c = *p;
    std::size_t n = 0;
    std::uint32_t cp = 0, min = 0;
    if (c < 0x80) {
      ++p;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      n = 1, cp = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2, cp = c & 0x0F, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3, cp = c & 0x07, min = 0x10000;
    } else {
      return false;
    }
    if (static_cast<std::size_t>(end - p) <= n) return false;
    for (std::size_t i = 1; i <= n; ++i) {
      if ((p[i] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    p += n + 1;
  }
  return true;
}

bool is_safe_name(const std::string& name, std::string* why) {
  if (name.empty()) {
    *why = "is empty";
    return false;
  }
  if (!is_utf8(name)) {
    *why = "is not UTF-8 (torch's writer stores names in UTF-8)";
    return false;
  }
  if (name.find('\0') != std::string::npos) {
    *why = "contains a NUL byte";
    return false;
  }
  if (name[0] == '/') {
    *why = "is an absolute path";
    return false;
  }
  // ".." as a path component is what escapes a directory; "a..b" is harmless.
  std::size_t start = 0;
  while (start <= name.size()) {
    std::size_t end = name.find('/', start);
    if (end == std::string::npos) end = name.size();
    if (end - start == 2 && name.compare(start, 2, "..") == 0) {
      *why = "contains a '..' component";
      return false;
    }
    start = end + 1;
  }
  return true;
}

// Fills uncompressed size, compressed size and header offset from a zip64 extra field; only
// the fields whose classic value is the 0xFFFFFFFF sentinel are present, in this order.
void apply_zip64_extra(const Reader& r, const std::string& name, const std::uint8_t* extra,
                       std::size_t extra_len, std::uint64_t* usize, std::uint64_t* csize,
                       std::uint64_t* lho) {
  const bool need_usize = *usize == kMax32;
  const bool need_csize = *csize == kMax32;
  const bool need_lho = *lho == kMax32;
  if (!need_usize && !need_csize && !need_lho) return;
  std::size_t pos = 0;
  while (extra_len - pos >= 4) {
    const std::uint16_t tag = get16(extra + pos);
    const std::uint16_t len = get16(extra + pos + 2);
    if (len > extra_len - pos - 4) {
      r.fail("record " + quote(name) + ": extra field runs past the end of its extra data");
    }
    if (tag == kZip64ExtraTag) {
      const std::size_t wanted = 8 * (std::size_t{need_usize} + need_csize + need_lho);
      if (len < wanted) {
        r.fail("record " + quote(name) + ": zip64 extra field holds " + num(len) +
               " bytes, needs " + num(wanted));
      }
      const std::uint8_t* v = extra + pos + 4;
      if (need_usize) {
        *usize = get64(v);
        v += 8;
      }
      if (need_csize) {
        *csize = get64(v);
        v += 8;
      }
      if (need_lho) *lho = get64(v);
      return;
    }
    pos += 4 + std::size_t{len};
  }
  r.fail("record " + quote(name) + ": a size or offset is 0xFFFFFFFF but there is no zip64 extra "
         "field");
}

std::vector<ZipEntry> parse_central_directory(const Reader& r, const EndRecords& end) {
  const std::vector<std::uint8_t> cd = r.read(end.cd_offset, end.cd_size);
  std::vector<ZipEntry> entries;
  entries.reserve(static_cast<std::size_t>(end.entry_count));
  std::size_t pos = 0;
  while (pos < cd.size()) {
    const std::string where = "central directory entry " + num(entries.size()) + " (offset " +
                              num(end.cd_offset + pos) + ")";
    if (cd.size() - pos < kCentralHeaderSize) r.fail(where + " is truncated");
    const std::uint8_t* h = cd.data() + pos;
    if (get32(h) != kCentralHeaderSig) r.fail(where + " has a bad signature");
    const std::uint16_t flags = get16(h + 8);
    const std::uint16_t method = get16(h + 10);
    const std::uint32_t crc = get32(h + 16);
    std::uint64_t csize = get32(h + 20);
    std::uint64_t usize = get32(h + 24);
    const std::size_t name_len = get16(h + 28);
    const std::size_t extra_len = get16(h + 30);
    const std::size_t comment_len = get16(h + 32);
    std::uint64_t lho = get32(h + 42);
    const std::size_t entry_len = kCentralHeaderSize + name_len + extra_len + comment_len;
    if (entry_len > cd.size() - pos) r.fail(where + " runs past the end of the central directory");

    std::string name(reinterpret_cast<const char*>(h + kCentralHeaderSize), name_len);
    std::string why;
    if (!is_safe_name(name, &why)) r.fail("record name " + quote(name) + " " + why);
    apply_zip64_extra(r, name, h + kCentralHeaderSize + name_len, extra_len, &usize, &csize, &lho);
    if (flags & kFlagEncrypted) r.fail("record " + quote(name) + " is encrypted");
    if (method == 0 && csize != usize) {
      r.fail("stored record " + quote(name) + " has compressed size " + num(csize) +
             " but uncompressed size " + num(usize));
    }
    entries.push_back(ZipEntry{std::move(name), lho, 0, csize, usize, crc, method, flags});
    pos += entry_len;
  }
  if (entries.size() != end.entry_count) {
    r.fail("end of central directory record declares " + num(end.entry_count) +
           " entries but the central directory holds " + num(entries.size()));
  }
  return entries;
}

std::string archive_prefix(const Reader& r, const std::vector<ZipEntry>& entries) {
  if (entries.empty()) return std::string();
  const std::string& first = entries.front().name;
  const std::size_t slash = first.find('/');
  if (slash == std::string::npos || slash == 0) {
    r.fail("record " + quote(first) + " has no '<archive>/' prefix");
  }
  std::string prefix = first.substr(0, slash + 1);
  for (const ZipEntry& e : entries) {
    if (e.name.compare(0, prefix.size(), prefix) != 0) {
      r.fail("record " + quote(e.name) + " lies outside the archive prefix " + quote(prefix));
    }
  }
  return prefix;
}

void check_unique_names(const Reader& r, const std::vector<ZipEntry>& entries) {
  std::vector<const std::string*> names;
  names.reserve(entries.size());
  for (const ZipEntry& e : entries) names.push_back(&e.name);
  std::sort(names.begin(), names.end(),
            [](const std::string* a, const std::string* b) { return *a < *b; });
  for (std::size_t i = 1; i < names.size(); ++i) {
    if (*names[i] == *names[i - 1]) r.fail("duplicate record name " + quote(*names[i]));
  }
}

// The payload offsets of records laid out one after the other as torch's writer (miniz) and
// ckptio's lay them out: header, name, extra field, payload, then a data descriptor of 16
// bytes, 24 for a zip64 record (a payload or header offset of 4 GiB or more), none for an
// empty one (flag bit 3 clear), then the next record or the central directory. False, with
// nothing set, when any record's payload would not fit between its name and the next record
// as such a layout puts it.
bool predict_data_offsets(std::vector<ZipEntry>& entries, const std::vector<std::size_t>& order,
                          std::uint64_t cd_offset) {
  std::vector<std::uint64_t> offsets(order.size());
  for (std::size_t i = 0; i < order.size(); ++i) {
    const ZipEntry& e = entries[order[i]];
    const std::uint64_t next = i + 1 < order.size() ? entries[order[i + 1]].header_offset
                                                    : cd_offset;
    const std::uint64_t descriptor =
        (e.flags & kFlagDescriptor) == 0                   ? 0
        : e.size >= kMax32 || e.header_offset >= kMax32 ? 24
                                                           : 16;
    const std::uint64_t name_end = e.header_offset + kLocalHeaderSize + e.name.size();
    if (next < name_end || next - name_end < descriptor || next - name_end - descriptor < e.size) {
      return false;
    }
    offsets[i] = next - descriptor - e.size;
    if (offsets[i] - name_end > kMax16) return false;  // more than an extra field holds
  }
  for (std::size_t i = 0; i < order.size(); ++i) entries[order[i]].data_offset = offsets[i];
  return true;
}

// Reads every local header to learn where each payload starts (the local extra length may
// differ from the central one, e.g. torch's "FB" padding), then checks that records stay
// before the central directory and do not overlap. With `predict_cold` and a cold source,
// predicts the payload offsets instead where the layout allows (predict_data_offsets) and
// returns true: nothing is read and the records lie in order without overlap by
// construction, but the local headers are unchecked.
bool resolve_local_headers(const Reader& r, std::vector<ZipEntry>& entries,
                           std::uint64_t cd_offset, ThreadPool* pool, bool predict_cold) {
  std::vector<std::size_t> order(entries.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return entries[a].header_offset < entries[b].header_offset;
  });

  // The local name must equal the central one, so header + name is known to span this much.
  auto header_span = [&](const ZipEntry& e) { return kLocalHeaderSize + e.name.size(); };
  for (std::size_t idx : order) {
    const ZipEntry& e = entries[idx];
    if (e.header_offset > cd_offset || header_span(e) > cd_offset - e.header_offset) {
      r.fail("record " + quote(e.name) + ": local header at offset " + num(e.header_offset) +
             " extends past the start of the central directory (offset " + num(cd_offset) + ")");
    }
  }

  // Neighbouring headers are fetched in one read: for thousands of tiny records this is a
  // handful of reads instead of one per record. The gap limit is about what one read call
  // costs in copying, so payloads of more than a few KiB are skipped, never read: with a
  // larger limit, 20,000 records of ~32 KiB each read the whole file here.
  constexpr std::uint64_t kWindow = std::uint64_t{1} << 20;
  constexpr std::uint64_t kMaxGap = std::uint64_t{4} << 10;
  struct Group {
    std::size_t begin, end;                 // indices into `order`
    std::uint64_t window_start, window_end;  // the bytes one read fetches for them
  };
  std::vector<Group> groups;
  for (std::size_t k = 0; k < order.size();) {
    const std::uint64_t window_start = entries[order[k]].header_offset;
    std::uint64_t window_end = window_start + header_span(entries[order[k]]);
    std::size_t m = k + 1;
    while (m < order.size()) {
      const ZipEntry& e = entries[order[m]];
      const std::uint64_t end = std::max(window_end, e.header_offset + header_span(e));
      if (e.header_offset > window_end + kMaxGap || end - window_start > kWindow) break;
      window_end = end;
      ++m;
    }
    groups.push_back({k, m, window_start, window_end});
    k = m;
  }

  // Each group is one read (a syscall of ~1 us for the usual ~100 bytes): spread them over
  // the pool. Every group records its own error and the first group's in file order is
  // raised, so a file with several bad headers always gets the same message.
  auto resolve = [&](const Group& g, std::vector<std::uint8_t>& window) {
    r.read_into(window, g.window_start, g.window_end - g.window_start);
    for (std::size_t j = g.begin; j < g.end; ++j) {
      ZipEntry& e = entries[order[j]];
      const std::uint8_t* h = window.data() + (e.header_offset - g.window_start);
      if (get32(h) != kLocalHeaderSig) {
        r.fail("record " + quote(e.name) + ": no local header at offset " + num(e.header_offset));
      }
      const std::uint64_t name_len = get16(h + 26);
      const std::uint64_t extra_len = get16(h + 28);
      if (name_len != e.name.size() ||
          std::memcmp(h + kLocalHeaderSize, e.name.data(), e.name.size()) != 0) {
        r.fail("record " + quote(e.name) + ": local header at offset " + num(e.header_offset) +
               " names a different record");
      }
      e.data_offset = e.header_offset + kLocalHeaderSize + name_len + extra_len;
      if (e.data_offset > cd_offset || e.size > cd_offset - e.data_offset) {
        r.fail("record " + quote(e.name) + " extends past the central directory (offset " +
               num(e.data_offset) + " + size " + num(e.size) + " > " + num(cd_offset) + ")");
      }
    }
  };
  // From the page cache a group costs about a microsecond, so a task takes at least 256 of
  // them. From the disk (a cold file: the middle group's page is not cached) each costs a
  // device round trip: up to kColdReaders threads of their own keep that many reads in
  // flight, instead of hundreds of round trips one after the other before the first payload
  // is read (0.3-0.9 s for the 293 records of a 710 MB file on the development VM).
  constexpr std::size_t kMinGroupsPerTask = 256;
  constexpr std::size_t kColdReaders = 32;
  const bool cold = groups.size() > 1 && !r.cached(groups[groups.size() / 2].window_start);
  if (cold && predict_cold && predict_data_offsets(entries, order, cd_offset)) return true;
  const std::size_t tasks =
      cold ? std::min(groups.size(), kColdReaders)
      : pool == nullptr
          ? 1
          : std::max<std::size_t>(1, std::min(pool->size(), groups.size() / kMinGroupsPerTask));
  std::vector<std::exception_ptr> errors(tasks);
  auto run_task = [&](std::size_t t) {
    std::vector<std::uint8_t> window;
    for (std::size_t g = groups.size() * t / tasks; g < groups.size() * (t + 1) / tasks; ++g) {
      try {
        resolve(groups[g], window);
      } catch (...) {
        errors[t] = std::current_exception();  // the task's first error in file order
        return;
      }
    }
  };
  if (tasks == 1) {
    run_task(0);
  } else if (cold || pool == nullptr) {
    run_on_own_threads(tasks, run_task);
  } else {
    pool->parallel_for(tasks, run_task);
  }
  for (const std::exception_ptr& e : errors) {
    if (e) std::rethrow_exception(e);
  }

  for (std::size_t i = 1; i < order.size(); ++i) {
    const ZipEntry& prev = entries[order[i - 1]];
    const ZipEntry& cur = entries[order[i]];
    if (cur.header_offset < prev.data_offset + prev.size) {
      r.fail("records " + quote(prev.name) + " (offset " + num(prev.header_offset) + " to " +
             num(prev.data_offset + prev.size) + ") and " + quote(cur.name) + " (offset " +
             num(cur.header_offset) + ") overlap");
    }
  }
  return false;
}

// ---------------------------------------------------------------- writing helpers

bool needs_zip64_size(std::uint64_t size) { return size >= kMax32; }
bool needs_zip64_offset(std::uint64_t offset) { return offset >= kMax32; }

std::uint16_t record_flags(std::uint64_t size) {
  return size == 0 ? kFlagUtf8 : static_cast<std::uint16_t>(kFlagUtf8 | kFlagDescriptor);
}

std::uint64_t central_extra_len(const PlannedRecord& rec) {
  const std::uint64_t values =
      (needs_zip64_size(rec.size) ? 2 : 0) + (needs_zip64_offset(rec.header_offset) ? 1 : 0);
  return values == 0 ? 0 : 4 + 8 * values;
}

[[noreturn]] void too_large() {
  throw InvalidArgument("plan_archive: archive size overflows 64 bits");
}

std::uint64_t checked_add(std::uint64_t a, std::uint64_t b) {
  if (b > UINT64_MAX - a) too_large();
  return a + b;
}

}  // namespace

// ---------------------------------------------------------------- reading

ZipDirectory read_zip_directory(const ByteSource& source, ThreadPool* pool, bool predict_cold) {
  const Reader r(source);
  const EndRecords end = read_end_records(r);
  if (end.cd_offset > end.end_start || end.cd_size > end.end_start - end.cd_offset) {
    r.fail("central directory (offset " + num(end.cd_offset) + ", size " + num(end.cd_size) +
           ") extends past the end records at offset " + num(end.end_start));
  }
  // Every entry takes at least 46 bytes, so the count can never justify a larger allocation
  // than the central directory itself.
  if (end.entry_count > end.cd_size / kCentralHeaderSize) {
    r.fail("end of central directory record declares " + num(end.entry_count) +
           " entries, more than a central directory of " + num(end.cd_size) + " bytes can hold");
  }
  ZipDirectory dir;
  dir.central_directory_offset = end.cd_offset;
  dir.entries = parse_central_directory(r, end);
  dir.prefix = archive_prefix(r, dir.entries);
  check_unique_names(r, dir.entries);
  dir.predicted = resolve_local_headers(r, dir.entries, end.cd_offset, pool, predict_cold);
  return dir;
}

bool looks_like_zip(const void* head, std::size_t n) noexcept {
  static const std::uint8_t kMagic[4] = {'P', 'K', 3, 4};
  return head != nullptr && n >= 4 && std::memcmp(head, kMagic, 4) == 0;
}

// ---------------------------------------------------------------- writing

void check_archive_name(const std::string& archive_name) {
  // A '/' would move the prefix the reader takes from the first name.
  if (archive_name.empty() || archive_name.find_first_of(std::string("/\0", 2)) !=
                                  std::string::npos) {
    throw InvalidArgument("plan_archive: archive name " + quote(archive_name) +
                          " must be non-empty and contain no '/' or NUL");
  }
}

PlannedRecord plan_record(const std::string& archive_name, const RecordSpec& spec,
                          std::uint64_t offset) {
  if (spec.name.empty() || spec.name.find('\0') != std::string::npos) {
    throw InvalidArgument("plan_archive: record name " + quote(spec.name) +
                          " must be non-empty and contain no NUL");
  }
  if (spec.alignment < 1 || spec.alignment > kMax16) {
    throw InvalidArgument("plan_archive: alignment " + num(spec.alignment) + " of record " +
                          quote(spec.name) + " is outside [1, 65535]");
  }
  PlannedRecord rec;
  rec.name = archive_name + "/" + spec.name;
  rec.size = spec.size;
  rec.header_offset = offset;
  if (rec.name.size() > kMax16) {
    throw InvalidArgument("plan_archive: record name " + quote(rec.name) +
                          " is longer than 65535 bytes");
  }

  // miniz quirk (docs/format.md, "Bytes of each record"): the local zip64 extra carries [usize, 0] for a big
  // record and the header offset for a far one, although the local sizes are 0 (bit 3).
  std::vector<std::uint8_t> z64;
  const bool big = needs_zip64_size(spec.size);
  const bool far = needs_zip64_offset(offset);
  if (big || far) {
    put16(z64, kZip64ExtraTag);
    put16(z64, 8 * ((big ? 2 : 0) + (far ? 1 : 0)));
    if (big) {
      put64(z64, spec.size);
      put64(z64, 0);
    }
    if (far) put64(z64, offset);
  }
  // caffe2::serialize::detail::getPadding: the 4 is the "FB" tag and its length field.
  const std::uint64_t unpadded =
      checked_add(offset, kLocalHeaderSize + rec.name.size() + z64.size() + 4);
  const std::uint64_t pad = (spec.alignment - unpadded % spec.alignment) % spec.alignment;
  const std::uint64_t extra_len = z64.size() + 4 + pad;
  if (extra_len > kMax16) {
    throw InvalidArgument("plan_archive: alignment " + num(spec.alignment) + " of record " +
                          quote(spec.name) + " needs " + num(pad) +
                          " bytes of padding, more than a zip extra field can hold");
  }

  std::vector<std::uint8_t>& h = rec.local_header;
  h.reserve(static_cast<std::size_t>(kLocalHeaderSize + rec.name.size() + extra_len - pad));
  put32(h, kLocalHeaderSig);
  put16(h, 0);                        // version needed
  put16(h, record_flags(spec.size));  // bit 3: CRC and sizes follow in a data descriptor
  put16(h, 0);                        // method: stored
  put16(h, 0);                        // time
  put16(h, 0);                        // date
  put32(h, 0);                        // crc
  put32(h, 0);                        // compressed size
  put32(h, 0);                        // uncompressed size
  put16(h, rec.name.size());
  put16(h, extra_len);
  h.insert(h.end(), rec.name.begin(), rec.name.end());
  h.insert(h.end(), z64.begin(), z64.end());
  h.push_back('F');
  h.push_back('B');
  put16(h, pad);
  rec.padding = static_cast<std::uint32_t>(pad);

  rec.data_offset = checked_add(offset, h.size() + pad);
  rec.descriptor_offset = checked_add(rec.data_offset, rec.size);
  rec.descriptor_size = spec.size == 0 ? 0 : (big || far ? 24 : 16);
  checked_add(rec.descriptor_offset, rec.descriptor_size);
  return rec;
}

const std::uint8_t* padding_bytes() noexcept {
  static const std::vector<std::uint8_t> bytes(kMaxPadding, kPaddingByte);
  return bytes.data();
}

std::vector<std::uint8_t> local_header_bytes(const PlannedRecord& record) {
  std::vector<std::uint8_t> out;
  out.reserve(record.local_header.size() + record.padding);
  out.insert(out.end(), record.local_header.begin(), record.local_header.end());
  out.insert(out.end(), record.padding, kPaddingByte);
  return out;
}

std::uint64_t record_end(const PlannedRecord& record) {
  return record.descriptor_offset + record.descriptor_size;
}

std::uint64_t archive_size(const std::vector<PlannedRecord>& records,
                           std::uint64_t central_directory_offset) {
  std::uint64_t size = central_directory_offset;
  for (const PlannedRecord& rec : records) {
    size = checked_add(size, kCentralHeaderSize + rec.name.size() + central_extra_len(rec));
  }
  return checked_add(size, kZip64EocdSize + kZip64LocatorSize + kEocdSize);
}

ArchiveLayout plan_archive(const std::string& archive_name,
                           const std::vector<RecordSpec>& records) {
  check_archive_name(archive_name);
  ArchiveLayout layout;
  layout.records.reserve(records.size());
  std::uint64_t pos = 0;
  for (const RecordSpec& spec : records) {
    layout.records.push_back(plan_record(archive_name, spec, pos));
    pos = record_end(layout.records.back());
  }
  layout.central_directory_offset = pos;
  layout.total_size = archive_size(layout.records, pos);
  return layout;
}

std::vector<std::uint8_t> data_descriptor(const PlannedRecord& record, std::uint32_t crc) {
  std::vector<std::uint8_t> out;
  if (record.descriptor_size == 0) {
    if (record.size != 0) throw InvalidArgument("data_descriptor: non-empty record without one");
    return out;
  }
  if (record.descriptor_size != 16 && record.descriptor_size != 24) {
    throw InvalidArgument("data_descriptor: descriptor size must be 0, 16 or 24");
  }
  out.reserve(record.descriptor_size);
  put32(out, kDescriptorSig);
  put32(out, crc);
  if (record.descriptor_size == 24) {
    put64(out, record.size);
    put64(out, record.size);
  } else {
    put32(out, record.size);
    put32(out, record.size);
  }
  return out;
}

std::vector<std::uint8_t> central_directory(const ArchiveLayout& layout,
                                            const std::vector<std::uint32_t>& crcs) {
  if (crcs.size() != layout.records.size()) {
    throw InvalidArgument("central_directory: " + num(crcs.size()) + " CRCs for " +
                          num(layout.records.size()) + " records");
  }
  std::vector<std::uint8_t> out;
  std::size_t reserve = kZip64EocdSize + kZip64LocatorSize + kEocdSize;
  for (const PlannedRecord& rec : layout.records) {
    reserve += kCentralHeaderSize + rec.name.size() + central_extra_len(rec);
  }
  out.reserve(reserve);

  for (std::size_t i = 0; i < layout.records.size(); ++i) {
    const PlannedRecord& rec = layout.records[i];
    const bool big = needs_zip64_size(rec.size);
    const bool far = needs_zip64_offset(rec.header_offset);
    const std::uint64_t extra_len = central_extra_len(rec);
    put32(out, kCentralHeaderSig);
    put16(out, 0);  // version made by
    put16(out, 0);  // version needed
    put16(out, record_flags(rec.size));
    put16(out, 0);  // method
    put16(out, 0);  // time
    put16(out, 0);  // date
    put32(out, rec.size == 0 ? 0 : crcs[i]);
    put32(out, big ? kMax32 : rec.size);
    put32(out, big ? kMax32 : rec.size);
    put16(out, rec.name.size());
    put16(out, extra_len);
    put16(out, 0);  // comment length
    put16(out, 0);  // disk number
    put16(out, 0);  // internal attributes
    put32(out, 0);  // external attributes
    put32(out, far ? kMax32 : rec.header_offset);
    out.insert(out.end(), rec.name.begin(), rec.name.end());
    if (extra_len != 0) {
      put16(out, kZip64ExtraTag);
      put16(out, extra_len - 4);
      if (big) {
        put64(out, rec.size);
        put64(out, rec.size);
      }
      if (far) put64(out, rec.header_offset);
    }
  }

  const std::uint64_t n = layout.records.size();
  const std::uint64_t cd_offset = layout.central_directory_offset;
  const std::uint64_t cd_size = out.size();
  const std::uint64_t z64_offset = cd_offset + cd_size;

  put32(out, kZip64EocdSig);
  put64(out, kZip64EocdSize - 12);  // size of the rest of this record
  put16(out, 0x031E);               // made by: unix, spec 3.0 (what miniz writes)
  put16(out, 45);                   // needed: 4.5, zip64
  put32(out, 0);                    // this disk
  put32(out, 0);                    // disk with the central directory
  put64(out, n);
  put64(out, n);
  put64(out, cd_size);
  put64(out, cd_offset);

  put32(out, kZip64LocatorSig);
  put32(out, 0);  // disk with the zip64 EOCD
  put64(out, z64_offset);
  put32(out, 1);  // total disks

  put32(out, kEocdSig);
  put16(out, 0);
  put16(out, 0);
  put16(out, std::min<std::uint64_t>(n, kMax16));
  put16(out, std::min<std::uint64_t>(n, kMax16));
  put32(out, std::min<std::uint64_t>(cd_size, kMax32));
  put32(out, std::min<std::uint64_t>(cd_offset, kMax32));
  put16(out, 0);  // comment length
  return out;
}

}  // namespace ckptio
