#include "ckptio/archive_writer.hpp"

#include <sys/uio.h>

#include <algorithm>
#include <string>

#include "ckptio/checksum.hpp"
#include "ckptio/errors.hpp"

namespace ckptio {
namespace {

// Preallocation runs ahead of the records by a quarter of what is reserved, within these
// bounds: about ten fallocate calls for 700 MB, and at most 256 MiB reserved beyond the end
// (trimmed by finish(): freeing blocks is not free either).
constexpr std::uint64_t kMinReserveStep = std::uint64_t{64} << 20;
constexpr std::uint64_t kMaxReserveStep = std::uint64_t{256} << 20;

void put_crc(std::uint8_t* descriptor, std::uint32_t crc) {
  // The data descriptor is signature, then CRC (little-endian) at byte 4.
  for (int i = 0; i < 4; ++i) descriptor[4 + i] = static_cast<std::uint8_t>(crc >> (8 * i));
}

// `crc` extended by the CRC-32 of the `size` bytes at `data`, which follow it in the file.
std::uint32_t extend(std::uint32_t crc, const void* data, std::uint64_t size) {
  if (size == 0) return crc;
  return crc32_combine(crc, crc32_update(0, data, static_cast<std::size_t>(size)), size);
}

}  // namespace

ArchiveWriter::ArchiveWriter(const File& file, std::string archive_name,
                             const WriteOptions& options)
    : file_(file), archive_name_(std::move(archive_name)), options_(options) {
  check_archive_name(archive_name_);
  if (options_.chunk_bytes == 0) throw InvalidArgument("ArchiveWriter: chunk_bytes must be positive");
  if (options_.threads == 0) throw InvalidArgument("ArchiveWriter: threads must be positive");
  if ((options_.crc32 || options_.file_crc32) && !crc32_available()) {
    throw InvalidArgument("ckptio was built without zlib; CRC-32 is unavailable");
  }
  workers_.reserve(options_.threads - 1);
  try {
    for (std::size_t i = 1; i < options_.threads; ++i) workers_.emplace_back([this] { work(false); });
  } catch (...) {
    stop_workers();
    throw;
  }
}

ArchiveWriter::~ArchiveWriter() { abandon(); }

std::size_t ArchiveWriter::add(const std::string& name, std::uint32_t alignment, const void* data,
                               std::uint64_t size) {
  if (size != 0 && data == nullptr) {
    throw InvalidArgument("ArchiveWriter: payload of record '" + name + "' is null");
  }
  return add_record(name, alignment, data, size, std::string(), false);
}

std::size_t ArchiveWriter::add_copy(const std::string& name, std::uint32_t alignment,
                                    std::string bytes) {
  const std::uint64_t size = bytes.size();
  return add_record(name, alignment, nullptr, size, std::move(bytes), false);
}

std::size_t ArchiveWriter::reserve(const std::string& name, std::uint32_t alignment,
                                   std::uint64_t size) {
  return add_record(name, alignment, nullptr, size, std::string(), true);
}

std::size_t ArchiveWriter::add_record(const std::string& name, std::uint32_t alignment,
                                      const void* data, std::uint64_t size, std::string owned,
                                      bool reserved) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (error_) std::rethrow_exception(error_);
  if (closing_ || stopped_) throw InvalidArgument("ArchiveWriter: record added after finish");
  records_.emplace_back();
  Record& r = records_.back();
  try {
    r.plan = plan_record(archive_name_, RecordSpec{name, size, alignment}, end_);
    if (options_.preallocate) reserve_space(record_end(r.plan));
  } catch (...) {
    records_.pop_back();
    throw;
  }
  end_ = record_end(r.plan);
  r.owned = std::move(owned);
  if (!reserved && data == nullptr) data = r.owned.data();
  r.reserved = reserved;
  if (r.plan.descriptor_size != 0) {
    const std::vector<std::uint8_t> d = data_descriptor(r.plan, 0);
    std::copy(d.begin(), d.end(), r.descriptor.begin());
  }
  // `crc`: the payload is checksummed as it is written; `record`: its CRC goes into the
  // descriptor (else 0, and the descriptor goes out with the payload).
  const bool crc = (options_.crc32 || options_.file_crc32) && size != 0;
  const bool record = options_.crc32 && size != 0;
  const Segment header{r.plan.local_header.data(), r.plan.local_header.size()};
  const Segment padding{padding_bytes(), r.plan.padding};
  const Segment descriptor{r.descriptor.data(), r.plan.descriptor_size};

