// The zip container: reading a directory, planning an archive, writing it while records are
// added, CRC-32.
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "ckptio/archive_writer.hpp"
#include "ckptio/checksum.hpp"
#include "ckptio/detail/chunking.hpp"
#include "ckptio/errors.hpp"
#include "ckptio/file.hpp"
#include "ckptio/thread_pool.hpp"
#include "ckptio/zip.hpp"
#include "register.hpp"
#include "sources.hpp"

namespace py = pybind11;

namespace ckptio::bindings {

namespace {

py::bytes to_bytes(const std::vector<std::uint8_t>& v) {
  return py::bytes(reinterpret_cast<const char*>(v.data()), v.size());
}

/// (prefix, {name: (data_offset, size, method)}), names without the prefix: the one shape the
/// loader needs, built here because 20,000 records made into Python objects one by one cost
/// more than parsing them.
py::tuple directory_tuple(const ZipDirectory& dir, bool with_crcs) {
  py::dict records;
  py::dict crcs;
  const std::size_t skip = dir.prefix.size();
  for (const ZipEntry& e : dir.entries) {
    // archive_prefix() checked that every name starts with the prefix.
    py::str name(e.name.data() + skip, e.name.size() - skip);
    records[name] = py::make_tuple(e.data_offset, e.size, e.method);
    if (with_crcs) crcs[name] = py::int_(e.crc32);
  }
  if (with_crcs) return py::make_tuple(dir.prefix, records, crcs);
  return py::make_tuple(dir.prefix, records);
}

/// One offset of every planned record (`member`: data_offset or header_offset), in order.
std::vector<std::uint64_t> record_offsets(const ArchiveLayout& l,
                                          std::uint64_t PlannedRecord::*member) {
  std::vector<std::uint64_t> out;
  out.reserve(l.records.size());
  for (const auto& r : l.records) out.push_back(r.*member);
  return out;
}

}  // namespace

void register_zip(py::module_& m) {
  m.def("looks_like_zip", [](const py::bytes& head) {
    std::string s = head;
    return looks_like_zip(s.data(), s.size());
  });

  m.def(
      "read_zip_directory",
      [](const File& file, std::size_t threads, bool crcs, bool predict_cold) -> py::tuple {
        ZipDirectory dir;
        {
          py::gil_scoped_release nogil;
          auto pool = threads > 1 ? shared_pool(threads) : nullptr;
          dir = read_zip_directory(file, pool.get(), predict_cold);
        }
        py::tuple out = directory_tuple(dir, crcs);
        if (!predict_cold) return out;
        return py::make_tuple(out[0], out[1], crcs ? py::object(out[2]) : py::none(),
                              dir.predicted);
      },
      py::arg("source"), py::arg("threads") = 1, py::arg("crcs") = false,
      py::arg("predict_cold") = false,
      "Parses and validates the container: (prefix, {name: (data_offset, size, method)}), "
      "names relative to the prefix; with crcs, a third item {name: CRC-32 the central "
      "directory declares}. With predict_cold: (prefix, records, crcs or None, predicted), "
      "where predicted says the data offsets of a cold file were predicted from its layout "
      "and its local headers are unchecked (csrc zip.hpp).");
  m.def(
      "read_zip_directory",
      [](const BufferSource& buffer, std::size_t /*threads*/, bool crcs) {
        ZipDirectory dir;
        {
          py::gil_scoped_release nogil;
          dir = read_zip_directory(buffer.source());  // memory: nothing to wait for
        }
        return directory_tuple(dir, crcs);
      },
      py::arg("source"), py::arg("threads") = 1, py::arg("crcs") = false);

  py::class_<ArchiveLayout>(m, "ArchiveLayout")
      .def_property_readonly("total_size", [](const ArchiveLayout& l) { return l.total_size; })
      .def_property_readonly("central_directory_offset",
                             [](const ArchiveLayout& l) { return l.central_directory_offset; })
      .def_property_readonly("data_offsets",
                             [](const ArchiveLayout& l) {
                               return record_offsets(l, &PlannedRecord::data_offset);
                             })
      .def_property_readonly("header_offsets",
                             [](const ArchiveLayout& l) {
                               return record_offsets(l, &PlannedRecord::header_offset);
                             })
      .def("__len__", [](const ArchiveLayout& l) { return l.records.size(); })
      .def("local_header",
           [](const ArchiveLayout& l, std::size_t i) {
             return to_bytes(local_header_bytes(l.records.at(i)));
           })
      .def("data_descriptor",
           [](const ArchiveLayout& l, std::size_t i, std::uint32_t crc) {
             return to_bytes(data_descriptor(l.records.at(i), crc));
           })
      .def("central_directory", [](const ArchiveLayout& l, const std::vector<std::uint32_t>& crcs) {
        if (crcs.size() != l.records.size()) throw InvalidArgument("one CRC per record");
        return to_bytes(central_directory(l, crcs));
      });

  m.def(
      "plan_archive",
      [](const std::string& archive_name,
         const std::vector<std::tuple<std::string, std::uint64_t, std::uint32_t>>& records) {
        std::vector<RecordSpec> specs;
        specs.reserve(records.size());
        for (const auto& [name, size, alignment] : records) specs.push_back({name, size, alignment});
        return plan_archive(archive_name, specs);
      },
      py::arg("archive_name"), py::arg("records"),
      "Lays out an archive of (name, size, alignment) records exactly as torch's writer does.");

  py::class_<ArchiveWriter>(m, "ArchiveWriter")
      .def(py::init([](const File& file, const std::string& archive_name, std::size_t threads,
                       std::size_t chunk_bytes, bool crc32, bool preallocate, bool file_crc32) {
             WriteOptions options;
             options.threads = threads;
             options.chunk_bytes = chunk_bytes;
             options.crc32 = crc32;
             options.preallocate = preallocate;
             options.file_crc32 = file_crc32;
             return new ArchiveWriter(file, archive_name, options);
           }),
           py::arg("file"), py::arg("archive_name"), py::arg("threads"), py::arg("chunk_bytes"),
           py::arg("crc32"), py::arg("preallocate"), py::arg("file_crc32") = false,
           py::keep_alive<1, 2>(),
           "Writes a torch archive into `file` (new and empty) while records are added: "
           "threads - 1 workers write the records already added; finish() joins them. With "
           "file_crc32, file_crc32() gives the whole file's CRC-32 once finished.")
      .def(
          "add",
          [](ArchiveWriter& w, const std::string& name, std::uint32_t alignment,
             std::uintptr_t address, std::uint64_t nbytes) {
            return w.add(name, alignment, reinterpret_cast<const void*>(address), nbytes);
          },
          py::arg("name"), py::arg("alignment"), py::arg("address"), py::arg("nbytes"),
          "Adds a record of the `nbytes` at `address`, which the caller keeps alive and "
          "unchanged until finish() or abandon() returns. Returns its index.")
      .def(
          "add_bytes",
          [](ArchiveWriter& w, const std::string& name, std::uint32_t alignment,
             const py::buffer& data) {
            py::buffer_info info = data.request();
            if (info.ndim > 1 || (info.ndim == 1 && info.strides[0] != info.itemsize)) {
              throw InvalidArgument("add_bytes: the payload buffer must be contiguous");
            }
            std::string copy(static_cast<const char*>(info.ptr),
                             static_cast<std::size_t>(info.size * info.itemsize));
            return w.add_copy(name, alignment, std::move(copy));
          },
          py::arg("name"), py::arg("alignment"), py::arg("data"),
          "Adds a record holding a copy of the bytes-like `data`. Returns its index.")
      .def("reserve", &ArchiveWriter::reserve, py::arg("name"), py::arg("alignment"),
           py::arg("nbytes"),
           "Adds a record whose payload the caller writes at data_offset(index) before "
           "finish(). Returns its index.")
      .def("data_offset", &ArchiveWriter::data_offset, py::arg("index"))
      .def("reserved", &ArchiveWriter::reserved_records, "Indices of the reserved records.")
      .def("__len__", &ArchiveWriter::record_count)
      .def(
          "finish",
          [](ArchiveWriter& w, const std::vector<std::pair<std::size_t, std::uint32_t>>& crcs) {
            py::gil_scoped_release nogil;
            return w.finish(crcs);
          },
          py::arg("reserved_crcs") = std::vector<std::pair<std::size_t, std::uint32_t>>{},
          "Waits for the writes, then writes the central directory. `reserved_crcs`: (index, "
          "crc) of reserved records (crc32 only). Returns each record's CRC (0s without crc32).")
      .def("file_crc32", &ArchiveWriter::file_crc32,
           "The CRC-32 of the whole file, combined from the CRCs of the bytes written (every "
           "payload's computed by the workers as it went out); after finish(), file_crc32 only.")
      .def(
          "abandon",
          [](ArchiveWriter& w) {
            py::gil_scoped_release nogil;
            w.abandon();
          },
          "Stops writing and returns once no write is in flight; the file is incomplete.");

  m.def("crc32_available", &crc32_available);
  m.def("crc32_implementation", &crc32_implementation,
        "How this CPU computes CRC-32: 'vpclmulqdq', 'pclmulqdq', 'zlib' or 'table'.");
  m.def("crc32_combine", &crc32_combine, py::arg("crc_a"), py::arg("crc_b"), py::arg("len_b"),
        "CRC-32 of A||B from crc(A), crc(B) and len(B).");
  m.def(
      "crc32_ranges",
      [](const py::buffer& data, const py::buffer& ranges, std::size_t threads,
         std::size_t chunk_bytes) {
        py::buffer_info info = data.request();
        py::buffer_info r = ranges.request();
        if (r.ndim != 1 || r.itemsize != 8 || r.strides[0] != 8 || r.size % 2 != 0) {
          throw InvalidArgument("ranges must be a flat uint64 buffer of (offset, length) pairs");
        }
        const auto size = static_cast<std::uint64_t>(info.size * info.itemsize);
        const auto* values = static_cast<const std::uint64_t*>(r.ptr);
        std::vector<detail::CrcInput> inputs(static_cast<std::size_t>(r.size / 2));
        for (std::size_t i = 0; i < inputs.size(); ++i) {
          const std::uint64_t offset = values[2 * i], length = values[2 * i + 1];
          if (offset > size || length > size - offset) {
            throw InvalidArgument("crc32_ranges: a range runs past the end of the buffer");
          }
          inputs[i] = {static_cast<const std::uint8_t*>(info.ptr) + offset, length};
        }
        py::gil_scoped_release nogil;
        auto pool = shared_pool(threads);
        return detail::parallel_crc32(inputs, *pool, chunk_bytes);
      },
      py::arg("data"), py::arg("ranges"), py::arg("threads"), py::arg("chunk_bytes"),
      "CRC-32 of each (offset, length) range of a buffer (a mapping: touches every page of "
      "the ranges), in parallel with the GIL released.");
  m.def(
      "crc32",
      [](const py::buffer& data, std::uint32_t value) {
        py::buffer_info info = data.request();
        const auto n = static_cast<std::size_t>(info.size * info.itemsize);
        py::gil_scoped_release nogil;
        return crc32_update(value, info.ptr, n);
      },
      py::arg("data"), py::arg("value") = 0, "CRC-32 (zip polynomial), continuing from value.");
}

}  // namespace ckptio::bindings
