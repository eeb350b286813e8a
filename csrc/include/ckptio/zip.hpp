// The zip container as torch uses it: reading the directory of any stored (uncompressed) zip,
// and planning the exact bytes torch's writer (miniz with zip64) emits, at any alignment.
// See docs/format.md and shared TORCH_FORMAT.md §1.3.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ckptio/byte_source.hpp"
#include "ckptio/thread_pool.hpp"

namespace ckptio {

// ---------------------------------------------------------------- reading

struct ZipEntry {
  std::string name;            ///< full name, prefix included ("archive/data/0")
  std::uint64_t header_offset; ///< offset of the local header
  std::uint64_t data_offset;   ///< first payload byte (from the local header's lengths)
  std::uint64_t size;          ///< payload bytes (compressed size; equals size when stored)
  std::uint64_t uncompressed_size;
  std::uint32_t crc32;
  std::uint16_t method;        ///< 0 = stored; anything else is reported, not decoded
};

struct ZipDirectory {
  std::string prefix;                 ///< "<archive>/" taken from the first entry
  std::vector<ZipEntry> entries;      ///< in central-directory order
  std::uint64_t central_directory_offset;
};

/// Parses the end records (EOCD, zip64 locator and zip64 EOCD), the central directory and
/// each local header. Validates every offset, size and count against the source size: each
/// record lies wholly before the central directory, records do not overlap, names are unique
/// and all share the first entry's "<archive>/" prefix, counts agree. Throws FormatError
/// naming the source and the problem. With a pool, the local headers (one read per record
/// whose neighbours lie more than a few KiB away) are read in parallel; the result and the
/// error raised for a bad file are the same either way.
ZipDirectory read_zip_directory(const ByteSource& source, ThreadPool* pool = nullptr);

/// True if `head` (at least 4 bytes) starts with a local file header signature.
bool looks_like_zip(const void* head, std::size_t n) noexcept;

// ---------------------------------------------------------------- writing

struct RecordSpec {
  std::string name;        ///< relative name ("data.pkl", "data/0"); the writer adds "<archive>/"
  std::uint64_t size;
  std::uint32_t alignment; ///< payload start is a multiple of this (1..65535)
};

struct PlannedRecord {
  std::string name;                      ///< full name
  std::uint64_t size;
  std::uint64_t header_offset;
  std::uint64_t data_offset;             ///< == header_offset + local_header.size()
  std::uint64_t descriptor_offset;       ///< == data_offset + size
  std::uint32_t descriptor_size;         ///< 0 (empty record), 16, or 24 (zip64)
  std::vector<std::uint8_t> local_header;///< signature..name..extra incl. "FB" padding
};

struct ArchiveLayout {
  std::vector<PlannedRecord> records;    ///< in file order
  std::uint64_t central_directory_offset;///< == end of the last record's descriptor
  std::uint64_t total_size;              ///< whole file
};

/// Computes every header, pad and offset of an archive holding `records` in this order,
/// byte-for-byte as torch's writer lays them out (TORCH_FORMAT.md §1.3).
ArchiveLayout plan_archive(const std::string& archive_name, const std::vector<RecordSpec>& records);

/// The data descriptor of a record (empty vector for an empty record).
std::vector<std::uint8_t> data_descriptor(const PlannedRecord& record, std::uint32_t crc);

/// Central directory + zip64 EOCD + zip64 locator + EOCD; crcs[i] belongs to records[i].
std::vector<std::uint8_t> central_directory(const ArchiveLayout& layout,
                                            const std::vector<std::uint32_t>& crcs);

}  // namespace ckptio
