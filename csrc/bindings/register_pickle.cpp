// Pickling for save: the C forms of the save pickler's hooks (python/ckptio/_pickler.py).
//
// The pickler calls persistent_id for every object it pickles and reducer_override for most.
// dispatch_by_type sends each object to the Python function of its exact type, or returns a
// default, with no Python call. For plain tensors and their TypedStorage wrappers, whose
// Python functions run 20,000 times for 20,000 tensors, tensor_reducer and storage_ids do the
// common case themselves, with the same torch calls through the C API (torch's Python objects
// only: nothing here links against libtorch), and hand everything else to those Python
// functions, which hold the policy and the errors. Python decides what qualifies by the
// tables it gives them.
#include <cstdint>
#include <string>

#include "ckptio/archive_writer.hpp"
#include "ckptio/errors.hpp"
#include "pyobjects.hpp"
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

// Interned names, made once at registration.
struct Names {
  PyObject* storage;          // "storage", the persistent id's tag
  PyObject* layout;           // Tensor.layout
  PyObject* device;           // UntypedStorage.device
  PyObject* is_quantized;     // Tensor.is_quantized
  PyObject* is_nested;        // Tensor.is_nested
  PyObject* backward_hooks;   // Tensor._backward_hooks
  PyObject* dict;             // __dict__
  PyObject* dtype;            // Tensor.dtype, TypedStorage.dtype
  PyObject* untyped;          // Tensor.untyped_storage()
  PyObject* untyped_storage;  // TypedStorage._untyped_storage
  PyObject* storage_offset;   // Tensor.storage_offset()
  PyObject* size;             // Tensor.size()
  PyObject* stride;           // Tensor.stride()
  PyObject* requires_grad;    // Tensor.requires_grad
  PyObject* fake_device;      // TypedStorage._fake_device
  PyObject* nbytes;           // UntypedStorage.nbytes()
  PyObject* data_ptr;         // UntypedStorage.data_ptr()
  PyObject* cdata;            // UntypedStorage._cdata
};
Names names;

// tensor_reducer(t): what _reduce_plain_tensor returns for a plain dense CPU or CUDA tensor
// with no hooks, no Python state and a dtype of _rebuild_tensor_v2: (_rebuild_tensor_v2,
// (TypedStorage, offset, size, stride, requires_grad, hooks stand-in[, metadata])). nullptr
// with no error set: not the common case. Bound tuple: (fallback, torch.strided, (device flag
// attribute names), {dtypes of _rebuild_tensor_v3}, _rebuild_tensor_v2, TypedStorage, hooks
// stand-in class, _get_tensor_metadata).
PyObject* reduce_fast(PyObject* bound, PyObject* t) {
  Refs refs;
  PyObject* layout = refs.keep(PyObject_GetAttr(t, names.layout));
  if (layout != PyTuple_GET_ITEM(bound, 1)) return nullptr;
  // On a device Python takes: one of its flag attributes (is_cpu, is_cuda: cheaper than
  // t.device.type) is True.
  PyObject* device_flags = PyTuple_GET_ITEM(bound, 2);
  bool on_device = false;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(device_flags) && !on_device; ++i) {
    PyObject* flag = PyObject_GetAttr(t, PyTuple_GET_ITEM(device_flags, i));
    if (flag == nullptr) return nullptr;
    on_device = flag == Py_True;
    Py_DECREF(flag);
  }
  if (!on_device) return nullptr;
  PyObject* quantized = refs.keep(PyObject_GetAttr(t, names.is_quantized));
  if (quantized != Py_False) return nullptr;
  PyObject* nested = refs.keep(PyObject_GetAttr(t, names.is_nested));
  if (nested != Py_False) return nullptr;
  PyObject* hooks = refs.keep(PyObject_GetAttr(t, names.backward_hooks));
  if (hooks == nullptr || PyObject_IsTrue(hooks) != 0) return nullptr;
  PyObject* state = refs.keep(PyObject_GetAttr(t, names.dict));
  if (state == nullptr || !PyDict_Check(state) || PyDict_GET_SIZE(state) != 0) return nullptr;
  PyObject* dtype = refs.keep(PyObject_GetAttr(t, names.dtype));
  if (dtype == nullptr || PySet_Contains(PyTuple_GET_ITEM(bound, 3), dtype) != 0) return nullptr;

  PyObject* storage = refs.keep(PyObject_CallMethodNoArgs(t, names.untyped));
  if (storage == nullptr) return nullptr;
  PyObject* typed = refs.keep(new_typed_storage(PyTuple_GET_ITEM(bound, 5), storage, dtype,
                                                names.dtype, names.untyped_storage));
  if (typed == nullptr) return nullptr;
  PyObject* offset = refs.keep(PyObject_CallMethodNoArgs(t, names.storage_offset));
  if (offset == nullptr) return nullptr;
  PyObject* size = refs.keep(PyObject_CallMethodNoArgs(t, names.size));
  PyObject* size_tuple = size == nullptr ? nullptr : refs.keep(PySequence_Tuple(size));
  if (size_tuple == nullptr) return nullptr;
  PyObject* stride = refs.keep(PyObject_CallMethodNoArgs(t, names.stride));
  if (stride == nullptr) return nullptr;
  PyObject* grad = refs.keep(PyObject_GetAttr(t, names.requires_grad));
  if (grad == nullptr) return nullptr;
  PyObject* stand_in = refs.keep(PyObject_CallNoArgs(PyTuple_GET_ITEM(bound, 6)));
  if (stand_in == nullptr) return nullptr;
  PyObject* metadata = refs.keep(PyObject_CallOneArg(PyTuple_GET_ITEM(bound, 7), t));
  if (metadata == nullptr) return nullptr;
  const int has_metadata = PyObject_IsTrue(metadata);
  if (has_metadata < 0) return nullptr;
  PyObject* args =
      has_metadata == 1
          ? PyTuple_Pack(7, typed, offset, size_tuple, stride, grad, stand_in, metadata)
          : PyTuple_Pack(6, typed, offset, size_tuple, stride, grad, stand_in);
  if (args == nullptr) return nullptr;
  PyObject* out = PyTuple_Pack(2, PyTuple_GET_ITEM(bound, 4), args);
  Py_DECREF(args);
  return out;
}

