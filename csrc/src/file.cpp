#include "ckptio/file.hpp"

#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <limits>
#include <utility>

#include "ckptio/errors.hpp"

namespace ckptio {
namespace {

constexpr std::uint64_t kMaxOffset = static_cast<std::uint64_t>(std::numeric_limits<off_t>::max());

// Linux moves at most this much per read/write call anyway; asking for less keeps every
// length well inside ssize_t.
constexpr std::size_t kMaxTransfer = std::size_t{1} << 30;

// How many buffers from `first` one preadv/pwritev call takes: at most IOV_MAX, and a total
// that fits in ssize_t (kMaxTransfer).
int iov_batch(const struct iovec* iov, int first, int count) {
  int batch = 0;
  std::size_t batch_bytes = 0;
  while (first + batch < count && batch < IOV_MAX) {
    const std::size_t len = iov[first + batch].iov_len;
    if (batch > 0 && len > kMaxTransfer - std::min(batch_bytes, kMaxTransfer)) break;
    batch_bytes += len;
    ++batch;
  }
  return batch;
}

// Consumes `done` transferred bytes from the buffers at `first` (a partial transfer leaves the
// rest of a buffer for the next call); returns the first buffer not fully transferred.
int iov_advance(struct iovec* iov, int first, std::size_t done) {
  while (done > 0) {
    if (done >= iov[first].iov_len) {
      done -= iov[first].iov_len;
      iov[first].iov_len = 0;
      ++first;
    } else {
      iov[first].iov_base = static_cast<std::uint8_t*>(iov[first].iov_base) + done;
      iov[first].iov_len -= done;
      done = 0;
    }
  }
  return first;
}


int open_flags(File::Mode mode) {
  switch (mode) {
    case File::Mode::kRead:
      return O_RDONLY | O_CLOEXEC;
    case File::Mode::kCreate:
      return O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC;
    case File::Mode::kReadWrite:
      return O_RDWR | O_CLOEXEC;
  }
  throw InvalidArgument("File::open: unknown mode");
}

// A write range whose end does not fit in off_t can never succeed; say so before the kernel
// answers with a less helpful EINVAL.
void check_write_range(std::uint64_t offset, std::uint64_t n, const std::string& path) {
  if (offset > kMaxOffset || n > kMaxOffset - offset) throw IoError(EFBIG, "pwrite", path);
}

}  // namespace

File File::open(const std::string& path, Mode mode) {
  const int flags = open_flags(mode);
  int fd;
  do {
    fd = ::open(path.c_str(), flags, 0666);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) throw IoError(errno, "open", path);
  File file(fd, path);
  // O_RDONLY succeeds on a directory; reading it would fail later with a confusing EISDIR
  // from pread, so refuse it here like the writable modes do.
  if (mode == Mode::kRead) {
    struct stat st;
    if (::fstat(fd, &st) != 0) throw IoError(errno, "fstat", path);
    if (S_ISDIR(st.st_mode)) throw IoError(EISDIR, "open", path);
  }
  return file;
}

File File::adopt(int fd, const std::string& name) {
  const int dup_fd = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dup_fd < 0) throw IoError(errno, "dup", name);
  return File(dup_fd, name);
}

File::File(File&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)), path_(std::move(other.path_)) {}

File& File::operator=(File&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
    path_ = std::move(other.path_);
  }
  return *this;
}

File::~File() {
  if (fd_ >= 0) ::close(fd_);
}

std::uint64_t File::size() const {
  struct stat st;
  if (::fstat(fd_, &st) != 0) throw IoError(errno, "fstat", path_);
  return static_cast<std::uint64_t>(st.st_size);
}

