// Writes a torch zip archive while its records are still being produced.
//
// Each record's place in the file is fixed when it is added (plan_record: the same bytes as
// plan_archive), so its header and payload can go out at once: worker threads write the
// records already added while the caller goes on producing the next ones (on save, the
// pickler finds the storages one by one). Records lying end to end go out together, in
// pwritev calls of up to chunk_bytes, so 20,000 small records cost a few hundred calls.
// finish() waits for the writes, then writes what only the end can know (CRCs of records
// split across calls, the central directory).
#pragma once

#include <array>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "ckptio/file.hpp"
#include "ckptio/zip.hpp"

namespace ckptio {

struct WriteOptions {
  /// Parallelism: threads - 1 workers write while the caller produces records; the caller
  /// joins them in finish(). 1 writes everything in finish().
  std::size_t threads = 1;
  std::size_t chunk_bytes = std::size_t{8} << 20;  ///< most bytes per write call
  bool crc32 = false;       ///< false writes 0 in every CRC field (torch ignores them)
  /// Also compute the CRC-32 of the whole file (file_crc32()), from the buffers as they are
  /// written: each payload's CRC (computed by the workers whether or not crc32 records it),
  /// combined with the CRCs of the headers, padding, descriptors and central directory.
  bool file_crc32 = false;
  bool preallocate = true;  ///< reserve disk space ahead of the writes
};

class ArchiveWriter {
 public:
  /// Writes into `file` (expected empty), which must outlive the writer.
  ArchiveWriter(const File& file, std::string archive_name, const WriteOptions& options);
  /// Abandons an unfinished archive (see abandon()).
  ~ArchiveWriter();
  ArchiveWriter(const ArchiveWriter&) = delete;
  ArchiveWriter& operator=(const ArchiveWriter&) = delete;

  /// Adds a record whose `size` bytes at `data` the caller keeps alive and unchanged until
  /// finish() or abandon() returns. Returns its index. Rethrows the error of a failed write.
  std::size_t add(const std::string& name, std::uint32_t alignment, const void* data,
                  std::uint64_t size);
  /// Adds a record holding a copy of `bytes`.
  std::size_t add_copy(const std::string& name, std::uint32_t alignment, std::string bytes);
  /// Adds a record whose payload the caller writes itself at data_offset(index) before
  /// finish() (a storage in device memory, streamed through a staging buffer).
  std::size_t reserve(const std::string& name, std::uint32_t alignment, std::uint64_t size);

  std::size_t record_count() const;
  /// Indices of the reserved records, in order.
  std::vector<std::size_t> reserved_records() const;
  std::uint64_t data_offset(std::size_t index) const;

  /// Waits for every write (the calling thread helps), then writes the data descriptors that
  /// needed a CRC and the central directory, and trims a preallocation that overshot.
  /// `reserved_crcs` gives the CRC of each reserved record (crc32 only). Returns the per-record
  /// CRCs (zeros when crc32 is off). Rethrows the first write error.
  std::vector<std::uint32_t> finish(
      const std::vector<std::pair<std::size_t, std::uint32_t>>& reserved_crcs = {});
  /// The CRC-32 of the whole file written, once finish() has returned (file_crc32 only).
  std::uint32_t file_crc32() const;
  /// Stops: no new write starts, and returns once the writes in flight have ended, so that
  /// the payloads may be freed. The file is left incomplete. Idempotent; never throws.
  void abandon() noexcept;

 private:
  struct Record {
    PlannedRecord plan;
    std::string owned;                     ///< add_copy's bytes
    std::array<std::uint8_t, 24> descriptor;  ///< descriptor_size bytes; CRC filled in later
    std::vector<std::uint32_t> piece_crcs; ///< CRCs of the pieces of a split record
    std::uint32_t crc = 0;
    bool reserved = false;                 ///< payload written by the caller
    bool descriptor_at_finish = false;     ///< written by finish() (needs a CRC not known yet)
  };
  struct Segment {
    const void* data;
    std::uint64_t size;
  };
  // Bytes that lie end to end from `offset`, written in one call (with its neighbours).
  struct Unit {
    std::uint64_t offset;
    Segment segments[4] = {};  ///< header, padding, payload, descriptor at most
    int count = 0;
    std::uint64_t bytes = 0;
    Record* record = nullptr;
    int crc_segment = -1;     ///< segment to checksum, or -1
    std::uint32_t* crc_out = nullptr;  ///< where that CRC goes
    bool fill_descriptor = false;      ///< then write it into record->descriptor first
  };

  std::size_t add_record(const std::string& name, std::uint32_t alignment, const void* data,
                         std::uint64_t size, std::string owned, bool reserved);
  void push(Unit unit);  // lock held
  void reserve_space(std::uint64_t end);  // lock held
  void work(bool finishing);
  void write_units(std::vector<Unit>& units);
  void stop_workers() noexcept;  // stops and joins the workers

  const File& file_;
  const std::string archive_name_;
  const WriteOptions options_;

  mutable std::mutex mutex_;
  std::condition_variable wake_;  // workers: a chunk's worth of units queued, or closing
  std::deque<Record> records_;       // stable addresses: units point into them
  std::deque<Unit> queue_;
  std::uint64_t queued_bytes_ = 0;
  std::uint64_t end_ = 0;       // where the next record's header goes
  std::uint64_t reserved_ = 0;  // bytes preallocated so far
  bool closing_ = false;
  bool stopped_ = false;        // abandoned or failed: write nothing more
  bool finished_ = false;
  std::uint32_t file_crc_ = 0;  // finish()'s, with options_.file_crc32
  std::exception_ptr error_;
  std::vector<std::thread> workers_;
};

}  // namespace ckptio