PyObject* reduce_call(PyObject* bound, PyObject* t) {
  PyObject* out = reduce_fast(bound, t);
  if (out != nullptr || !fall_back_after_failure()) return out;
  return PyObject_CallOneArg(PyTuple_GET_ITEM(bound, 0), t);
}

PyMethodDef reduce_def = {"reduce_plain_tensor", reduce_call, METH_O,
                          "reducer_override for plain tensors; anything else goes to the "
                          "Python reducer."};

// A streaming save's new storage goes to its archive writer as record "data/<key>": written
// from its own memory when its location is in the sink's direct locations (the CPU), else
// reserved, for Python to write after pickling (device memory). sink: None, or (ArchiveWriter,
// alignment, frozenset of direct locations, capsule of the writer's address). False with an
// error set on failure.
bool stream_storage(PyObject* sink, PyObject* key, PyObject* location, PyObject* ptr,
                    Py_ssize_t nbytes) {
  if (sink == Py_None) return true;
  const int direct = PySet_Contains(PyTuple_GET_ITEM(sink, 2), location);
  if (direct < 0) return false;
  const char* key_text = PyUnicode_AsUTF8(key);
  const unsigned long alignment = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(sink, 1));
  void* address = direct == 1 ? PyLong_AsVoidPtr(ptr) : nullptr;
  if (key_text == nullptr || PyErr_Occurred() != nullptr) return false;
  auto* writer_ptr = static_cast<ArchiveWriter*>(PyCapsule_GetPointer(PyTuple_GET_ITEM(sink, 3), nullptr));
  if (writer_ptr == nullptr) return false;
  ArchiveWriter& writer = *writer_ptr;
  try {
    const std::string name = std::string("data/") + key_text;
    const auto size = static_cast<std::uint64_t>(nbytes);
    if (direct == 1) {
      writer.add(name, static_cast<std::uint32_t>(alignment), address, size);
    } else {
      writer.reserve(name, static_cast<std::uint32_t>(alignment), size);
    }
  } catch (py::error_already_set& e) {
    e.restore();
    return false;
  } catch (const Error&) {
    set_python_error(std::current_exception());
    return false;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return false;
  }
  return true;
}

