// Entry points of the binding areas; module.cpp calls each once. Only files in csrc/bindings
// include pybind11.
#pragma once

#include <pybind11/pybind11.h>

#include <exception>

namespace ckptio::bindings {

void register_errors(pybind11::module_& m);

/// Sets the Python exception for a ckptio C++ error (CheckpointError, OSError, ValueError,
/// RuntimeError), as pybind11 does at a binding's boundary; for C functions the pickler calls
/// directly. Rethrows anything else.
void set_python_error(std::exception_ptr p);
void register_io(pybind11::module_& m);
void register_zip(pybind11::module_& m);
void register_pickle(pybind11::module_& m);
void register_unpickle(pybind11::module_& m);
void register_specs(pybind11::module_& m);

}  // namespace ckptio::bindings
