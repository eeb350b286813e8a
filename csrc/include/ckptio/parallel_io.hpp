// Parallel positional I/O over batches of ranges. Ranges longer than `chunk_bytes` are split;
// short ones are grouped, so each task moves about `chunk_bytes` and a batch of 20,000 small
// tensors costs a few dozen tasks, not 20,000.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "ckptio/byte_source.hpp"
#include "ckptio/file.hpp"
#include "ckptio/thread_pool.hpp"

namespace ckptio {

/// `length` bytes of the source at `offset` go to `dst` (caller-owned, alive for the call).
struct ReadRequest {
  std::uint64_t offset;
  std::uint64_t length;
  void* dst;
};

/// `length` bytes from `src` go to the file at `offset`.
struct WriteRequest {
  std::uint64_t offset;
  std::uint64_t length;
  const void* src;
};

/// The reads of one source in a multi-source batch.
struct SourceReads {
  const ByteSource* source;
  std::vector<ReadRequest> requests;
};

/// Fills every destination. Throws FormatError if a range lies past the end of the source
/// (checked for all ranges before any I/O), or the first I/O error met. When `crcs` is given
/// it receives, per request, the CRC-32 of the bytes read, computed from the destination
/// right after each step of kCrcStepBytes is read (while those bytes are still in the CPU's
/// cache) and combined per request.
///
/// When the source is out of the page cache (its middle request's first page), more threads
/// than the pool's wait on the device, and requests a few KiB apart are read as one run (one
/// vectored read, the gaps into scratch memory).
void read_ranges(const ByteSource& source, const std::vector<ReadRequest>& requests,
                 ThreadPool& pool, std::size_t chunk_bytes,
                 std::vector<std::uint32_t>* crcs = nullptr);

/// read_ranges over several sources (the shards of a model directory) as one plan: the
/// ranges of every source are split and grouped into tasks together, so eight small files
/// cost what one file of the same bytes costs. Every range of every source is checked first.
/// `crcs`, when given, receives one CRC-32 per request, the batches' requests in order.
void read_ranges_many(const std::vector<SourceReads>& batches, ThreadPool& pool,
                      std::size_t chunk_bytes, std::vector<std::uint32_t>* crcs = nullptr);

/// Bytes a checksummed read moves per pread before checksumming them: small enough that they
/// are still in the CPU's cache, large enough that the extra calls cost nothing measurable.
constexpr std::size_t kCrcStepBytes = std::size_t{1} << 20;

/// `length` bytes of a source at `offset`.
struct ByteRange {
  std::uint64_t offset;
  std::uint64_t length;
};

/// The CRC-32 of every range of `source`, read in parallel through per-task buffers of at most
/// kCrcStepBytes (nothing is kept): checks a file's records without loading them. Throws
/// FormatError for a range past the end (all checked before any read) or the first I/O error.
std::vector<std::uint32_t> checksum_ranges(const ByteSource& source,
                                           const std::vector<ByteRange>& ranges, ThreadPool& pool,
                                           std::size_t chunk_bytes);

/// Writes every range. Ranges that touch end to end go out in one pwritev. When `crcs` is
/// given it receives, per request, the CRC-32 of that request's bytes (computed chunk-wise in
/// parallel while writing, then combined).
void write_ranges(const File& file, const std::vector<WriteRequest>& requests, ThreadPool& pool,
                  std::size_t chunk_bytes, std::vector<std::uint32_t>* crcs = nullptr);

}  // namespace ckptio