// storage_ids(obj): persistent_id of a TypedStorage (exact type) over an UntypedStorage whose
// dtype and device Python has already seen: ("storage", storage type, key, location, numel),
// giving each distinct storage the next key and recording it, as _pickler.storage_id does.
// Bound tuple: (fallback, TypedStorage, UntypedStorage, {dtype: (storage type, itemsize)},
// {device: location} (devices with data: not meta), {storage _cdata: key}, [storages],
// {data_ptr: dtype}, sink of stream_storage).
PyObject* storage_id_fast(PyObject* bound, PyObject* obj) {
  if (Py_TYPE(obj) != reinterpret_cast<PyTypeObject*>(PyTuple_GET_ITEM(bound, 1))) {
    return nullptr;
  }
  Refs refs;
  PyObject* state = refs.keep(PyObject_GetAttr(obj, names.dict));
  if (state == nullptr || !PyDict_Check(state)) return nullptr;
  PyObject* fake = PyDict_GetItemWithError(state, names.fake_device);  // borrowed
  if ((fake != nullptr && fake != Py_None) || PyErr_Occurred() != nullptr) return nullptr;
  PyObject* storage = refs.keep(PyObject_GetAttr(obj, names.untyped_storage));
  if (storage == nullptr ||
      Py_TYPE(storage) != reinterpret_cast<PyTypeObject*>(PyTuple_GET_ITEM(bound, 2))) {
    return nullptr;
  }
  PyObject* dtype = refs.keep(PyObject_GetAttr(obj, names.dtype));
  if (dtype == nullptr) return nullptr;
  PyObject* entry = PyDict_GetItemWithError(PyTuple_GET_ITEM(bound, 3), dtype);  // borrowed
  if (entry == nullptr || !PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 2) {
    return nullptr;
  }
  const Py_ssize_t itemsize = small_index(PyTuple_GET_ITEM(entry, 1));
  if (itemsize <= 0) return nullptr;
  PyObject* device = refs.keep(PyObject_GetAttr(storage, names.device));
  if (device == nullptr) return nullptr;
  PyObject* location = PyDict_GetItemWithError(PyTuple_GET_ITEM(bound, 4), device);  // borrowed
  if (location == nullptr) return nullptr;
  PyObject* nbytes_obj = refs.keep(PyObject_CallMethodNoArgs(storage, names.nbytes));
  const Py_ssize_t nbytes = nbytes_obj == nullptr ? -1 : small_index(nbytes_obj);
  if (nbytes < 0) return nullptr;
  PyObject* ptr = refs.keep(PyObject_CallMethodNoArgs(storage, names.data_ptr));
  PyObject* cdata = ptr == nullptr ? nullptr : refs.keep(PyObject_GetAttr(storage, names.cdata));
  if (cdata == nullptr) return nullptr;
  const int has_data = PyObject_IsTrue(ptr);
  if (has_data < 0) return nullptr;
  if (has_data == 1) {
    // One storage pickled as two dtypes: the Python function raises torch's error.
    PyObject* seen = PyDict_SetDefault(PyTuple_GET_ITEM(bound, 7), ptr, dtype);  // borrowed
    if (seen == nullptr) return nullptr;
    if (seen != dtype) {
      const int same = PyObject_RichCompareBool(seen, dtype, Py_EQ);
      if (same != 1) return nullptr;
    }
  }
  PyObject* keys = PyTuple_GET_ITEM(bound, 5);
  PyObject* key = PyDict_GetItemWithError(keys, cdata);  // borrowed
  if (key != nullptr) {
    Py_INCREF(key);
  } else {
    if (PyErr_Occurred() != nullptr) return nullptr;
    // str(len(keys)) as Python makes it: a new str object even for one digit (the
    // pickler memoises by object, and torch's pickle has no shared "1" with other strings).
    PyObject* count = PyLong_FromSsize_t(PyDict_GET_SIZE(keys));
    key = count == nullptr ? nullptr : PyObject_Str(count);
    Py_XDECREF(count);
    // The archive writer first: if it fails, nothing is recorded and the Python function
    // redoes it all (and raises the writer's error).
    if (key == nullptr || !stream_storage(PyTuple_GET_ITEM(bound, 8), key, location, ptr, nbytes) ||
        PyDict_SetItem(keys, cdata, key) != 0 ||
        PyList_Append(PyTuple_GET_ITEM(bound, 6), storage) != 0) {
      Py_XDECREF(key);
      return nullptr;
    }
  }
  refs.keep(key);
  PyObject* numel = refs.keep(PyLong_FromSsize_t(nbytes / itemsize));
  if (numel == nullptr) return nullptr;
  return PyTuple_Pack(5, names.storage, PyTuple_GET_ITEM(entry, 0), key, location, numel);
}

PyObject* storage_id_call(PyObject* bound, PyObject* obj) {
  PyObject* out = storage_id_fast(bound, obj);
  if (out != nullptr || !fall_back_after_failure()) return out;
  return PyObject_CallOneArg(PyTuple_GET_ITEM(bound, 0), obj);
}

PyMethodDef storage_id_def = {"storage_id", storage_id_call, METH_O,
                              "persistent_id for TypedStorage wrappers; anything else goes to "
                              "the Python function."};

