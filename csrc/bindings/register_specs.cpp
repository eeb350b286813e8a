// load_into's hot paths (python/ckptio/_load_into.py): data.pkl unpickled into TensorSpecs
// instead of tensors, and the plan of the reads that fill a target's tensors.
//
// load_into must parse the whole pickle before it reads a byte (it has to know where each
// tensor goes), so for 20,000 small tensors its per-tensor Python (persistent_load, the
// rebuild and its geometry check, the match against the target) cost more than the read
// itself. The same steps here, for the common case only: a storage id naming a stored record
// of the right size, a rebuild with a geometry that fits, a target tensor that is contiguous
// on the CPU with the file's dtype and shape. Every other case, and every failure, goes to
// the Python functions, which hold the policy and name every problem (_unpickler.py).
#include <Python.h>

#include <array>
#include <cstdint>
#include <set>
#include <string>

#include "pyobjects.hpp"
#include "register.hpp"
#include "storage_ids.hpp"

namespace py = pybind11;

namespace ckptio::bindings {

namespace {

struct Names {
  PyObject* storage;        // "storage", the persistent id's tag
  PyObject* data_prefix;    // "data/"
  PyObject* dtype;          // Tensor.dtype
  PyObject* layout;         // Tensor.layout
  PyObject* is_cpu;         // Tensor.is_cpu
  PyObject* shape;          // Tensor.shape
  PyObject* is_contiguous;  // Tensor.is_contiguous()
  PyObject* data_ptr;       // Tensor.data_ptr()
  PyObject* itemsize;       // torch.dtype.itemsize
};
Names names;

// Both are struct sequences (named tuples made in C): cheap to build here, immutable, and
// compared and printed by value. A pickle cannot make either (no allowed global names them),
// so `type(x) is StorageRef` tells a storage of the file from anything the pickle built.
PyTypeObject* storage_ref_type = nullptr;
PyTypeObject* tensor_spec_type = nullptr;

PyStructSequence_Field storage_ref_fields[] = {
    {"data_offset", "file offset of the storage's first byte (its record's data)"},
    {"nbytes", "the storage's size in bytes"},
    {"dtype", "the storage's dtype"},
    {"itemsize", "bytes per element of dtype"},
    {nullptr, nullptr}};
PyStructSequence_Desc storage_ref_desc = {
    "ckptio._core.pickling.StorageRef",
    "StorageRef((data_offset, nbytes, dtype, itemsize)): a storage of the file, not read.",
    storage_ref_fields, 4};

PyStructSequence_Field tensor_spec_fields[] = {
    {"data_offset", "file offset of the first byte of the tensor's storage"},
    {"dtype", "the tensor's dtype"},
    {"storage_offset", "offset of the tensor's first element in its storage, in elements"},
    {"size", "the tensor's size (a tuple)"},
    {"stride", "the tensor's stride, in elements (a tuple)"},
    {nullptr, nullptr}};
PyStructSequence_Desc tensor_spec_desc = {
    "ckptio._core.pickling.TensorSpec",
    "TensorSpec((data_offset, dtype, storage_offset, size, stride)): a dense tensor of the file, "
    "without a torch object; its geometry was checked against its storage.",
    tensor_spec_fields, 5};

// A struct sequence of `type` over `items`, which it takes (nullptr items: it fails, and
// releases the others).
template <std::size_t N>
PyObject* new_struct(PyTypeObject* type, std::array<PyObject*, N> items) {
  PyObject* out = nullptr;
  bool complete = true;
  for (PyObject* item : items) complete = complete && item != nullptr;
  if (complete) out = PyStructSequence_New(type);
  if (out == nullptr) {
    for (PyObject* item : items) Py_XDECREF(item);
    return nullptr;
  }
  for (std::size_t i = 0; i < N; ++i) PyStructSequence_SET_ITEM(out, i, items[i]);
  return out;
}

PyObject* owned(PyObject* o) {
  Py_INCREF(o);
  return o;
}

// ---------------------------------------------------------------------------------------
// persistent_load for specs: a StorageRef for a stored record of the right size, one per key
// (ties and views share it). The bound tuple is (fallback, records, types, loaded).
PyObject* spec_storage_fast(PyObject* bound, PyObject* saved_id) {
  PyObject* records = PyTuple_GET_ITEM(bound, 1);
  PyObject* loaded = PyTuple_GET_ITEM(bound, 3);
  StorageId id{};
  if (!parse_storage_id(saved_id, PyTuple_GET_ITEM(bound, 2), names.storage, &id)) {
    return nullptr;
  }
  PyObject* cached = PyDict_GetItemWithError(loaded, id.key);
  if (cached != nullptr) return owned(cached);
  if (PyErr_Occurred() != nullptr) return nullptr;
  const Py_ssize_t start = record_start(records, names.data_prefix, id.key, id.nbytes);
  if (start < 0) return nullptr;  // the fallback names the problem
  PyObject* ref = new_struct<4>(
      storage_ref_type, {PyLong_FromSsize_t(start), PyLong_FromSsize_t(id.nbytes),
                         owned(id.dtype), PyLong_FromSsize_t(id.element_size)});
  if (ref == nullptr || PyDict_SetItem(loaded, id.key, ref) != 0) {
    Py_XDECREF(ref);
    return nullptr;
  }
  return ref;
}

PyObject* spec_storage_call(PyObject* bound, PyObject* const* args, Py_ssize_t nargs) {
  PyObject* out = nargs == 1 ? spec_storage_fast(bound, args[0]) : nullptr;
  if (out != nullptr || !fall_back_after_failure()) return out;
  return PyObject_Vectorcall(PyTuple_GET_ITEM(bound, 0), args, nargs, nullptr);
}

PyMethodDef spec_storage_def = {"persistent_load",
                                reinterpret_cast<PyCFunction>(spec_storage_call), METH_FASTCALL,
                                "persistent_load for load_into's parse: a StorageRef per stored "
                                "record; anything else goes to the Python persistent_load."};

// Whether (offset, size, stride) is a geometry to take as it is: exact non-negative ints, as
// many sizes as strides (exact tuples) and, for a tensor with elements, a last element inside
// the `nbytes` of its storage. False for anything else: the Python check judges it.
bool geometry_fits(PyObject* offset, PyObject* size, PyObject* stride, Py_ssize_t itemsize,
                   Py_ssize_t nbytes) {
  Py_ssize_t last = small_index(offset);
  if (last < 0 || itemsize <= 0 || !PyTuple_CheckExact(size) || !PyTuple_CheckExact(stride) ||
      PyTuple_GET_SIZE(size) != PyTuple_GET_SIZE(stride)) {
    return false;
  }
  bool empty = false;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(size); ++i) {
    const Py_ssize_t n = small_index(PyTuple_GET_ITEM(size, i));
    const Py_ssize_t step = small_index(PyTuple_GET_ITEM(stride, i));
    if (n < 0 || step < 0) return false;
    Py_ssize_t span = 0;
    if (n == 0) {
      empty = true;
    } else if (__builtin_mul_overflow(n - 1, step, &span) ||
               __builtin_add_overflow(last, span, &last)) {
      return false;
    }
  }
  Py_ssize_t needed = 0;
  return empty || (!__builtin_mul_overflow(last + 1, itemsize, &needed) && needed <= nbytes);
}

// rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks[, metadata])
// over a StorageRef: its TensorSpec. The bound object is the Python rebuild (the fallback).
PyObject* spec_rebuild_fast(PyObject* const* args, Py_ssize_t nargs) {
  if ((nargs != 6 && nargs != 7) || Py_TYPE(args[0]) != storage_ref_type) return nullptr;
  PyObject* ref = args[0];
  const Py_ssize_t nbytes = small_index(PyStructSequence_GET_ITEM(ref, 1));
  const Py_ssize_t itemsize = small_index(PyStructSequence_GET_ITEM(ref, 3));
  if (!geometry_fits(args[1], args[2], args[3], itemsize, nbytes)) return nullptr;
  return new_struct<5>(tensor_spec_type,
                       {owned(PyStructSequence_GET_ITEM(ref, 0)),
                        owned(PyStructSequence_GET_ITEM(ref, 2)), owned(args[1]),
                        owned(args[2]), owned(args[3])});
}

PyObject* spec_rebuild_call(PyObject* fallback, PyObject* const* args, Py_ssize_t nargs) {
  PyObject* out = spec_rebuild_fast(args, nargs);
  if (out != nullptr || !fall_back_after_failure()) return out;
  return PyObject_Vectorcall(fallback, args, nargs, nullptr);
}

PyMethodDef spec_rebuild_def = {"rebuild_tensor_v2",
                                reinterpret_cast<PyCFunction>(spec_rebuild_call), METH_FASTCALL,
                                "torch._utils._rebuild_tensor_v2 over a StorageRef, for "
                                "load_into's parse: a TensorSpec; anything else goes to the "
                                "Python rebuild."};

// ---------------------------------------------------------------------------------------
// The reads that fill the target's tensors straight from the file.

using Read = std::array<std::uint64_t, 3>;  // file offset, bytes, address

enum class Plan { kPython, kRead, kNothing };

// What the target tensor `dest` needs from the file's `spec`: a read straight into its memory
// (kRead, in `read`), nothing (kNothing: same dtype and shape, no elements), or the Python
// match's judgement (kPython: a mismatch to report, a strided or device tensor, an odd
// spec). Throws for errors that must go out as they are.
Plan plan_one(PyObject* dest, PyObject* spec, PyObject* strided, Read* read) {
  PyObject* dtype = PyStructSequence_GET_ITEM(spec, 1);
  PyObject* size = PyStructSequence_GET_ITEM(spec, 3);
  PyObject* stride = PyStructSequence_GET_ITEM(spec, 4);
  if (!PyTuple_CheckExact(size) || !PyTuple_CheckExact(stride) ||
      PyTuple_GET_SIZE(size) != PyTuple_GET_SIZE(stride)) {
    return Plan::kPython;
  }
  Refs refs;
  const auto failed = [] {
    if (!fall_back_after_failure()) throw py::error_already_set();
    return Plan::kPython;
  };
  PyObject* got = refs.keep(PyObject_GetAttr(dest, names.dtype));
  if (got == nullptr) return failed();
  if (got != dtype) return Plan::kPython;
  PyObject* shape = refs.keep(PyObject_GetAttr(dest, names.shape));
  if (shape == nullptr) return failed();
  const int same_shape = PyObject_RichCompareBool(shape, size, Py_EQ);
  if (same_shape != 1) return same_shape < 0 ? failed() : Plan::kPython;
  PyObject* layout = refs.keep(PyObject_GetAttr(dest, names.layout));
  if (layout == nullptr) return failed();
  if (layout != strided) return Plan::kPython;

  // The file's tensor: its element count, and whether it is contiguous as torch defines it
  // (dimensions of size 1 take any stride).
  std::uint64_t numel = 1;
  std::uint64_t expected = 1;
  bool contiguous = true;
  for (Py_ssize_t i = PyTuple_GET_SIZE(size) - 1; i >= 0; --i) {
    const Py_ssize_t n = small_index(PyTuple_GET_ITEM(size, i));
    const Py_ssize_t step = small_index(PyTuple_GET_ITEM(stride, i));
    if (n < 0 || step < 0) return Plan::kPython;
    if (n != 1 && static_cast<std::uint64_t>(step) != expected) contiguous = false;
    if (__builtin_mul_overflow(numel, static_cast<std::uint64_t>(n), &numel)) {
      return Plan::kPython;
    }
    expected = numel;
  }
  if (numel == 0) return Plan::kNothing;
  if (!contiguous) return Plan::kPython;

  PyObject* is_cpu = refs.keep(PyObject_GetAttr(dest, names.is_cpu));
  if (is_cpu == nullptr) return failed();
  if (is_cpu != Py_True) return Plan::kPython;
  PyObject* dest_contiguous = refs.keep(PyObject_CallMethodNoArgs(dest, names.is_contiguous));
  if (dest_contiguous == nullptr) return failed();
  if (dest_contiguous != Py_True) return Plan::kPython;

  PyObject* itemsize_obj = refs.keep(PyObject_GetAttr(dtype, names.itemsize));
  if (itemsize_obj == nullptr) return failed();
  const Py_ssize_t itemsize = small_index(itemsize_obj);
  const Py_ssize_t data_offset = small_index(PyStructSequence_GET_ITEM(spec, 0));
  const Py_ssize_t storage_offset = small_index(PyStructSequence_GET_ITEM(spec, 2));
  if (itemsize <= 0 || data_offset < 0 || storage_offset < 0) return Plan::kPython;
  std::uint64_t nbytes = 0;
  std::uint64_t skip = 0;
  std::uint64_t start = 0;
  if (__builtin_mul_overflow(numel, static_cast<std::uint64_t>(itemsize), &nbytes) ||
      __builtin_mul_overflow(static_cast<std::uint64_t>(storage_offset),
                             static_cast<std::uint64_t>(itemsize), &skip) ||
      __builtin_add_overflow(static_cast<std::uint64_t>(data_offset), skip, &start)) {
    return Plan::kPython;
  }
  PyObject* address = refs.keep(PyObject_CallMethodNoArgs(dest, names.data_ptr));
  if (address == nullptr) return failed();
  const unsigned long long ptr = PyLong_AsUnsignedLongLong(address);
  if (ptr == static_cast<unsigned long long>(-1) && PyErr_Occurred() != nullptr) return failed();
  *read = {start, nbytes, static_cast<std::uint64_t>(ptr)};
  return Plan::kRead;
}

py::tuple plan_direct_reads(const py::dict& dests, const py::dict& srcs,
                            const py::object& strided) {
  py::list rest;
  std::string requests;  // packed uint64 triples
  std::set<Read> seen;   // tied tensors: one read
  PyObject* path = nullptr;
  PyObject* dest = nullptr;
  Py_ssize_t pos = 0;
  while (PyDict_Next(dests.ptr(), &pos, &path, &dest)) {
    const py::object hold_path = py::reinterpret_borrow<py::object>(path);
    const py::object hold_dest = py::reinterpret_borrow<py::object>(dest);
    PyObject* src = PyDict_GetItemWithError(srcs.ptr(), path);  // borrowed
    if (src == nullptr) {
      if (PyErr_Occurred() != nullptr) throw py::error_already_set();
      continue;  // missing from the file: the Python match reports it
    }
    Read read{};
    const Plan plan = Py_TYPE(src) == tensor_spec_type
                          ? plan_one(dest, src, strided.ptr(), &read)
                          : Plan::kPython;
    if (plan == Plan::kPython) {
      rest.append(hold_path);
    } else if (plan == Plan::kRead && seen.insert(read).second) {
      requests.append(reinterpret_cast<const char*>(read.data()), sizeof read);
    }
  }
  return py::make_tuple(py::bytes(requests), rest);
}

PyTypeObject* new_struct_type(PyStructSequence_Desc* desc) {
  PyTypeObject* type = PyStructSequence_NewType(desc);
  if (type == nullptr) throw py::error_already_set();
  return type;
}

py::object bind(PyMethodDef* def, const py::object& self) {
  PyObject* f = PyCFunction_NewEx(def, self.ptr(), nullptr);
  if (f == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(f);
}

}  // namespace

void register_specs(py::module_& m) {
  names.storage = intern("storage");
  names.data_prefix = intern("data/");
  names.dtype = intern("dtype");
  names.layout = intern("layout");
  names.is_cpu = intern("is_cpu");
  names.shape = intern("shape");
  names.is_contiguous = intern("is_contiguous");
  names.data_ptr = intern("data_ptr");
  names.itemsize = intern("itemsize");

  storage_ref_type = new_struct_type(&storage_ref_desc);
  tensor_spec_type = new_struct_type(&tensor_spec_desc);
  // The module holds a reference to each; the statics borrow them for its lifetime.
  m.add_object("StorageRef", py::reinterpret_steal<py::object>(
                                 reinterpret_cast<PyObject*>(storage_ref_type)));
  m.add_object("TensorSpec", py::reinterpret_steal<py::object>(
                                 reinterpret_cast<PyObject*>(tensor_spec_type)));

  m.def(
      "spec_persistent_load",
      [](const py::object& fallback, const py::dict& records, const py::dict& types,
         const py::dict& loaded) {
        return bind(&spec_storage_def, py::make_tuple(fallback, records, types, loaded));
      },
      py::arg("fallback"), py::arg("records"), py::arg("types"), py::arg("loaded"),
      "A C persistent_load for load_into's parse: for a storage id naming a stored record "
      "data/<key> of `records` of exactly the storage's size, of a storage type that `types` "
      "({type: (dtype, element size)}) knows, a StorageRef, memoised by key in `loaded`. "
      "Anything else, and every failure, goes to fallback.");
  m.def(
      "spec_rebuild_v2",
      [](const py::object& fallback) { return bind(&spec_rebuild_def, fallback); },
      py::arg("fallback"),
      "A C callable with torch._utils._rebuild_tensor_v2's signature for load_into's parse: "
      "over a StorageRef, with a geometry of exact ints that fits it, the TensorSpec; "
      "fallback otherwise, or when anything fails.");
  m.def("plan_direct_reads", &plan_direct_reads, py::arg("dests"), py::arg("srcs"),
        py::arg("strided"),
        "The reads that fill the tensors of `dests` ({path: tensor}) straight from the file's "
        "`srcs` ({path: TensorSpec}): where both have the same dtype and shape and are "
        "contiguous, and the destination is on the CPU with layout `strided`. Returns (bytes of "
        "uint64 (file offset, size, address) triples, one per distinct read, for read_into; "
        "the paths of both that Python must match itself, in `dests` order). Paths missing "
        "from srcs, and tensors with no elements, are in neither.");
}

}  // namespace ckptio::bindings
