// Entry points of the binding areas; module.cpp calls each once. Only files in csrc/bindings
// include pybind11.
#pragma once

#include <pybind11/pybind11.h>

namespace ckptio::bindings {

void register_errors(pybind11::module_& m);
void register_io(pybind11::module_& m);
void register_zip(pybind11::module_& m);
void register_pickle(pybind11::module_& m);
void register_unpickle(pybind11::module_& m);
void register_specs(pybind11::module_& m);

}  // namespace ckptio::bindings
