// Byte sources the bindings hand to the library on Python's behalf.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "ckptio/byte_source.hpp"
#include "ckptio/errors.hpp"

namespace ckptio::bindings {

/// A ByteSource over a Python buffer (bytes, bytearray, memoryview): keeps the buffer pinned.
class BufferSource {
 public:
  BufferSource(pybind11::buffer buffer, std::string name) : buffer_(std::move(buffer)) {
    view_ = buffer_.request();
    if (view_.ndim != 1 || view_.itemsize != 1 || view_.strides[0] != 1) {
      throw InvalidArgument("BufferSource needs a contiguous byte buffer");
    }
    source_ = std::make_unique<MemorySource>(view_.ptr, static_cast<std::uint64_t>(view_.size),
                                             std::move(name));
  }
  const ByteSource& source() const { return *source_; }

 private:
  pybind11::buffer buffer_;
  pybind11::buffer_info view_;
  std::unique_ptr<MemorySource> source_;
};

}  // namespace ckptio::bindings
