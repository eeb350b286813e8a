// Files, in-memory sources, parallel reads and memory mappings.
//
// Ownership across the boundary: a read request carries a raw destination address; the Python
// caller keeps the owning tensor alive for the call. A Mapping is held by a shared_ptr that the
// Python object owns; every tensor made from its buffer keeps that Python object alive.
#include <pybind11/stl.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ckptio/byte_source.hpp"
#include "ckptio/errors.hpp"
#include "ckptio/file.hpp"
#include "ckptio/memory.hpp"
#include "ckptio/mmap.hpp"
#include "ckptio/parallel_io.hpp"
#include "ckptio/thread_pool.hpp"
#include "register.hpp"
#include "requests.hpp"
#include "sources.hpp"

namespace py = pybind11;

namespace ckptio::bindings {

namespace {

py::bytes pread_bytes(const ByteSource& source, std::uint64_t offset, std::uint64_t n) {
  if (n > source.size()) {
    throw FormatError(source.name() + ": a record of " + std::to_string(n) +
                      " bytes cannot fit in a file of " + std::to_string(source.size()));
  }
  std::string out(n, '\0');
  {
    py::gil_scoped_release nogil;
    source.read_exact(out.data(), n, offset);
  }
  return py::bytes(out);
}

/// None, or the CRC-32 of each request as a list (crc32=True).
py::object crc_list(const std::vector<std::uint32_t>* crcs) {
  if (crcs == nullptr) return py::none();
  py::list out(crcs->size());
  for (std::size_t i = 0; i < crcs->size(); ++i) out[i] = py::int_((*crcs)[i]);
  return std::move(out);
}

py::object read_into(const ByteSource& source, const py::buffer& requests, std::size_t threads,
                     std::size_t chunk_bytes, std::uintptr_t base, bool crc32) {
  std::vector<ReadRequest> batch = parse_read_requests(requests);
  if (base != 0) {
    for (ReadRequest& r : batch) {
      r.dst = reinterpret_cast<void*>(base + reinterpret_cast<std::uintptr_t>(r.dst));
    }
  }
  std::vector<std::uint32_t> crcs;
  {
    py::gil_scoped_release nogil;
    auto pool = shared_pool(threads);
    read_ranges(source, batch, *pool, chunk_bytes, crc32 ? &crcs : nullptr);
  }
  return crc_list(crc32 ? &crcs : nullptr);
}

std::vector<std::uint32_t> checksum(const ByteSource& source, const py::buffer& ranges,
                                    std::size_t threads, std::size_t chunk_bytes) {
  py::buffer_info info = ranges.request();
  if (info.ndim != 1 || info.itemsize != 8 || info.strides[0] != 8 || info.size % 2 != 0) {
    throw InvalidArgument("ranges must be a flat uint64 buffer of (offset, length) pairs");
  }
  const auto* values = static_cast<const std::uint64_t*>(info.ptr);
  std::vector<ByteRange> batch(static_cast<std::size_t>(info.size / 2));
  for (std::size_t i = 0; i < batch.size(); ++i) batch[i] = {values[2 * i], values[2 * i + 1]};
  py::gil_scoped_release nogil;
  auto pool = shared_pool(threads);
  return checksum_ranges(source, batch, *pool, chunk_bytes);
}

const ByteSource& byte_source(const py::handle& source) {
  if (py::isinstance<File>(source)) return source.cast<const File&>();
  if (py::isinstance<BufferSource>(source)) return source.cast<const BufferSource&>().source();
  throw InvalidArgument("read_many: a source must be a File or a BufferSource, not " +
                        std::string(py::str(py::type::of(source).attr("__name__"))));
}

py::object read_many(const py::sequence& batches, std::size_t threads, std::size_t chunk_bytes,
                     bool crc32) {
  std::vector<SourceReads> plan;
  plan.reserve(py::len(batches));
  for (const py::handle item : batches) {
    const auto batch = item.cast<py::tuple>();
    if (batch.size() != 3) {
      throw InvalidArgument("read_many: each batch is a (source, requests, base) tuple");
    }
    SourceReads reads{&byte_source(batch[0]), parse_read_requests(batch[1].cast<py::buffer>())};
    const auto base = batch[2].cast<std::uintptr_t>();
    if (base != 0) {
      for (ReadRequest& r : reads.requests) {
        r.dst = reinterpret_cast<void*>(base + reinterpret_cast<std::uintptr_t>(r.dst));
      }
    }
    plan.push_back(std::move(reads));
  }
  // The tuples (and through them the sources) stay referenced by `batches` for the call.
  std::vector<std::uint32_t> crcs;
  {
    py::gil_scoped_release nogil;
    auto pool = shared_pool(threads);
    read_ranges_many(plan, *pool, chunk_bytes, crc32 ? &crcs : nullptr);
  }
  return crc_list(crc32 ? &crcs : nullptr);
}

py::object write_from(const File& file, const py::buffer& requests, std::size_t threads,
                      std::size_t chunk_bytes, bool crc32) {
  std::vector<WriteRequest> batch = parse_write_requests(requests);
  std::vector<std::uint32_t> crcs;
  {
    py::gil_scoped_release nogil;
    auto pool = shared_pool(threads);
    write_ranges(file, batch, *pool, chunk_bytes, crc32 ? &crcs : nullptr);
  }
  return crc_list(crc32 ? &crcs : nullptr);
}

}  // namespace

void register_io(py::module_& m) {
  py::enum_<File::Mode>(m, "FileMode")
      .value("READ", File::Mode::kRead)
      .value("CREATE", File::Mode::kCreate)
      .value("READ_WRITE", File::Mode::kReadWrite);

  py::class_<File>(m, "File")
      .def_static("open", &File::open, py::arg("path"), py::arg("mode"),
                  py::call_guard<py::gil_scoped_release>(),
                  "Opens a file; raises OSError with errno and the path on failure.")
      .def_static("adopt", &File::adopt, py::arg("fd"), py::arg("name"),
                  "Wraps a duplicate of an open descriptor.")
      .def_property_readonly("name", &File::name)
      .def_property_readonly("fd", &File::fd)
      .def_property_readonly("size", &File::size)
      .def_property_readonly("closed", [](const File& f) { return !f.is_open(); })
      .def("pread", [](const File& f, std::uint64_t offset,
                       std::uint64_t n) { return pread_bytes(f, offset, n); },
           py::arg("offset"), py::arg("n"), "Reads exactly n bytes at offset.")
      .def("read_into",
           [](const File& f, const py::buffer& requests, std::size_t threads,
              std::size_t chunk_bytes, std::uintptr_t base, bool crc32) {
             return read_into(f, requests, threads, chunk_bytes, base, crc32);
           },
           py::arg("requests"), py::arg("threads"), py::arg("chunk_bytes"), py::arg("base") = 0,
           py::arg("crc32") = false,
           "Parallel reads; requests is a flat uint64 buffer of (offset, length, address) "
           "triples, each address relative to base. With crc32, returns the CRC-32 of each "
           "request's bytes (computed from the destination as each step is read), else None.")
      .def("checksum_ranges",
           [](const File& f, const py::buffer& ranges, std::size_t threads,
              std::size_t chunk_bytes) { return checksum(f, ranges, threads, chunk_bytes); },
           py::arg("ranges"), py::arg("threads"), py::arg("chunk_bytes"),
           "CRC-32 of each (offset, length) pair of a flat uint64 buffer, read in parallel "
           "through small buffers (nothing kept).")
      .def("write_from", &write_from, py::arg("requests"), py::arg("threads"),
           py::arg("chunk_bytes"), py::arg("crc32") = false,
           "Parallel writes; requests is a flat uint64 buffer of (offset, length, address) "
           "triples (the caller keeps the memory alive for the call). With crc32, returns the "
           "CRC-32 of each request, computed by the writing threads piece by piece and "
           "combined; else None.")
      .def("preallocate", &File::preallocate, py::arg("size"), py::arg("start") = 0,
           py::call_guard<py::gil_scoped_release>(),
           "Reserves size bytes of disk (a full disk fails here, not mid-write).")
      .def("sync", &File::sync, py::call_guard<py::gil_scoped_release>())
      .def("truncate", &File::truncate, py::call_guard<py::gil_scoped_release>())
      .def("close", &File::close)
      .def("__enter__", [](File& f) -> File& { return f; }, py::return_value_policy::reference)
      .def("__exit__", [](File& f, const py::args&) { f.close(); });

  m.def("read_many", &read_many, py::arg("batches"), py::arg("threads"), py::arg("chunk_bytes"),
        py::arg("crc32") = false,
        "Parallel reads from several sources as one plan: batches is a sequence of (source, "
        "requests, base) tuples, source a File or BufferSource and requests a flat uint64 "
        "buffer of (offset, length, address) triples, each address relative to base. Every "
        "range is checked before any is read. With crc32, returns the CRC-32 of each "
        "request (the batches' requests in order), else None.");

  m.def("exchange_paths", &exchange_paths, py::arg("a"), py::arg("b"),
        py::call_guard<py::gil_scoped_release>(),
        "Swaps two existing paths atomically (renameat2 RENAME_EXCHANGE). False where the "
        "kernel or filesystem cannot (the caller falls back to two renames); OSError with "
        "errno and the paths on any other failure.");

  m.def("sync_directory", &sync_directory, py::arg("path"),
        py::call_guard<py::gil_scoped_release>(),
        "fsyncs the directory at path, so that the names created, renamed or removed in it "
        "survive a power loss; raises OSError with errno and the path on failure.");

  py::class_<BufferSource>(m, "BufferSource")
      .def(py::init<py::buffer, std::string>(), py::arg("buffer"), py::arg("name"))
      .def_property_readonly("name", [](const BufferSource& b) { return b.source().name(); })
      .def_property_readonly("size", [](const BufferSource& b) { return b.source().size(); })
      .def("pread", [](const BufferSource& b, std::uint64_t offset,
                       std::uint64_t n) { return pread_bytes(b.source(), offset, n); },
           py::arg("offset"), py::arg("n"))
      .def("read_into",
           [](const BufferSource& b, const py::buffer& requests, std::size_t threads,
              std::size_t chunk_bytes, std::uintptr_t base, bool crc32) {
             return read_into(b.source(), requests, threads, chunk_bytes, base, crc32);
           },
           py::arg("requests"), py::arg("threads"), py::arg("chunk_bytes"), py::arg("base") = 0,
           py::arg("crc32") = false)
      .def("checksum_ranges",
           [](const BufferSource& b, const py::buffer& ranges, std::size_t threads,
              std::size_t chunk_bytes) { return checksum(b.source(), ranges, threads, chunk_bytes); },
           py::arg("ranges"), py::arg("threads"), py::arg("chunk_bytes"));

  py::class_<Mapping, std::shared_ptr<Mapping>>(m, "Mapping", py::buffer_protocol())
      .def(py::init([](const File& file, bool shared) { return Mapping::map_file(file, shared); }),
           py::arg("file"), py::arg("shared"),
           "Maps the whole file read-write; shared=False is copy-on-write (the file never "
           "changes).")
      .def_property_readonly("size", &Mapping::size)
      .def_property_readonly("shared", &Mapping::shared)
      .def_property_readonly("address",
                             [](const Mapping& mp) { return reinterpret_cast<std::uintptr_t>(mp.data()); })
      .def("will_need", &Mapping::will_need, py::arg("offset"), py::arg("length"))
      .def_buffer([](Mapping& mp) {
        return py::buffer_info(mp.data(), 1, py::format_descriptor<std::uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(mp.size())}, {1}, /*readonly=*/false);
      });

