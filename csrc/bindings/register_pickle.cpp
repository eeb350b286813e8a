// The pickle pre-scan (see ckptio/pickle_scan.hpp).
#include "ckptio/pickle_scan.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace ckptio::bindings {

void register_pickle(py::module_& m) {
  m.def(
      "scan_pickle",
      [](const py::buffer& data, bool weights_only, std::size_t max_depth) {
        py::buffer_info info = data.request();
        const auto n = static_cast<std::size_t>(info.size * info.itemsize);
        PickleScanOptions options;
        options.weights_only = weights_only;
        options.max_depth = max_depth;
        PickleScan scan;
        {
          py::gil_scoped_release nogil;
          scan = scan_pickle(info.ptr, n, options);
        }
        return py::make_tuple(scan.opcodes, scan.memo_puts, scan.max_depth, scan.end,
                              scan.complete);
      },
      py::arg("data"), py::arg("weights_only"), py::arg("max_depth") = 1000,
      "Checks a pickle's opcodes without running them (memo indices, lengths, nesting, and in "
      "weights-only mode the opcodes torch's weights-only unpickler supports). Returns "
      "(opcodes, memo_puts, max_depth, end, complete); raises CheckpointError.");
}

}  // namespace ckptio::bindings