  if (reserved) {
    push(Unit{r.plan.header_offset, {header, padding}, 2, header.size + padding.size});
    if (r.plan.descriptor_size != 0) {
      if (record) {
        r.descriptor_at_finish = true;
      } else {
        push(Unit{r.plan.descriptor_offset, {descriptor}, 1, descriptor.size});
      }
    }
  } else if (size <= options_.chunk_bytes) {
    // Header, padding, payload and descriptor in one unit: a worker checksums the payload and fills the
    // descriptor in before writing them together.
    Unit u{r.plan.header_offset, {header, padding}, 2, header.size + padding.size};
    if (size != 0) {
      u.crc_segment = crc ? u.count : -1;
      u.segments[u.count++] = Segment{data, size};
      u.segments[u.count++] = descriptor;
      u.bytes += size + descriptor.size;
      u.record = &r;
      u.crc_out = &r.crc;
      u.fill_descriptor = record;
    }
    push(u);
  } else {
    // Split into chunk-sized pieces that any worker may write; with CRCs, each piece has its
    // own, combined (and the descriptor written) by finish().
    const std::uint64_t pieces = (size + options_.chunk_bytes - 1) / options_.chunk_bytes;
    if (crc) r.piece_crcs.assign(static_cast<std::size_t>(pieces), 0);
    const auto* bytes = static_cast<const std::uint8_t*>(data);
    for (std::uint64_t i = 0; i < pieces; ++i) {
      const std::uint64_t at = i * options_.chunk_bytes;
      const std::uint64_t len = std::min<std::uint64_t>(options_.chunk_bytes, size - at);
      Unit u{i == 0 ? r.plan.header_offset : r.plan.data_offset + at};
      if (i == 0) {
        u.segments[u.count++] = header;
        u.segments[u.count++] = padding;
        u.bytes += header.size + padding.size;
      }
      if (crc) {
        u.crc_segment = u.count;
        u.crc_out = &r.piece_crcs[static_cast<std::size_t>(i)];
      }
      u.segments[u.count++] = Segment{bytes + at, len};
      u.bytes += len;
      if (i + 1 == pieces && !record) {
        u.segments[u.count++] = descriptor;
        u.bytes += descriptor.size;
      }
      u.record = &r;
      push(u);
    }
    r.descriptor_at_finish = record;
  }
  return records_.size() - 1;
}

void ArchiveWriter::push(Unit unit) {
  queue_.push_back(unit);
  queued_bytes_ += unit.bytes;
  if (queued_bytes_ >= options_.chunk_bytes) wake_.notify_one();
}

void ArchiveWriter::reserve_space(std::uint64_t end) {
  if (end <= reserved_) return;
  const std::uint64_t step =
      std::clamp<std::uint64_t>(reserved_ / 4, kMinReserveStep, kMaxReserveStep);
  const std::uint64_t want = end + std::min(step, UINT64_MAX - end);
  try {
    file_.preallocate(want, reserved_);
    reserved_ = want;
  } catch (const IoError&) {
    // The step may not fit where the archive itself would: reserve exactly what it needs.
    file_.preallocate(end, reserved_);
    reserved_ = end;
  }
}

std::size_t ArchiveWriter::record_count() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return records_.size();
}

std::vector<std::size_t> ArchiveWriter::reserved_records() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::size_t> out;
  for (std::size_t i = 0; i < records_.size(); ++i) {
    if (records_[i].reserved) out.push_back(i);
  }
  return out;
}

std::uint64_t ArchiveWriter::data_offset(std::size_t index) const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (index >= records_.size()) throw InvalidArgument("ArchiveWriter: no record " + std::to_string(index));
  return records_[index].plan.data_offset;
}

void ArchiveWriter::work(bool finishing) {
  std::vector<Unit> batch;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      if (!finishing) {
        wake_.wait(lock, [&] {
          return stopped_ || closing_ || queued_bytes_ >= options_.chunk_bytes;
        });
      }
      if (stopped_) return;
      if (queue_.empty()) {
        if (closing_) return;
        continue;
      }
      // Units that lie end to end, up to chunk_bytes (a single unit may be a little more).
      std::uint64_t bytes = 0;
      do {
        const Unit& next = queue_.front();
        if (!batch.empty() && (next.offset != batch.back().offset + batch.back().bytes ||
                               bytes + next.bytes > options_.chunk_bytes)) {
          break;
        }
        bytes += next.bytes;
        batch.push_back(next);
        queue_.pop_front();
      } while (!queue_.empty());
      queued_bytes_ -= bytes;
    }
    try {
      write_units(batch);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
      stopped_ = true;
      wake_.notify_all();
    }
    batch.clear();
  }
}

