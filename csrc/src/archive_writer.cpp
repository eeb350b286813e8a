#include "ckptio/archive_writer.hpp"

#include <string>

#include "ckptio/detail/chunking.hpp"
#include "ckptio/errors.hpp"
#include "ckptio/parallel_io.hpp"

namespace ckptio {
namespace {

void check_inputs(const ArchiveLayout& layout, const std::vector<Payload>& payloads,
                  const WriteOptions& options) {
  if (options.chunk_bytes == 0) throw InvalidArgument("write_archive: chunk_bytes must be positive");
  if (payloads.size() != layout.records.size()) {
    throw InvalidArgument("write_archive: " + std::to_string(payloads.size()) + " payloads for " +
                          std::to_string(layout.records.size()) + " records");
  }
  for (std::size_t i = 0; i < payloads.size(); ++i) {
    const PlannedRecord& rec = layout.records[i];
    if (payloads[i].size != rec.size) {
      throw InvalidArgument("write_archive: payload of record '" + rec.name + "' has " +
                            std::to_string(payloads[i].size) + " bytes, the layout says " +
                            std::to_string(rec.size));
    }
    if (payloads[i].size != 0 && payloads[i].data == nullptr) {
      throw InvalidArgument("write_archive: payload of record '" + rec.name + "' is null");
    }
    if (rec.data_offset != rec.header_offset + rec.local_header.size() ||
        rec.descriptor_offset != rec.data_offset + rec.size) {
      throw InvalidArgument("write_archive: layout of record '" + rec.name +
                            "' is inconsistent; use plan_archive");
    }
  }
}

}  // namespace

std::vector<std::uint32_t> write_archive(const File& file, const ArchiveLayout& layout,
                                         const std::vector<Payload>& payloads, ThreadPool& pool,
                                         const WriteOptions& options) {
  check_inputs(layout, payloads, options);
  const std::size_t n = layout.records.size();

  // CRCs come first, in their own parallel pass, so that every descriptor is known before the
  // write: headers, payloads, descriptors and the central directory then lie end to end in the
  // file and go out as a few large pwritev calls, even for 20,000 tiny records. (Checksumming
  // inside the write tasks would leave each 16-byte descriptor to a pwrite of its own.)
  std::vector<std::uint32_t> crcs(n, 0);
  if (options.crc32) {
    std::vector<detail::CrcInput> inputs;
    inputs.reserve(n);
    for (const Payload& p : payloads) inputs.push_back(detail::CrcInput{p.data, p.size});
    crcs = detail::parallel_crc32(inputs, pool, options.chunk_bytes);
  }

  std::vector<std::uint8_t> descriptors;
  std::vector<std::size_t> descriptor_at(n);
  for (std::size_t i = 0; i < n; ++i) {
    descriptor_at[i] = descriptors.size();
    const std::vector<std::uint8_t> d = data_descriptor(layout.records[i], crcs[i]);
    descriptors.insert(descriptors.end(), d.begin(), d.end());
  }
  const std::vector<std::uint8_t> cd = central_directory(layout, crcs);
  if (layout.central_directory_offset + cd.size() != layout.total_size) {
    throw InvalidArgument("write_archive: layout total_size is inconsistent; use plan_archive");
  }

  if (options.preallocate) file.preallocate(layout.total_size);

  std::vector<WriteRequest> requests;
  requests.reserve(3 * n + 1);
  for (std::size_t i = 0; i < n; ++i) {
    const PlannedRecord& rec = layout.records[i];
    requests.push_back({rec.header_offset, rec.local_header.size(), rec.local_header.data()});
    requests.push_back({rec.data_offset, rec.size, payloads[i].data});
    requests.push_back(
        {rec.descriptor_offset, rec.descriptor_size, descriptors.data() + descriptor_at[i]});
  }
  requests.push_back({layout.central_directory_offset, cd.size(), cd.data()});
  write_ranges(file, requests, pool, options.chunk_bytes);
  return crcs;
}

}  // namespace ckptio
