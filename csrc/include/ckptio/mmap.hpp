// A memory mapping of a whole file. Tensors built on it share its lifetime through the
// owning shared_ptr (the bindings hand Python an object that holds it).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "ckptio/file.hpp"

namespace ckptio {

class Mapping {
 public:
  /// Maps all of `file` readable and writable. shared=false gives MAP_PRIVATE: writes stay
  /// in the process (copy-on-write), the file never changes (torch's default for mmap loads).
  /// shared=true gives MAP_SHARED: writes reach the file. An empty file maps to no memory.
  static std::shared_ptr<Mapping> map_file(const File& file, bool shared);

  ~Mapping();
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  std::uint8_t* data() const noexcept { return data_; }
  std::uint64_t size() const noexcept { return size_; }
  bool shared() const noexcept { return shared_; }
  const std::string& name() const noexcept { return name_; }

  /// madvise(WILLNEED) over a range (best effort, errors ignored): starts readahead.
  void will_need(std::uint64_t offset, std::uint64_t length) const noexcept;

 private:
  Mapping(std::uint8_t* data, std::uint64_t size, bool shared, std::string name)
      : data_(data), size_(size), shared_(shared), name_(std::move(name)) {}
  std::uint8_t* data_;
  std::uint64_t size_;
  bool shared_;
  std::string name_;
};

}  // namespace ckptio
