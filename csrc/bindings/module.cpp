// ckptio._core: the Python face of the C++ library, one submodule per area. Arguments are
// converted and checked with the GIL held; every wait on the disk or on worker threads runs
// with it released.
#include "register.hpp"

PYBIND11_MODULE(_core, m) {
  m.doc() = "ckptio's native core: parallel file I/O, memory mappings and the zip container.";
  ckptio::bindings::register_errors(m);

  auto io = m.def_submodule(
      "io", "Files and in-memory sources with parallel positional reads and writes, memory "
            "mappings, host memory.");
  ckptio::bindings::register_io(io);

  auto zip = m.def_submodule("zip", "The zip container torch uses: reading, writing, CRC-32.");
  ckptio::bindings::register_zip(zip);

  auto pickling = m.def_submodule(
      "pickling", "The pickle pre-scan, and C fast paths of the pickler and unpicklers.");
  ckptio::bindings::register_pickle(pickling);
  ckptio::bindings::register_unpickle(pickling);
  ckptio::bindings::register_specs(pickling);
}