PyObject* bind(PyMethodDef* def, const py::tuple& bound) {
  PyObject* f = PyCFunction_NewEx(def, bound.ptr(), nullptr);
  if (f == nullptr) throw py::error_already_set();
  return f;
}

}  // namespace

void register_pickle(py::module_& m) {
  const char* name_list[] = {"storage", "layout", "device", "is_quantized", "is_nested",
                             "_backward_hooks", "__dict__", "dtype", "untyped_storage",
                             "_untyped_storage", "storage_offset", "size", "stride",
                             "requires_grad", "_fake_device", "nbytes", "data_ptr", "_cdata"};
  PyObject** name_slots[] = {&names.storage,        &names.layout,         &names.device,
                             &names.is_quantized,   &names.is_nested,
                             &names.backward_hooks, &names.dict,           &names.dtype,
                             &names.untyped,        &names.untyped_storage, &names.storage_offset,
                             &names.size,           &names.stride,         &names.requires_grad,
                             &names.fake_device,    &names.nbytes,         &names.data_ptr,
                             &names.cdata};
  static_assert(sizeof(name_list) / sizeof(name_list[0]) == sizeof(Names) / sizeof(PyObject*));
  for (std::size_t i = 0; i < sizeof(name_list) / sizeof(name_list[0]); ++i) {
    *name_slots[i] = intern(name_list[i]);
  }

  m.def(
      "tensor_reducer",
      [](const py::object& fallback, const py::object& strided, const py::tuple& device_flags,
         const py::frozenset& v3_dtypes, const py::object& rebuild_v2, const py::object& typed,
         const py::object& stand_in, const py::object& get_metadata) {
        return py::reinterpret_steal<py::object>(
            bind(&reduce_def, py::make_tuple(fallback, strided, device_flags, v3_dtypes, rebuild_v2,
                                             typed, stand_in, get_metadata)));
      },
      py::arg("fallback"), py::arg("strided"), py::arg("device_flags"), py::arg("v3_dtypes"),
      py::arg("rebuild_v2"), py::arg("typed"), py::arg("hooks_stand_in"),
      py::arg("get_metadata"),
      "A C reducer_override for plain tensors: strided, one of `device_flags` (attribute "
      "names such as is_cpu) true, not "
      "quantized or nested, no backward hooks, no Python state, dtype not in `v3_dtypes`: "
      "returns (rebuild_v2, (TypedStorage, offset, size, stride, requires_grad, "
      "hooks_stand_in()[, metadata])). Anything else, and every failure, goes to fallback.");

  m.def(
      "storage_ids",
      [](const py::object& fallback, const py::object& typed, const py::object& untyped,
         const py::dict& storage_types, const py::dict& locations, const py::dict& keys,
         const py::list& storages, const py::dict& dtypes, const py::object& sink) {
        py::object bound_sink = py::none();
        if (!sink.is_none()) {
          // Checked once here, so the hot path can take the tuple's items as they are, with
          // the writer's address in a capsule (the tuple keeps the writer alive).
          const auto t = sink.cast<py::tuple>();
          if (t.size() != 3 || !py::isinstance<ArchiveWriter>(t[0]) ||
              !py::isinstance<py::int_>(t[1]) || !py::isinstance<py::frozenset>(t[2])) {
            throw InvalidArgument(
                "storage_ids: sink must be None or (ArchiveWriter, alignment, frozenset)");
          }
          auto* writer = t[0].cast<ArchiveWriter*>();
          bound_sink = py::make_tuple(t[0], t[1], t[2], py::capsule(writer));
        }
        return py::reinterpret_steal<py::object>(
            bind(&storage_id_def, py::make_tuple(fallback, typed, untyped, storage_types,
                                                 locations, keys, storages, dtypes, bound_sink)));
      },
      py::arg("fallback"), py::arg("typed"), py::arg("untyped"), py::arg("storage_types"),
      py::arg("locations"), py::arg("keys"), py::arg("storages"), py::arg("dtypes"),
      py::arg("sink") = py::none(),
      "A C persistent_id for `typed` storages over `untyped` ones whose dtype is in "
      "storage_types ({dtype: (storage type, itemsize)}) and device in locations: returns "
      "('storage', type, key, location, numel), keys a new storage str(len(keys)) in `keys` "
      "(by _cdata) and appends it to `storages`, and records its data_ptr's dtype in "
      "`dtypes`. With a sink (ArchiveWriter, alignment, direct locations), a new storage also "
      "becomes the writer's record data/<key> (see stream_storage). Anything else (a dtype "
      "clash included) goes to fallback.");

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
}

}  // namespace ckptio::bindings