  py::class_<HostBuffer>(m, "HostBuffer", py::buffer_protocol())
      .def(py::init([](std::size_t nbytes, bool huge_pages, std::size_t recycle_limit,
                       double recycle_idle_seconds) {
             if (!(recycle_idle_seconds >= 0.0 && recycle_idle_seconds <= 1e9)) {
               throw py::value_error("recycle_idle_seconds must be in [0, 1e9]");
             }
             const auto idle = std::chrono::milliseconds(
                 static_cast<std::int64_t>(recycle_idle_seconds * 1000.0 + 0.5));
             return new HostBuffer(nbytes, huge_pages, recycle_limit, idle);
           }),
           py::arg("nbytes"), py::arg("huge_pages"), py::arg("recycle_limit") = 0,
           py::arg("recycle_idle_seconds") = 10.0,
           "Uninitialized host memory for storages; huge-page backed when large and asked. "
           "recycle_limit > 0: when freed, the mapping is kept for the next recycled block "
           "that maps as many bytes (marked MADV_FREE once idle for recycle_idle_seconds), "
           "the oldest kept ones unmapped beyond recycle_limit bytes in all.")
      .def_property_readonly("size", &HostBuffer::size)
      .def_property_readonly("huge", &HostBuffer::huge)
      .def_property_readonly(
          "address", [](const HostBuffer& b) { return reinterpret_cast<std::uintptr_t>(b.data()); })
      .def_buffer([](HostBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<std::uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.size())}, {1}, /*readonly=*/false);
      });

  m.def(
      "recycled_stats",
      []() {
        const RecycledStats stats = recycled_stats();
        return py::make_tuple(stats.dirty_bytes, stats.lazy_bytes);
      },
      "(bytes kept for reuse as freed, bytes kept and marked MADV_FREE once idle).");

  m.def("drop_recycled", &drop_recycled,
        "Unmaps the freed HostBuffer mappings kept for reuse; returns their total size in "
        "bytes (0: none was kept).");

  m.def(
      "advise_huge_pages",
      [](std::uintptr_t address, std::size_t nbytes) {
        return advise_huge_pages(reinterpret_cast<void*>(address), nbytes);
      },
      py::arg("address"), py::arg("nbytes"),
      "Advises the whole pages of [address, address + nbytes) for transparent huge pages "
      "before first touch (best effort; False when refused).");

  m.def(
      "raw_memoryview",
      [](std::uintptr_t address, py::ssize_t nbytes, bool readonly) {
        if (nbytes < 0) throw InvalidArgument("nbytes must be >= 0");
        return py::memoryview::from_memory(reinterpret_cast<void*>(address), nbytes, readonly);
      },
      py::arg("address"), py::arg("nbytes"), py::arg("readonly") = true,
      "A memoryview over raw memory. The caller keeps the memory's owner alive while it is used.");
}

}  // namespace ckptio::bindings
