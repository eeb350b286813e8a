// The pickle pre-scan (see ckptio/pickle_scan.hpp).
#include "ckptio/pickle_scan.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace ckptio::bindings {

namespace {

// by_type(obj): table[type(obj)](obj) when the exact type of obj is in the table, else the
// default. A plain C function (METH_O) bound to (table, default), so that a pickler hook
// called for every object pickled costs a dict lookup instead of a Python call.
PyObject* by_type_call(PyObject* bound, PyObject* obj) {
  PyObject* table = PyTuple_GET_ITEM(bound, 0);
  PyObject* func = PyDict_GetItemWithError(table, reinterpret_cast<PyObject*>(Py_TYPE(obj)));
  if (func == nullptr) {
    if (PyErr_Occurred() != nullptr) return nullptr;
    PyObject* fallback = PyTuple_GET_ITEM(bound, 1);
    Py_INCREF(fallback);
    return fallback;
  }
  return PyObject_CallOneArg(func, obj);
}

PyMethodDef by_type_def = {"by_type", by_type_call, METH_O,
                           "Calls table[type(obj)](obj), or returns the default."};

}  // namespace

void register_pickle(py::module_& m) {
  m.def(
      "dispatch_by_type",
      [](const py::dict& table, const py::object& fallback) {
        const py::tuple bound = py::make_tuple(table, fallback);
        PyObject* f = PyCFunction_NewEx(&by_type_def, bound.ptr(), nullptr);
        if (f == nullptr) throw py::error_already_set();
        return py::reinterpret_steal<py::object>(f);
      },
      py::arg("table"), py::arg("default"),
      "A C callable f with f(obj) = table[type(obj)](obj) when the exact type of obj is a key "
      "of table (a dict read at each call), else default: pickler hooks (persistent_id, "
      "reducer_override) that pickle calls for every object without a Python call each.");

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
