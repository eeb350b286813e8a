// Small helpers for the bindings that work on Python objects through the C API directly (the
// pickling and unpickling hot paths), where pybind11's per-call cost would be too much.
#pragma once

#include <Python.h>

#include <pybind11/pybind11.h>

namespace ckptio::bindings {

// An interned str made once at registration (attribute and method names, tags).
inline PyObject* intern(const char* s) {
  PyObject* o = PyUnicode_InternFromString(s);
  if (o == nullptr) throw pybind11::error_already_set();
  return o;
}

// v as a non-negative Py_ssize_t, or -1 when v is not an exact int in that range (no Python
// error is left set).
inline Py_ssize_t small_index(PyObject* v) {
  if (!PyLong_CheckExact(v)) return -1;
  const Py_ssize_t n = PyLong_AsSsize_t(v);
  if (n == -1 && PyErr_Occurred() != nullptr) {
    PyErr_Clear();
    return -1;
  }
  return n < 0 ? -1 : n;
}

// Owned references released at scope exit: the hot paths bail out at many points.
struct Refs {
  static constexpr int kCapacity = 24;  // register_pickle's reduce_fast keeps 15, the most
  PyObject* items[kCapacity] = {};
  int n = 0;
  PyObject* keep(PyObject* o) {
    if (o == nullptr) return o;
    if (n == kCapacity) Py_FatalError("ckptio: Refs capacity exceeded (a programming error)");
    items[n++] = o;
    return o;
  }
  ~Refs() {
    for (int i = 0; i < n; ++i) Py_DECREF(items[i]);
  }
};

// After a hot path returned nullptr: true if the caller should hand the call to its Python
// fallback, which redoes the work and raises what it raises: no error is set (not the common
// case), or an ordinary one, which is cleared. False with the error left set for
// KeyboardInterrupt, MemoryError and other exceptions that must go out as they are.
inline bool fall_back_after_failure() {
  if (PyErr_Occurred() == nullptr) return true;
  if (!PyErr_ExceptionMatches(PyExc_Exception) || PyErr_ExceptionMatches(PyExc_MemoryError)) {
    return false;
  }
  PyErr_Clear();
  return true;
}

// A TypedStorage as its constructor leaves it, without its argument parsing:
// object.__new__(typed_cls) with `dtype` and `_untyped_storage` set (the names passed
// interned). Python checks at import that this builds what the constructor builds, and makes
// no C hook that calls this otherwise (_unpickler._direct_construction_matches).
inline PyObject* new_typed_storage(PyObject* typed_cls, PyObject* storage, PyObject* dtype,
                                   PyObject* dtype_name, PyObject* untyped_name) {
  PyObject* empty = PyTuple_New(0);
  if (empty == nullptr) return nullptr;
  PyObject* typed =
      PyBaseObject_Type.tp_new(reinterpret_cast<PyTypeObject*>(typed_cls), empty, nullptr);
  Py_DECREF(empty);
  if (typed == nullptr || PyObject_SetAttr(typed, dtype_name, dtype) != 0 ||
      PyObject_SetAttr(typed, untyped_name, storage) != 0) {
    Py_XDECREF(typed);
    return nullptr;
  }
  return typed;
}

}  // namespace ckptio::bindings
