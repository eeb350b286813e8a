// ckptio._core: the Python face of the C++ library. Arguments are converted and checked with
// the GIL held; every wait on the disk or on worker threads runs with it released.
#include "register.hpp"

PYBIND11_MODULE(_core, m) {
  m.doc() = "ckptio's native core: parallel file I/O, memory mappings and the zip container.";
  ckptio::bindings::register_errors(m);
  ckptio::bindings::register_io(m);
  ckptio::bindings::register_zip(m);
  ckptio::bindings::register_pickle(m);
  ckptio::bindings::register_unpickle(m);
  ckptio::bindings::register_specs(m);
}
