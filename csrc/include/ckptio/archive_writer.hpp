// Writes a planned archive to a file in parallel: every offset is known before the first
// byte, so headers and payloads go out from the thread pool at once; descriptors and the
// central directory follow once the CRCs (if wanted) are known.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "ckptio/file.hpp"
#include "ckptio/thread_pool.hpp"
#include "ckptio/zip.hpp"

namespace ckptio {

/// The bytes of one record; caller-owned and unchanged for the duration of the write.
struct Payload {
  const void* data;
  std::uint64_t size;
};

struct WriteOptions {
  std::size_t chunk_bytes = std::size_t{8} << 20;
  bool crc32 = false;    ///< false writes 0 in every CRC field (torch ignores them)
  bool preallocate = true;
};

/// Writes the file `layout` describes into `file` (expected empty). payloads[i] must have
/// layout.records[i].size bytes, else InvalidArgument. Returns the per-record CRCs (zeros
/// when crc32 is off).
std::vector<std::uint32_t> write_archive(const File& file, const ArchiveLayout& layout,
                                         const std::vector<Payload>& payloads, ThreadPool& pool,
                                         const WriteOptions& options);

}  // namespace ckptio
