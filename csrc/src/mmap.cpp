#include "ckptio/mmap.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <limits>

#include "ckptio/errors.hpp"

namespace ckptio {

std::shared_ptr<Mapping> Mapping::map_file(const File& file, bool shared) {
  const std::uint64_t size = file.size();
  // mmap of length 0 fails with EINVAL; an empty file is simply an empty mapping.
  if (size == 0) return std::shared_ptr<Mapping>(new Mapping(nullptr, 0, shared, file.name()));
  if (size > std::numeric_limits<std::size_t>::max()) throw IoError(ENOMEM, "mmap", file.name());
  void* p = ::mmap(nullptr, static_cast<std::size_t>(size), PROT_READ | PROT_WRITE,
                   shared ? MAP_SHARED : MAP_PRIVATE, file.fd(), 0);
  if (p == MAP_FAILED) throw IoError(errno, "mmap", file.name());
  try {
    return std::shared_ptr<Mapping>(
        new Mapping(static_cast<std::uint8_t*>(p), size, shared, file.name()));
  } catch (...) {
    ::munmap(p, static_cast<std::size_t>(size));
    throw;
  }
}

Mapping::~Mapping() {
  if (data_ != nullptr) ::munmap(data_, static_cast<std::size_t>(size_));
}

void Mapping::will_need(std::uint64_t offset, std::uint64_t length) const noexcept {
  if (data_ == nullptr || offset >= size_ || length == 0) return;
  if (length > size_ - offset) length = size_ - offset;
  const long page_size = ::sysconf(_SC_PAGESIZE);
  const std::uint64_t page = page_size > 0 ? static_cast<std::uint64_t>(page_size) : 4096;
  // madvise wants a page-aligned start; the mapping itself starts on a page boundary.
  const std::uint64_t begin = offset - offset % page;
  const std::uint64_t end = offset + length;
  (void)::madvise(data_ + begin, static_cast<std::size_t>(end - begin), MADV_WILLNEED);
}

}  // namespace ckptio