void File::read_exact(void* dst, std::size_t n, std::uint64_t offset) const {
  auto* out = static_cast<std::uint8_t*>(dst);
  std::size_t done = 0;
  while (done < n) {
    if (offset > kMaxOffset || done > kMaxOffset - offset) break;  // no file is that large
    const std::uint64_t pos = offset + done;
    const std::size_t want = std::min(n - done, kMaxTransfer);
    const ssize_t got = ::pread(fd_, out + done, want, static_cast<off_t>(pos));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw IoError(errno, "pread", path_);
    }
    if (got == 0) break;
    done += static_cast<std::size_t>(got);
  }
  if (done < n) {
    throw FormatError(path_ + ": truncated: wanted " + std::to_string(n) + " bytes at offset " +
                      std::to_string(offset) + ", file has " + std::to_string(size()) + " bytes");
  }
}

void File::read_vectored(struct iovec* iov, int count, std::uint64_t offset) const {
  std::uint64_t total = 0;
  for (int i = 0; i < count; ++i) total += iov[i].iov_len;
  std::uint64_t pos = offset;
  int first = 0;
  while (first < count) {
    if (iov[first].iov_len == 0) {
      ++first;
      continue;
    }
    if (pos > kMaxOffset) break;  // no file is that large: truncated
    const int batch = iov_batch(iov, first, count);
    const ssize_t got = ::preadv(fd_, iov + first, batch, static_cast<off_t>(pos));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw IoError(errno, "preadv", path_);
    }
    if (got == 0) break;
    pos += static_cast<std::uint64_t>(got);
    first = iov_advance(iov, first, static_cast<std::size_t>(got));
  }
  if (pos - offset < total) {
    throw FormatError(path_ + ": truncated: wanted " + std::to_string(total) +
                      " bytes at offset " + std::to_string(offset) + ", file has " +
                      std::to_string(size()) + " bytes");
  }
}

namespace {

#if defined(__linux__)
#ifndef __NR_cachestat
#define __NR_cachestat 451  // the same number on every architecture (Linux 6.5)
#endif
// The kernel's struct cachestat_range and struct cachestat (linux/mman.h, Linux 6.5).
struct CachestatRange {
  std::uint64_t off;
  std::uint64_t len;
};
struct Cachestat {
  std::uint64_t nr_cache;
  std::uint64_t nr_dirty;
  std::uint64_t nr_writeback;
  std::uint64_t nr_evicted;
  std::uint64_t nr_recently_evicted;
};
// Set once cachestat failed for a reason other than the file (an older kernel, a seccomp
// filter): from then on the probe read answers.
std::atomic<bool> g_no_cachestat{false};
#endif

}  // namespace

bool File::cached(std::uint64_t offset) const {
  if (offset > kMaxOffset) return true;
#if defined(__linux__)
  if (!g_no_cachestat.load(std::memory_order_relaxed)) {
    struct stat st;
    if (::fstat(fd_, &st) == 0 && offset >= static_cast<std::uint64_t>(st.st_size)) {
      return true;  // past the end: a read returns at once
    }
    CachestatRange range{offset, 1};
    Cachestat stat{};
    for (;;) {
      if (::syscall(__NR_cachestat, fd_, &range, &stat, 0) == 0) return stat.nr_cache > 0;
      if (errno != EINTR) break;
    }
    if (errno == EBADF) return true;  // cannot tell
    g_no_cachestat.store(true, std::memory_order_relaxed);
  }
#endif
#ifdef RWF_NOWAIT
  std::uint8_t byte = 0;
  struct iovec iov = {&byte, 1};
  for (;;) {
    const ssize_t got = ::preadv2(fd_, &iov, 1, static_cast<off_t>(offset), RWF_NOWAIT);
    if (got >= 0) return true;
    if (errno == EINTR) continue;
    return errno != EAGAIN;  // EOPNOTSUPP and the rest: cannot tell
  }
#else
  (void)offset;
  return true;
#endif
}

void File::write_all(const void* src, std::size_t n, std::uint64_t offset) const {
  check_write_range(offset, n, path_);
  const auto* in = static_cast<const std::uint8_t*>(src);
  std::size_t done = 0;
  while (done < n) {
    const std::size_t want = std::min(n - done, kMaxTransfer);
    const ssize_t put = ::pwrite(fd_, in + done, want, static_cast<off_t>(offset + done));
    if (put < 0) {
      if (errno == EINTR) continue;
      throw IoError(errno, "pwrite", path_);
    }
    // A regular file never takes zero bytes of a nonzero write; looping would spin forever.
    if (put == 0) throw IoError(EIO, "pwrite", path_);
    done += static_cast<std::size_t>(put);
  }
}

