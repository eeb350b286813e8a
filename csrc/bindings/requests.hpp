// Decoding of request batches passed from Python as flat uint64 buffers (array('Q')): one
// object for 20,000 requests instead of 20,000 tuples.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "ckptio/errors.hpp"
#include "ckptio/parallel_io.hpp"

namespace ckptio::bindings {

/// (offset, length, address) triples -> ReadRequests.
inline std::vector<ReadRequest> parse_read_requests(const pybind11::buffer& requests) {
  pybind11::buffer_info info = requests.request();
  if (info.ndim != 1 || info.itemsize != 8 || info.strides[0] != 8 || info.size % 3 != 0) {
    throw InvalidArgument("requests must be a flat uint64 buffer of (offset, length, address)");
  }
  const auto* values = static_cast<const std::uint64_t*>(info.ptr);
  std::vector<ReadRequest> out(static_cast<std::size_t>(info.size / 3));
  for (std::size_t i = 0; i < out.size(); ++i) {
    out[i] = ReadRequest{values[3 * i], values[3 * i + 1],
                         reinterpret_cast<void*>(static_cast<std::uintptr_t>(values[3 * i + 2]))};
  }
  return out;
}

/// (offset, length, address) triples -> WriteRequests (the bytes at address go to offset).
inline std::vector<WriteRequest> parse_write_requests(const pybind11::buffer& requests) {
  pybind11::buffer_info info = requests.request();
  if (info.ndim != 1 || info.itemsize != 8 || info.strides[0] != 8 || info.size % 3 != 0) {
    throw InvalidArgument("requests must be a flat uint64 buffer of (offset, length, address)");
  }
  const auto* values = static_cast<const std::uint64_t*>(info.ptr);
  std::vector<WriteRequest> out(static_cast<std::size_t>(info.size / 3));
  for (std::size_t i = 0; i < out.size(); ++i) {
    out[i] = WriteRequest{
        values[3 * i], values[3 * i + 1],
        reinterpret_cast<const void*>(static_cast<std::uintptr_t>(values[3 * i + 2]))};
  }
  return out;
}

}  // namespace ckptio::bindings
