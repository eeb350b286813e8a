// The zip container: reading a directory, planning an archive, writing it in parallel, CRC-32.
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "ckptio/archive_writer.hpp"
#include "ckptio/checksum.hpp"
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
py::tuple directory_tuple(const ZipDirectory& dir) {
  py::dict records;
  const std::size_t skip = dir.prefix.size();
  for (const ZipEntry& e : dir.entries) {
    // archive_prefix() checked that every name starts with the prefix.
    records[py::str(e.name.data() + skip, e.name.size() - skip)] =
        py::make_tuple(e.data_offset, e.size, e.method);
  }
  return py::make_tuple(dir.prefix, records);
}

/// One payload: a bytes-like object, or an (address, nbytes) pair of memory the caller owns.
struct HeldPayloads {
  std::vector<py::buffer_info> views;
  std::vector<Payload> payloads;
};

HeldPayloads hold_payloads(const py::list& items) {
  HeldPayloads held;
  held.views.reserve(items.size());
  held.payloads.reserve(items.size());
  for (const py::handle item : items) {
    if (PyTuple_CheckExact(item.ptr()) && PyTuple_GET_SIZE(item.ptr()) == 2) {
      // The common case, once per storage: read the two ints without pybind11's casters.
      const unsigned long long address = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item.ptr(), 0));
      if (address == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
        throw py::error_already_set();
      }
      const unsigned long long size = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item.ptr(), 1));
      if (size == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
        throw py::error_already_set();
      }
      held.payloads.push_back(Payload{reinterpret_cast<const void*>(static_cast<std::uintptr_t>(address)),
                                      static_cast<std::uint64_t>(size)});
    } else if (py::isinstance<py::tuple>(item)) {
      auto pair = item.cast<std::tuple<std::uintptr_t, std::uint64_t>>();
      held.payloads.push_back(
          Payload{reinterpret_cast<const void*>(std::get<0>(pair)), std::get<1>(pair)});
    } else {
      py::buffer_info info = py::reinterpret_borrow<py::buffer>(item).request();
      if (info.ndim > 1 || (info.ndim == 1 && info.strides[0] != info.itemsize)) {
        throw InvalidArgument("payload buffers must be contiguous");
      }
      held.payloads.push_back(
          Payload{info.ptr, static_cast<std::uint64_t>(info.size * info.itemsize)});
      held.views.push_back(std::move(info));
    }
  }
  return held;
}

}  // namespace

void register_zip(py::module_& m) {
  m.def("looks_like_zip", [](const py::bytes& head) {
    std::string s = head;
    return looks_like_zip(s.data(), s.size());
  });

  m.def(
      "read_zip_directory",
      [](const File& file, std::size_t threads) {
        ZipDirectory dir;
        {
          py::gil_scoped_release nogil;
          auto pool = threads > 1 ? shared_pool(threads) : nullptr;
          dir = read_zip_directory(file, pool.get());
        }
        return directory_tuple(dir);
      },
      py::arg("source"), py::arg("threads") = 1,
      "Parses and validates the container: (prefix, {name: (data_offset, size, method)}), "
      "names relative to the prefix.");
  m.def(
      "read_zip_directory",
      [](const BufferSource& buffer, std::size_t /*threads*/) {
        ZipDirectory dir;
        {
          py::gil_scoped_release nogil;
          dir = read_zip_directory(buffer.source());  // memory: nothing to wait for
        }
        return directory_tuple(dir);
      },
      py::arg("source"), py::arg("threads") = 1);

  py::class_<ArchiveLayout>(m, "ArchiveLayout")
      .def_property_readonly("total_size", [](const ArchiveLayout& l) { return l.total_size; })
      .def_property_readonly("central_directory_offset",
                             [](const ArchiveLayout& l) { return l.central_directory_offset; })
      .def_property_readonly("data_offsets",
                             [](const ArchiveLayout& l) {
                               std::vector<std::uint64_t> out;
                               out.reserve(l.records.size());
                               for (const auto& r : l.records) out.push_back(r.data_offset);
                               return out;
                             })
      .def("__len__", [](const ArchiveLayout& l) { return l.records.size(); })
      .def("local_header",
           [](const ArchiveLayout& l, std::size_t i) { return to_bytes(l.records.at(i).local_header); })
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

  m.def(
      "write_archive",
      [](const File& file, const ArchiveLayout& layout, const py::list& payloads,
         std::size_t threads, std::size_t chunk_bytes, bool crc32, bool preallocate) {
        HeldPayloads held = hold_payloads(payloads);
        WriteOptions options;
        options.chunk_bytes = chunk_bytes;
        options.crc32 = crc32;
        options.preallocate = preallocate;
        py::gil_scoped_release nogil;
        auto pool = shared_pool(threads);
        return write_archive(file, layout, held.payloads, *pool, options);
      },
      py::arg("file"), py::arg("layout"), py::arg("payloads"), py::arg("threads"),
      py::arg("chunk_bytes"), py::arg("crc32"), py::arg("preallocate"),
      "Writes the planned archive with parallel pwrite; payloads are bytes-like objects or "
      "(address, nbytes) pairs. Returns the CRC of each record (0s when crc32 is False).");

  m.def("crc32_available", &crc32_available);
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