void File::writev_all(struct iovec* iov, int count, std::uint64_t offset) const {
  if (count < 0) throw InvalidArgument("writev_all: negative buffer count");
  std::uint64_t total = 0;
  for (int i = 0; i < count; ++i) total += iov[i].iov_len;
  check_write_range(offset, total, path_);

  std::uint64_t pos = offset;
  int first = 0;
  while (first < count) {
    // Zero-length buffers (left over from a resumed partial write, or passed in) carry nothing.
    if (iov[first].iov_len == 0) {
      ++first;
      continue;
    }
    const int batch = iov_batch(iov, first, count);
    const ssize_t put = ::pwritev(fd_, iov + first, batch, static_cast<off_t>(pos));
    if (put < 0) {
      if (errno == EINTR) continue;
      throw IoError(errno, "pwritev", path_);
    }
    if (put == 0) throw IoError(EIO, "pwritev", path_);
    pos += static_cast<std::uint64_t>(put);
    first = iov_advance(iov, first, static_cast<std::size_t>(put));
  }
}

void File::preallocate(std::uint64_t size, std::uint64_t from) const {
  if (size <= from) return;
  if (size > kMaxOffset) throw IoError(EFBIG, "fallocate", path_);
  // fallocate(2) rather than posix_fallocate(3): where the file system cannot reserve space,
  // glibc's posix_fallocate emulates it by writing every block, which costs a full extra pass
  // over the file; we would rather fall back to a cheap ftruncate.
  int rc;
  do {
    rc = ::fallocate(fd_, 0, static_cast<off_t>(from), static_cast<off_t>(size - from));
  } while (rc != 0 && errno == EINTR);
  if (rc == 0) return;
  const int err = errno;
  if (err != EOPNOTSUPP && err != ENOSYS && err != EINVAL) throw IoError(err, "fallocate", path_);
  // Never shrink: the fallback only promises the file is at least `size` long.
  if (this->size() < size) truncate(size);
}

void File::truncate(std::uint64_t size) const {
  if (size > kMaxOffset) throw IoError(EFBIG, "ftruncate", path_);
  int rc;
  do {
    rc = ::ftruncate(fd_, static_cast<off_t>(size));
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) throw IoError(errno, "ftruncate", path_);
}

void File::sync() const {
  int rc;
  do {
    rc = ::fsync(fd_);
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) throw IoError(errno, "fsync", path_);
}

void File::close() {
  if (fd_ < 0) return;
  const int fd = std::exchange(fd_, -1);
  // On Linux the descriptor is released even when close reports EINTR; retrying could close
  // a descriptor another thread just opened.
  if (::close(fd) != 0 && errno != EINTR) throw IoError(errno, "close", path_);
}

void sync_directory(const std::string& path) {
  int fd;
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) throw IoError(errno, "open", path);
  int rc;
  do {
    rc = ::fsync(fd);
  } while (rc != 0 && errno == EINTR);
  const int err = errno;
  ::close(fd);
  if (rc != 0) throw IoError(err, "fsync", path);
}

bool exchange_paths(const std::string& a, const std::string& b) {
#if defined(SYS_renameat2)
  constexpr unsigned kRenameExchange = 1U << 1;  // RENAME_EXCHANGE, <linux/fs.h>
  const long rc = ::syscall(SYS_renameat2, AT_FDCWD, a.c_str(), AT_FDCWD, b.c_str(),
                            kRenameExchange);
  if (rc == 0) return true;
  const int err = errno;
  if (err == ENOSYS || err == EINVAL || err == ENOTSUP || err == EOPNOTSUPP) return false;
  throw IoError(err, "renameat2(RENAME_EXCHANGE)", a + " <-> " + b);
#else
  (void)a;
  (void)b;
  return false;
#endif
}

}  // namespace ckptio
