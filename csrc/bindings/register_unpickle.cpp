// Unpickling data.pkl: the pre-scan of its opcodes (see ckptio/pickle_scan.hpp), and the
// load's per-storage and per-tensor hot paths, as C callables the unpickler calls directly.
//
// Unpickling 20,000 small tensors calls persistent_load and the tensor rebuild 20,000 times
// each; as Python functions their frames and bytecode cost more than the torch calls they
// make. These two do the common case with the same torch calls, through the C API (torch's
// Python objects only: nothing here links against libtorch), and hand every other case, and
// every failure, to the Python function they were built over, which holds the policy and
// the error messages (python/ckptio/_unpickler.py). Python decides which storages qualify by
// the tables it gives them; they decide nothing themselves.
#include <Python.h>
#include <structmember.h>

#include <climits>
#include <cstdint>
#include <string>

#include "ckptio/pickle_scan.hpp"
#include "pyobjects.hpp"
#include "register.hpp"
#include "storage_ids.hpp"

namespace py = pybind11;

namespace ckptio::bindings {

namespace {

// Interned attribute and method names, made once at registration.
struct Names {
  PyObject* storage;           // "storage", the persistent id's tag
  PyObject* data_prefix;       // "data/"
  PyObject* dtype;             // TypedStorage.dtype
  PyObject* untyped_storage;   // TypedStorage._untyped_storage
  PyObject* resizable;         // UntypedStorage.resizable()
  PyObject* nbytes;            // UntypedStorage.nbytes()
  PyObject* device;            // UntypedStorage.device
  PyObject* new_;              // Tensor.new()
  PyObject* set_;              // Tensor.set_(storage, offset, size, stride)
  PyObject* requires_grad;     // Tensor.requires_grad
  PyObject* backward_hooks;    // Tensor._backward_hooks
};
Names names;

// ---------------------------------------------------------------------------------------
// StorageSlicer: persistent_load(("storage", type, key, location, numel)) for storages that
// are slices of one base storage (the whole-file mapping, or a load's block of small
// storages), wrapped in a TypedStorage as torch.load does.
struct StorageSlicer {
  PyObject_HEAD
  PyObject* fallback;   // the Python persistent_load: every case not handled here
  PyObject* records;    // {"data/<key>": (data offset, size, method)}
  PyObject* types;      // {storage type: (dtype, element size)}, filled by the fallback
  PyObject* identity;   // set of saved locations whose restore leaves a CPU storage as it is
  PyObject* loaded;     // {key: TypedStorage}, shared with the fallback (ties and views)
  PyObject* slice;      // torch._C.StorageBase.__getitem__
  PyObject* typed_cls;  // torch.storage.TypedStorage
  PyObject* base;       // the storage slices come from; None: everything falls back
  PyObject* offsets;    // None: a slice starts at the record's data offset (a mapping);
                        // else {key: offset in base} (a block filled by reads)
  Py_ssize_t limit;     // with offsets: records of this size or more fall back
  PyObject* weakrefs;
};

int slicer_traverse(PyObject* self_obj, visitproc visit, void* arg) {
  auto* self = reinterpret_cast<StorageSlicer*>(self_obj);
  Py_VISIT(Py_TYPE(self_obj));
  Py_VISIT(self->fallback);
  Py_VISIT(self->records);
  Py_VISIT(self->types);
  Py_VISIT(self->identity);
  Py_VISIT(self->loaded);
  Py_VISIT(self->slice);
  Py_VISIT(self->typed_cls);
  Py_VISIT(self->base);
  Py_VISIT(self->offsets);
  return 0;
}

int slicer_clear(PyObject* self_obj) {
  auto* self = reinterpret_cast<StorageSlicer*>(self_obj);
  Py_CLEAR(self->fallback);
  Py_CLEAR(self->records);
  Py_CLEAR(self->types);
  Py_CLEAR(self->identity);
  Py_CLEAR(self->loaded);
  Py_CLEAR(self->slice);
  Py_CLEAR(self->typed_cls);
  Py_CLEAR(self->base);
  Py_CLEAR(self->offsets);
  return 0;
}

void slicer_dealloc(PyObject* self_obj) {
  PyTypeObject* tp = Py_TYPE(self_obj);
  PyObject_GC_UnTrack(self_obj);
  if (reinterpret_cast<StorageSlicer*>(self_obj)->weakrefs != nullptr) {
    PyObject_ClearWeakRefs(self_obj);
  }
  slicer_clear(self_obj);
  tp->tp_free(self_obj);
  Py_DECREF(tp);
}

PyObject* slicer_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static const char* kwlist[] = {"fallback", "records", "types", "identity", "loaded",
                                 "slice",    "typed",   nullptr};
  PyObject *fallback, *records, *types, *identity, *loaded, *slice, *typed;
  if (PyArg_ParseTupleAndKeywords(args, kwargs, "OO!O!OO!OO!:StorageSlicer",
                                  const_cast<char**>(kwlist), &fallback, &PyDict_Type, &records,
                                  &PyDict_Type, &types, &identity, &PyDict_Type, &loaded, &slice,
                                  &PyType_Type, &typed) == 0) {
    return nullptr;
  }
  if (!PyAnySet_Check(identity)) {
    PyErr_SetString(PyExc_TypeError, "StorageSlicer: identity must be a set or frozenset");
    return nullptr;
  }
  auto* self = reinterpret_cast<StorageSlicer*>(type->tp_alloc(type, 0));
  if (self == nullptr) return nullptr;
  PyObject* fields[] = {fallback, records, types, identity, loaded, slice, typed};
  PyObject** slots[] = {&self->fallback, &self->records, &self->types,    &self->identity,
                        &self->loaded,   &self->slice,   &self->typed_cls};
  for (std::size_t i = 0; i < 7; ++i) {
    Py_INCREF(fields[i]);
    *slots[i] = fields[i];
  }
  Py_INCREF(Py_None);
  self->base = Py_None;
  Py_INCREF(Py_None);
  self->offsets = Py_None;
  self->limit = PY_SSIZE_T_MAX;
  return reinterpret_cast<PyObject*>(self);
}

// The storage for saved_id if this is the common case, nullptr with no error set if not, or
// nullptr with an error set if a call failed (the caller then falls back for ordinary ones).
PyObject* slicer_fast(StorageSlicer* self, PyObject* saved_id) {
  // base and offsets are settable from Python, deletable too (NULL): both mean "not armed".
  if (self->base == nullptr || self->base == Py_None || self->offsets == nullptr) {
    return nullptr;
  }
  StorageId id{};
  if (!parse_storage_id(saved_id, self->types, names.storage, &id)) return nullptr;
  const Py_ssize_t nbytes = id.nbytes;
  PyObject* key = id.key;

  PyObject* cached = PyDict_GetItemWithError(self->loaded, key);
  if (cached != nullptr) {
    Py_INCREF(cached);
    return cached;
  }
  if (PyErr_Occurred() != nullptr) return nullptr;
  if (PySet_Contains(self->identity, id.location) != 1) {
    PyErr_Clear();
    return nullptr;
  }
  Py_ssize_t start = record_start(self->records, names.data_prefix, key, nbytes);
  if (start < 0) return nullptr;  // the fallback raises the error that names the problem
  if (self->offsets != Py_None) {
    if (!PyDict_CheckExact(self->offsets) || nbytes >= self->limit) return nullptr;
    PyObject* slot = PyDict_GetItemWithError(self->offsets, key);
    if (slot == nullptr) {
      PyErr_Clear();
      return nullptr;
    }
    start = small_index(slot);
    if (start < 0) return nullptr;
  }
  if (start > PY_SSIZE_T_MAX - nbytes) return nullptr;

  PyObject* lo = PyLong_FromSsize_t(start);
  PyObject* hi = lo == nullptr ? nullptr : PyLong_FromSsize_t(start + nbytes);
  PyObject* bounds = hi == nullptr ? nullptr : PySlice_New(lo, hi, nullptr);
  Py_XDECREF(lo);
  Py_XDECREF(hi);
  if (bounds == nullptr) return nullptr;
  PyObject* call_args[] = {self->base, bounds};
  PyObject* storage = PyObject_Vectorcall(self->slice, call_args, 2, nullptr);
  Py_DECREF(bounds);
  if (storage == nullptr) return nullptr;
  // A slice past the base's end comes back short (the archive reader refuses such records
  // first; the fallback names them): never hand one out.
  PyObject* got = PyObject_CallMethodNoArgs(storage, names.nbytes);
  const Py_ssize_t got_bytes = got == nullptr ? -1 : PyLong_AsSsize_t(got);
  Py_XDECREF(got);
  if (got_bytes != nbytes) {  // an error is set only if nbytes() itself failed
    Py_DECREF(storage);
    return nullptr;
  }

  PyObject* typed = new_typed_storage(self->typed_cls, storage, id.dtype, names.dtype,
                                      names.untyped_storage);
  if (typed == nullptr || PyDict_SetItem(self->loaded, key, typed) != 0) {
    Py_XDECREF(typed);
    Py_DECREF(storage);
    return nullptr;
  }
  Py_DECREF(storage);
  return typed;
}

PyObject* slicer_call(PyObject* self_obj, PyObject* args, PyObject* kwargs) {
  auto* self = reinterpret_cast<StorageSlicer*>(self_obj);
  if (kwargs != nullptr || PyTuple_GET_SIZE(args) != 1) {
    return PyObject_Call(self->fallback, args, kwargs);
  }
  PyObject* saved_id = PyTuple_GET_ITEM(args, 0);
  PyObject* out = slicer_fast(self, saved_id);
  if (out != nullptr || !fall_back_after_failure()) return out;
  return PyObject_CallOneArg(self->fallback, saved_id);
}

PyMemberDef slicer_members[] = {
    {"base", T_OBJECT_EX, offsetof(StorageSlicer, base), 0,
     "The storage slices come from; None makes every call fall back."},
    {"offsets", T_OBJECT_EX, offsetof(StorageSlicer, offsets), 0,
     "None: slices start at the record's data offset; else {key: offset in base}."},
    {"limit", T_PYSSIZET, offsetof(StorageSlicer, limit), 0,
     "With offsets: records of this many bytes or more fall back."},
    {"__weaklistoffset__", T_PYSSIZET, offsetof(StorageSlicer, weakrefs), READONLY, nullptr},
    {nullptr, 0, 0, 0, nullptr}};

PyType_Slot slicer_slots[] = {
    {Py_tp_new, reinterpret_cast<void*>(slicer_new)},
    {Py_tp_dealloc, reinterpret_cast<void*>(slicer_dealloc)},
    {Py_tp_traverse, reinterpret_cast<void*>(slicer_traverse)},
    {Py_tp_clear, reinterpret_cast<void*>(slicer_clear)},
    {Py_tp_call, reinterpret_cast<void*>(slicer_call)},
    {Py_tp_members, slicer_members},
    {Py_tp_doc, const_cast<char*>(
                    "StorageSlicer(fallback, records, types, identity, loaded, slice, typed)\n\n"
                    "A persistent_load for storages that are slices of one base storage. "
                    "Anything else, and every failure, goes to fallback.")},
    {0, nullptr}};

PyType_Spec slicer_spec = {"ckptio._core.pickling.StorageSlicer", sizeof(StorageSlicer), 0,
                           Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, slicer_slots};

// ---------------------------------------------------------------------------------------
// rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks[, metadata])
// for a TypedStorage over a non-resizable CPU storage: a fresh tensor of its dtype (Tensor.new
// on a cached empty tensor: a third of torch.empty's cost), set_ to the geometry (which
// refuses any geometry that does not fit a non-resizable storage), then what torch's
// _rebuild_tensor_v2 sets. The bound tuple holds (fallback, TypedStorage, UntypedStorage,
// {dtype: empty CPU tensor}, make_empty(dtype), set_tensor_metadata, torch.device("cpu")).
PyObject* rebuild_fast(PyObject* bound, PyObject* const* args, Py_ssize_t nargs) {
  if ((nargs != 6 && nargs != 7) ||
      Py_TYPE(args[0]) != reinterpret_cast<PyTypeObject*>(PyTuple_GET_ITEM(bound, 1))) {
    return nullptr;
  }
  PyObject* tensor = nullptr;
  {
    Refs refs;
    PyObject* untyped = refs.keep(PyObject_GetAttr(args[0], names.untyped_storage));
    if (untyped == nullptr ||
        Py_TYPE(untyped) != reinterpret_cast<PyTypeObject*>(PyTuple_GET_ITEM(bound, 2))) {
      return nullptr;
    }
    PyObject* resizable = refs.keep(PyObject_CallMethodNoArgs(untyped, names.resizable));
    if (resizable != Py_False) return nullptr;  // meta, device: Python checks the geometry
    PyObject* device = refs.keep(PyObject_GetAttr(untyped, names.device));
    if (device == nullptr ||
        PyObject_RichCompareBool(device, PyTuple_GET_ITEM(bound, 6), Py_EQ) != 1) {
      return nullptr;
    }
    PyObject* dtype = refs.keep(PyObject_GetAttr(args[0], names.dtype));
    if (dtype == nullptr) return nullptr;
    PyObject* protos = PyTuple_GET_ITEM(bound, 3);
    PyObject* proto = PyDict_GetItemWithError(protos, dtype);  // borrowed
    if (proto == nullptr) {
      if (PyErr_Occurred() != nullptr) return nullptr;
      proto = refs.keep(PyObject_CallOneArg(PyTuple_GET_ITEM(bound, 4), dtype));
      if (proto == nullptr || PyDict_SetItem(protos, dtype, proto) != 0) return nullptr;
    }
    PyObject* fresh = refs.keep(PyObject_CallMethodNoArgs(proto, names.new_));
    if (fresh == nullptr) return nullptr;
    PyObject* set_args[] = {fresh, untyped, args[1], args[2], args[3]};
    tensor = PyObject_VectorcallMethod(names.set_, set_args,
                                       5 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr);
    if (tensor == nullptr) return nullptr;
  }
  if ((args[4] != Py_False && PyObject_SetAttr(tensor, names.requires_grad, args[4]) != 0)) {
    Py_DECREF(tensor);
    return nullptr;
  }
  if (nargs == 7) {
    const int has_metadata = PyObject_IsTrue(args[6]);
    PyObject* done = has_metadata == 1
                         ? PyObject_CallFunctionObjArgs(PyTuple_GET_ITEM(bound, 5), tensor,
                                                        args[6], nullptr)
                         : nullptr;
    if (has_metadata < 0 || (has_metadata == 1 && done == nullptr)) {
      Py_DECREF(tensor);
      return nullptr;
    }
    Py_XDECREF(done);
  }
  if (PyObject_SetAttr(tensor, names.backward_hooks, args[5]) != 0) {
    Py_DECREF(tensor);
    return nullptr;
  }
  return tensor;
}

PyObject* rebuild_call(PyObject* bound, PyObject* const* args, Py_ssize_t nargs) {
  PyObject* out = rebuild_fast(bound, args, nargs);
  if (out != nullptr || !fall_back_after_failure()) return out;
  return PyObject_Vectorcall(PyTuple_GET_ITEM(bound, 0), args, nargs, nullptr);
}

PyMethodDef rebuild_def = {"rebuild_tensor_v2", reinterpret_cast<PyCFunction>(rebuild_call),
                           METH_FASTCALL,
                           "torch._utils._rebuild_tensor_v2 for CPU storages that cannot "
                           "grow; anything else goes to the Python rebuild."};

// The block of a load's small storages: every "data/<key>" record below `limit` bytes gets a
// slot, in record order, each `alignment`-aligned. Returns (total bytes, {key: slot offset},
// (file offset, size, slot offset) uint64 triples for the stored, non-empty ones).
py::tuple plan_arena(const py::dict& records, Py_ssize_t limit, Py_ssize_t alignment) {
  if (alignment <= 0 || (alignment & (alignment - 1)) != 0) {
    throw py::value_error("plan_arena: alignment must be a power of two");
  }
  py::dict offsets;
  std::string requests;  // packed uint64 triples
  std::uint64_t total = 0;
  const auto push = [&requests](std::uint64_t v) {
    requests.append(reinterpret_cast<const char*>(&v), sizeof v);
  };
  for (const auto& item : records) {
    PyObject* name = item.first.ptr();
    PyObject* record = item.second.ptr();
    if (!PyUnicode_Check(name) || PyUnicode_Tailmatch(name, names.data_prefix, 0, 5, -1) != 1 ||
        !PyTuple_Check(record) || PyTuple_GET_SIZE(record) != 3) {
      continue;
    }
    const Py_ssize_t offset = small_index(PyTuple_GET_ITEM(record, 0));
    const Py_ssize_t size = small_index(PyTuple_GET_ITEM(record, 1));
    const Py_ssize_t method = small_index(PyTuple_GET_ITEM(record, 2));
    if (offset < 0 || size < 0 || size >= limit) continue;
    py::object key = py::reinterpret_steal<py::object>(
        PyUnicode_Substring(name, 5, PyUnicode_GET_LENGTH(name)));
    if (!key) throw py::error_already_set();
    offsets[key] = total;
    if (size > 0 && method == 0) {
      push(static_cast<std::uint64_t>(offset));
      push(static_cast<std::uint64_t>(size));
      push(total);
    }
    const auto align = static_cast<std::uint64_t>(alignment);
    total += (static_cast<std::uint64_t>(size) + align - 1) & ~(align - 1);
  }
  return py::make_tuple(total, offsets, py::bytes(requests));
}

}  // namespace

