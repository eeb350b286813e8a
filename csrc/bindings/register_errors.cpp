// The one place where C++ errors become Python exceptions.
#include <Python.h>

#include <cstring>

#include "ckptio/errors.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace ckptio::bindings {

namespace {
PyObject* error_type = nullptr;  // ckptio's CheckpointError
}  // namespace

void set_python_error(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const FormatError& e) {
    PyErr_SetString(error_type, e.what());
  } catch (const IoError& e) {
    // OSError(errno, strerror, filename) picks the matching subclass (FileNotFoundError, ...).
    PyObject* filename = PyUnicode_DecodeFSDefault(e.path().c_str());
    if (filename == nullptr) return;
    PyObject* args = Py_BuildValue("(isN)", e.code(), std::strerror(e.code()), filename);
    if (args == nullptr) return;
    PyObject* exc = PyObject_Call(PyExc_OSError, args, nullptr);
    Py_DECREF(args);
    if (exc == nullptr) return;
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc)), exc);
    Py_DECREF(exc);
  } catch (const InvalidArgument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
}

void register_errors(py::module_& m) {
  // CheckpointError is a RuntimeError, like the errors torch.load raises for bad archives.
  static py::exception<FormatError> checkpoint_error(m, "CheckpointError", PyExc_RuntimeError);
  checkpoint_error.doc() =
      "A checkpoint file is malformed, truncated or hostile. The message names the file and "
      "the problem.";

  error_type = checkpoint_error.ptr();
  py::register_exception_translator([](std::exception_ptr p) { set_python_error(p); });
}

}  // namespace ckptio::bindings