void ArchiveWriter::write_units(std::vector<Unit>& units) {
  std::vector<struct iovec> iov;
  iov.reserve(units.size() * 4);
  for (Unit& u : units) {
    if (u.crc_segment >= 0) {
      const Segment& s = u.segments[u.crc_segment];
      *u.crc_out = crc32_update(0, s.data, static_cast<std::size_t>(s.size));
      if (u.fill_descriptor) put_crc(u.record->descriptor.data(), *u.crc_out);
    }
    for (int i = 0; i < u.count; ++i) {
      if (u.segments[i].size == 0) continue;
      iov.push_back({const_cast<void*>(u.segments[i].data), static_cast<std::size_t>(u.segments[i].size)});
    }
  }
  file_.writev_all(iov.data(), static_cast<int>(iov.size()), units.front().offset);
}

std::vector<std::uint32_t> ArchiveWriter::finish(
    const std::vector<std::pair<std::size_t, std::uint32_t>>& reserved_crcs) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closing_ || stopped_) {
      if (error_) std::rethrow_exception(error_);
      throw InvalidArgument("ArchiveWriter: finish called twice or after abandon");
    }
    closing_ = true;
  }
  wake_.notify_all();
  work(true);
  for (std::thread& t : workers_) t.join();
  workers_.clear();
  if (error_) std::rethrow_exception(error_);

  const std::size_t n = records_.size();
  for (const auto& [index, crc] : reserved_crcs) {
    if (index >= n || !records_[index].reserved) {
      throw InvalidArgument("ArchiveWriter::finish: record " + std::to_string(index) +
                            " is not a reserved record");
    }
    if (options_.crc32 || options_.file_crc32) records_[index].crc = crc;
  }
  std::vector<std::uint32_t> crcs(n, 0);
  std::uint32_t file_crc = 0;
  ArchiveLayout layout;
  layout.records.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    Record& r = records_[i];
    if (!r.piece_crcs.empty()) {
      std::uint32_t crc = r.piece_crcs[0];
      for (std::size_t p = 1; p < r.piece_crcs.size(); ++p) {
        const std::uint64_t len =
            std::min<std::uint64_t>(options_.chunk_bytes, r.plan.size - p * options_.chunk_bytes);
        crc = crc32_combine(crc, r.piece_crcs[p], len);
      }
      r.crc = crc;
    }
    if (options_.crc32) crcs[i] = r.crc;
    if (r.descriptor_at_finish) {
      const std::vector<std::uint8_t> d = data_descriptor(r.plan, r.crc);
      file_.write_all(d.data(), d.size(), r.plan.descriptor_offset);
    }
    if (options_.file_crc32) {
      // The record's bytes in file order: header, padding, payload, descriptor.
      const PlannedRecord& p = r.plan;
      file_crc = extend(file_crc, p.local_header.data(), p.local_header.size());
      file_crc = extend(file_crc, padding_bytes(), p.padding);
      if (p.size != 0) file_crc = crc32_combine(file_crc, r.crc, p.size);
      if (p.descriptor_size != 0) {
        const std::vector<std::uint8_t> d = data_descriptor(p, crcs[i]);
        file_crc = extend(file_crc, d.data(), d.size());
      }
    }
    layout.records.push_back(std::move(r.plan));
  }
  records_.clear();
  layout.central_directory_offset = end_;
  layout.total_size = archive_size(layout.records, end_);
  const std::vector<std::uint8_t> cd = central_directory(layout, crcs);
  file_.write_all(cd.data(), cd.size(), end_);
  if (reserved_ > layout.total_size) file_.truncate(layout.total_size);
  if (options_.file_crc32) file_crc_ = extend(file_crc, cd.data(), cd.size());
  finished_ = true;
  return crcs;
}

std::uint32_t ArchiveWriter::file_crc32() const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!options_.file_crc32) throw InvalidArgument("ArchiveWriter: file_crc32 was not requested");
  if (!finished_) throw InvalidArgument("ArchiveWriter: file_crc32 before finish");
  return file_crc_;
}

void ArchiveWriter::abandon() noexcept {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (finished_) return;
  }
  stop_workers();
}

void ArchiveWriter::stop_workers() noexcept {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopped_ = true;
  }
  wake_.notify_all();
  for (std::thread& t : workers_) {
    if (t.joinable()) t.join();
  }
  workers_.clear();
}

}  // namespace ckptio
