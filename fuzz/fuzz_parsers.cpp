// libFuzzer target over the C++ parsers that see untrusted bytes first: the zip directory
// reader (EOCD, zip64, central directory, local headers) and the pickle pre-scan. Built with
// clang++ -fsanitize=fuzzer,address,undefined by `make fuzz`.
//
// Contract checked on every input: either a ckptio::FormatError (the file's fault) or a
// directory whose every record lies inside the input; never a crash, a sanitizer report, an
// exception of another type, or a read outside the buffer.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "ckptio/byte_source.hpp"
#include "ckptio/errors.hpp"
#include "ckptio/pickle_scan.hpp"
#include "ckptio/zip.hpp"

namespace {

void scan_both_ways(const std::uint8_t* data, std::size_t size) {
  for (bool weights_only : {true, false}) {
    ckptio::PickleScanOptions options;
    options.weights_only = weights_only;
    try {
      const ckptio::PickleScan scan = ckptio::scan_pickle(data, size, options);
      if (scan.complete && (scan.end == 0 || scan.end > size)) std::abort();
    } catch (const ckptio::FormatError&) {
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // A copy of exactly `size` bytes, so that ASan sees any read past the end.
  std::vector<std::uint8_t> bytes(data, data + size);
  scan_both_ways(bytes.data(), bytes.size());
  try {
    const ckptio::MemorySource source(bytes.data(), bytes.size(), "<fuzz>");
    const ckptio::ZipDirectory dir = ckptio::read_zip_directory(source);
    for (const ckptio::ZipEntry& e : dir.entries) {
      if (e.data_offset > size || e.size > size - e.data_offset || e.header_offset > e.data_offset) {
        std::abort();  // a record outside the file passed validation
      }
      if (e.name.size() >= 8 && e.name.compare(e.name.size() - 8, 8, "data.pkl") == 0) {
        std::vector<std::uint8_t> pkl(e.size);
        source.read_exact(pkl.data(), pkl.size(), e.data_offset);
        scan_both_ways(pkl.data(), pkl.size());
      }
    }
  } catch (const ckptio::FormatError&) {
  }
  return 0;
}
