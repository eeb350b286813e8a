#include "ckptio/byte_source.hpp"

#include <cstring>
#include <utility>

#include "ckptio/errors.hpp"

namespace ckptio {

void ByteSource::read_vectored(struct iovec* iov, int count, std::uint64_t offset) const {
  for (int i = 0; i < count; ++i) {
    read_exact(iov[i].iov_base, iov[i].iov_len, offset);
    offset += iov[i].iov_len;
  }
}

MemorySource::MemorySource(const void* data, std::uint64_t size, std::string name)
    : data_(static_cast<const std::uint8_t*>(data)), size_(size), name_(std::move(name)) {
  if (data_ == nullptr && size_ != 0) {
    throw InvalidArgument("MemorySource: null data with a nonzero size");
  }
}

void MemorySource::read_exact(void* dst, std::size_t n, std::uint64_t offset) const {
  if (n == 0) return;
  // Written as subtraction so that a hostile offset cannot wrap around.
  if (offset > size_ || n > size_ - offset) {
    throw FormatError(name_ + ": truncated: wanted " + std::to_string(n) + " bytes at offset " +
                      std::to_string(offset) + ", file has " + std::to_string(size_) + " bytes");
  }
  std::memcpy(dst, data_ + offset, n);
}

}  // namespace ckptio
