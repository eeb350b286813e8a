// The persistent id torch pickles for each storage, ("storage", storage type, key, location,
// numel), as the C persistent_loads read it in the common case: register_unpickle.cpp (load)
// and register_specs.cpp (load_into). Everything else is the Python persistent_load's to
// judge (python/ckptio/_unpickler.py), which also names every problem.
#pragma once

#include <Python.h>

#include "pyobjects.hpp"

namespace ckptio::bindings {

struct StorageId {
  PyObject* key;       // borrowed, an exact str
  PyObject* location;  // borrowed, an exact str
  PyObject* dtype;     // borrowed, from the storage-type table
  Py_ssize_t element_size;
  Py_ssize_t nbytes;  // numel x element size, > 0
};

// Reads saved_id into `out` if it is the common case: an exact 5-tuple whose tag equals `tag`
// ("storage"), key and location exact strs, numel a positive int, and a storage type that
// `types` ({storage type: (dtype, element size)}, filled by the Python persistent_load)
// knows. False otherwise, with at most an ordinary error set (fall_back_after_failure()).
inline bool parse_storage_id(PyObject* saved_id, PyObject* types, PyObject* tag,
                             StorageId* out) {
  if (!PyTuple_CheckExact(saved_id) || PyTuple_GET_SIZE(saved_id) != 5) return false;
  PyObject* got_tag = PyTuple_GET_ITEM(saved_id, 0);
  PyObject* storage_type = PyTuple_GET_ITEM(saved_id, 1);
  out->key = PyTuple_GET_ITEM(saved_id, 2);
  out->location = PyTuple_GET_ITEM(saved_id, 3);
  const Py_ssize_t numel = small_index(PyTuple_GET_ITEM(saved_id, 4));
  if (!PyUnicode_CheckExact(got_tag) || !PyUnicode_CheckExact(out->key) ||
      !PyUnicode_CheckExact(out->location) || numel <= 0 ||
      PyUnicode_Compare(got_tag, tag) != 0) {
    return false;
  }
  PyObject* entry = PyDict_GetItemWithError(types, storage_type);  // borrowed
  if (entry == nullptr) {
    PyErr_Clear();  // unknown or unhashable: the fallback decides
    return false;
  }
  if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 2) return false;
  out->dtype = PyTuple_GET_ITEM(entry, 0);
  out->element_size = small_index(PyTuple_GET_ITEM(entry, 1));
  if (out->element_size <= 0 || numel > PY_SSIZE_T_MAX / out->element_size) return false;
  out->nbytes = numel * out->element_size;
  return true;
}

// The data offset of record `prefix` + key ("data/<key>") in `records` ({name: (data offset,
// size, method)}) if it is stored (method 0) and holds exactly `nbytes`; -1 otherwise, with
// at most an ordinary error set. A record of another size is an error the fallback names.
inline Py_ssize_t record_start(PyObject* records, PyObject* prefix, PyObject* key,
                               Py_ssize_t nbytes) {
  PyObject* name = PyUnicode_Concat(prefix, key);
  if (name == nullptr) return -1;
  PyObject* record = PyDict_GetItemWithError(records, name);  // borrowed
  Py_DECREF(name);
  if (record == nullptr || !PyTuple_CheckExact(record) || PyTuple_GET_SIZE(record) != 3) {
    PyErr_Clear();
    return -1;
  }
  const Py_ssize_t start = small_index(PyTuple_GET_ITEM(record, 0));
  if (small_index(PyTuple_GET_ITEM(record, 1)) != nbytes ||
      small_index(PyTuple_GET_ITEM(record, 2)) != 0 || start > PY_SSIZE_T_MAX - nbytes) {
    return -1;
  }
  return start;
}

}  // namespace ckptio::bindings
