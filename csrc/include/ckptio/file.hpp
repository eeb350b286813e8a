// RAII file handle with full positional I/O: every read and write loops over short and
// interrupted (EINTR) transfers, so callers never see a partial operation.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "ckptio/byte_source.hpp"

namespace ckptio {

class File final : public ByteSource {
 public:
  enum class Mode {
    kRead,       ///< O_RDONLY; the path must exist.
    kCreate,     ///< O_WRONLY|O_CREAT|O_TRUNC, mode 0666 before umask.
    kReadWrite,  ///< O_RDWR; the path must exist.
  };

  /// Opens `path`. Throws IoError (with errno and the path) on failure, including when the
  /// path is a directory.
  static File open(const std::string& path, Mode mode);

  /// Takes a duplicate of an open descriptor (the caller keeps its own). `name` is used in
  /// messages.
  static File adopt(int fd, const std::string& name);

  File() = default;
  File(File&& other) noexcept;
  File& operator=(File&& other) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File() override;

  bool is_open() const noexcept { return fd_ >= 0; }
  int fd() const noexcept { return fd_; }
  const std::string& name() const override { return path_; }

  /// Current size (fstat).
  std::uint64_t size() const override;

  /// pread loop. Hitting end of file before `n` bytes throws FormatError ("truncated").
  void read_exact(void* dst, std::size_t n, std::uint64_t offset) const override;

  /// preadv loop (IOV_MAX buffers per call, partial reads resumed).
  void read_vectored(struct iovec* iov, int count, std::uint64_t offset) const override;

  /// False when the byte's page is not in the page cache: cachestat(2) (Linux 6.5), which
  /// reads nothing. Where cachestat is missing or refused, a one-byte preadv2(RWF_NOWAIT),
  /// whose miss starts the kernel's readahead of that page: on a fast device that read can
  /// finish before the probe returns, so a cold page then sometimes answers true. True where
  /// neither can say.
  bool cached(std::uint64_t offset) const override;

  /// pwrite loop: writes all `n` bytes at `offset` or throws IoError.
  void write_all(const void* src, std::size_t n, std::uint64_t offset) const;

  /// pwritev loop over `count` buffers that land contiguously from `offset`. `iov` is
  /// modified while partial writes are resumed.
  void writev_all(struct iovec* iov, int count, std::uint64_t offset) const;

  /// Reserves `size` bytes of disk (posix_fallocate where the file system supports it, so a
  /// full disk fails here and not mid-write), falling back to ftruncate.
  /// Only [from, size) is reserved when `from` is given: the part before it already was.
  void preallocate(std::uint64_t size, std::uint64_t from = 0) const;

  /// ftruncate.
  void truncate(std::uint64_t size) const;

  /// fsync: data and metadata reach stable storage.
  void sync() const;

  /// Closes now and reports errors (the destructor closes silently).
  void close();

 private:
  File(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  int fd_ = -1;
  std::string path_;
};

/// fsync of a directory, so that a rename inside it survives a power loss.
void sync_directory(const std::string& path);

/// Swaps the paths `a` and `b` (both must exist) in one atomic step: renameat2 with
/// RENAME_EXCHANGE, so that every observer sees either the old or the new entry under each
/// name, never neither. Returns false where the kernel or the filesystem cannot exchange
/// (ENOSYS, EINVAL, ENOTSUP: the caller falls back to two renames); throws IoError otherwise.
bool exchange_paths(const std::string& a, const std::string& b);

}  // namespace ckptio
