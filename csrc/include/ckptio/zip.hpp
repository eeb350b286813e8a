// The zip container as torch uses it: reading the directory of any stored (uncompressed) zip,
// and planning the exact bytes torch's writer (miniz with zip64) emits, at any alignment.
// See docs/format.md, "Bytes of each record".
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
  std::uint16_t flags = 0;     ///< general purpose bit flag (central directory)
};

struct ZipDirectory {
  std::string prefix;                 ///< "<archive>/" taken from the first entry
  std::vector<ZipEntry> entries;      ///< in central-directory order
  std::uint64_t central_directory_offset;
  /// The data offsets were predicted from the layout, not read from the local headers
  /// (read_zip_directory's `predict_cold`): nothing about the local headers is checked yet.
  bool predicted = false;
};

/// Parses the end records (EOCD, zip64 locator and zip64 EOCD), the central directory and
/// each local header. Validates every offset, size and count against the source size: each
/// record lies wholly before the central directory, records do not overlap, names are unique
/// and all share the first entry's "<archive>/" prefix, counts agree. Throws FormatError
/// naming the source and the problem. With a pool, the local headers (one read per record
/// whose neighbours lie more than a few KiB away) are read in parallel; the result and the
/// error raised for a bad file are the same either way.
///
/// With `predict_cold`, when the source is out of the page cache and its records lie one
/// after the other as torch's writer (and ckptio's) lays them out, each payload offset is
/// predicted instead of read: it ends where the record's data descriptor, and then the next
/// record (or the central directory), begins. The result has `predicted` set and its local
/// headers unchecked: a caller must compare it with a full read_zip_directory (the headers'
/// pages are then mostly cached by the payload reads) before trusting what it read. A cold
/// file of thousands of small records thus skips one random read per record before its
/// first payload read.
ZipDirectory read_zip_directory(const ByteSource& source, ThreadPool* pool = nullptr,
                                bool predict_cold = false);

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
  std::uint64_t data_offset;             ///< == header_offset + local_header.size() + padding
  std::uint64_t descriptor_offset;       ///< == data_offset + size
  std::uint32_t descriptor_size;         ///< 0 (empty record), 16, or 24 (zip64)
  /// Signature..name..extra up to the "FB" field's length; `padding` bytes 'Z' follow (the
  /// field's data), kept out so that 20,000 records aligned to 4 KiB do not hold 80 MB of 'Z'.
  std::vector<std::uint8_t> local_header;
  std::uint32_t padding;
};

/// The padding byte of the "FB" extra field; kMaxPadding of them in a row.
inline constexpr std::uint8_t kPaddingByte = 'Z';
inline constexpr std::uint32_t kMaxPadding = 0xFFFF;
/// kMaxPadding padding bytes, for writers to point at.
const std::uint8_t* padding_bytes() noexcept;

/// The whole local header of `record`: local_header, then its padding.
std::vector<std::uint8_t> local_header_bytes(const PlannedRecord& record);

struct ArchiveLayout {
  std::vector<PlannedRecord> records;    ///< in file order
  std::uint64_t central_directory_offset;///< == end of the last record's descriptor
  std::uint64_t total_size;              ///< whole file
};

/// Computes every header, pad and offset of an archive holding `records` in this order,
/// byte-for-byte as torch's writer lays them out (docs/format.md, "Bytes of each record").
ArchiveLayout plan_archive(const std::string& archive_name, const std::vector<RecordSpec>& records);

/// Throws InvalidArgument unless `archive_name` is non-empty with no '/' or NUL.
void check_archive_name(const std::string& archive_name);

/// One record of plan_archive: `spec` laid out with its local header at `offset` (where the
/// previous record ends). Throws InvalidArgument for a bad name or alignment.
PlannedRecord plan_record(const std::string& archive_name, const RecordSpec& spec,
                          std::uint64_t offset);

/// Where the next record (or the central directory) starts after `record`.
std::uint64_t record_end(const PlannedRecord& record);

/// The whole file's size when `records` end at `central_directory_offset`.
std::uint64_t archive_size(const std::vector<PlannedRecord>& records,
                           std::uint64_t central_directory_offset);

/// The data descriptor of a record (empty vector for an empty record).
std::vector<std::uint8_t> data_descriptor(const PlannedRecord& record, std::uint32_t crc);

/// Central directory + zip64 EOCD + zip64 locator + EOCD; crcs[i] belongs to records[i].
std::vector<std::uint8_t> central_directory(const ArchiveLayout& layout,
                                            const std::vector<std::uint32_t>& crcs);

}  // namespace ckptio
