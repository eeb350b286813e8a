// A random-access, read-only source of bytes: an open file or a buffer in memory. The zip
// reader and the parallel reader work on this interface so they serve paths and file objects
// (BytesIO) alike.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace ckptio {

class ByteSource {
 public:
  virtual ~ByteSource() = default;

  /// Total size in bytes.
  virtual std::uint64_t size() const = 0;

  /// Reads exactly `n` bytes at `offset` into `dst`. Throws FormatError naming the source if
  /// the range runs past the end (a truncated file), IoError if the OS fails. Thread-safe.
  virtual void read_exact(void* dst, std::size_t n, std::uint64_t offset) const = 0;

  /// A name for messages: the path, or a description such as "<in-memory buffer>".
  virtual const std::string& name() const = 0;

  /// False when reading the byte at `offset` would wait for the disk (its page is not in the
  /// page cache); true when it would not, or when the source cannot tell. Never blocks.
  virtual bool cached(std::uint64_t /*offset*/) const { return true; }

  /// Reads the bytes from `offset` on into `count` buffers one after the other (as preadv),
  /// exactly filling each; `iov` may be modified. Same errors as read_exact. The default
  /// reads buffer by buffer.
  virtual void read_vectored(struct iovec* iov, int count, std::uint64_t offset) const;
};

/// A ByteSource over memory the caller owns and keeps alive and unchanged while it is used.
class MemorySource final : public ByteSource {
 public:
  MemorySource(const void* data, std::uint64_t size, std::string name);
  std::uint64_t size() const override { return size_; }
  void read_exact(void* dst, std::size_t n, std::uint64_t offset) const override;
  const std::string& name() const override { return name_; }
  const std::uint8_t* data() const { return data_; }

 private:
  const std::uint8_t* data_;
  std::uint64_t size_;
  std::string name_;
};

}  // namespace ckptio