void register_unpickle(py::module_& m) {
  names.storage = intern("storage");
  names.data_prefix = intern("data/");
  names.dtype = intern("dtype");
  names.untyped_storage = intern("_untyped_storage");
  names.resizable = intern("resizable");
  names.nbytes = intern("nbytes");
  names.device = intern("device");
  names.new_ = intern("new");
  names.set_ = intern("set_");
  names.requires_grad = intern("requires_grad");
  names.backward_hooks = intern("_backward_hooks");

  PyObject* slicer_type = PyType_FromSpec(&slicer_spec);
  if (slicer_type == nullptr) throw py::error_already_set();
  m.add_object("StorageSlicer", py::reinterpret_steal<py::object>(slicer_type));

  m.def("plan_arena", &plan_arena, py::arg("records"), py::arg("limit"), py::arg("alignment"),
        "The block of a load's small storages: every data/<key> record of `records` ({name: "
        "(data offset, size, method)}) below `limit` bytes gets an `alignment`-aligned slot in "
        "record order. Returns (total bytes, {key: slot offset}, bytes of uint64 (file offset, "
        "size, slot offset) triples for the stored, non-empty ones: read_into's requests "
        "relative to the block's address).");

  m.def(
      "fast_rebuild_v2",
      [](const py::object& fallback, const py::object& typed, const py::object& untyped,
         const py::object& make_empty, const py::object& set_metadata, const py::object& cpu) {
        const py::tuple bound = py::make_tuple(fallback, typed, untyped, py::dict(), make_empty,
                                               set_metadata, cpu);
        PyObject* f = PyCFunction_NewEx(&rebuild_def, bound.ptr(), nullptr);
        if (f == nullptr) throw py::error_already_set();
        return py::reinterpret_steal<py::object>(f);
      },
      py::arg("fallback"), py::arg("typed"), py::arg("untyped"), py::arg("make_empty"),
      py::arg("set_metadata"), py::arg("cpu"),
      "A C callable with torch._utils._rebuild_tensor_v2's signature: for a `typed` storage "
      "over a non-resizable `untyped` storage on device `cpu` it builds the tensor itself "
      "(make_empty(dtype) gives the empty tensor of each dtype that Tensor.new copies), and "
      "calls fallback otherwise or when anything fails.");

  py::class_<PickleScan>(m, "PickleScan",
                         "What scan_pickle saw (see csrc/include/ckptio/pickle_scan.hpp).")
      .def_readonly("opcodes", &PickleScan::opcodes)
      .def_readonly("memo_puts", &PickleScan::memo_puts)
      .def_readonly("memo_size", &PickleScan::memo_size,
                    "Highest memo index stored, plus one (0: none stored).")
      .def_readonly("max_depth", &PickleScan::max_depth)
      .def_readonly("end", &PickleScan::end, "Offset just past STOP (0: stopped early).")
      .def_readonly("complete", &PickleScan::complete,
                    "False when a lenient scan stopped at an unknown opcode.");

  // The pre-scan of a Python buffer, with the GIL released.
  auto scan_buffer = [](const py::buffer& data, bool weights_only, bool collect_globals) {
    py::buffer_info info = data.request();
    const auto n = static_cast<std::size_t>(info.size * info.itemsize);
    PickleScanOptions options;
    options.weights_only = weights_only;
    options.collect_globals = collect_globals;
    py::gil_scoped_release nogil;
    return scan_pickle(info.ptr, n, options);
  };

  m.def(
      "scan_pickle",
      [scan_buffer](const py::buffer& data, bool weights_only) {
        return scan_buffer(data, weights_only, false);
      },
      py::arg("data"), py::arg("weights_only"),
      "Checks a pickle's opcodes without running them (lengths, memo GETs, stack, and in "
      "weights-only mode the opcodes torch's weights-only unpickler supports). Returns a "
      "PickleScan (memo_size: the largest memo index stored, plus one); raises CheckpointError.");

  m.def(
      "pickle_globals",
      [scan_buffer](const py::buffer& data, bool weights_only) {
        const PickleScan scan = scan_buffer(data, weights_only, true);
        // The names as the unpickler decodes GLOBAL's lines (UTF-8), undecodable bytes escaped.
        auto text = [](const std::string& s) {
          PyObject* u = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()),
                                             "backslashreplace");
          if (u == nullptr) throw py::error_already_set();
          return py::reinterpret_steal<py::str>(u);
        };
        py::list out;
        for (const auto& [module, name] : scan.globals) out.append(py::make_tuple(text(module), text(name)));
        return out;
      },
      py::arg("data"), py::arg("weights_only"),
      "The (module, name) of every global a pickle names (GLOBAL, INST, and STACK_GLOBAL whose "
      "operands are strings pushed or fetched from the memo), in order of first appearance, "
      "each once; found by the pre-scan (scan_pickle's checks, same errors), nothing run.");
}

}  // namespace ckptio::bindings
