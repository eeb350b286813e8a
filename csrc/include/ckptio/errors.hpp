// Typed errors of the ckptio library. The bindings map each to one Python exception type
// (FormatError -> ckptio.CheckpointError, IoError -> OSError with errno and filename,
// InvalidArgument -> ValueError); the library itself never prints and never returns codes.
#pragma once

#include <stdexcept>
#include <string>

namespace ckptio {

/// Base of every error the library throws.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The file is malformed: the fault lies in its bytes, not in the caller or the OS.
class FormatError : public Error {
 public:
  using Error::Error;
};

/// A system call failed. Carries errno and the path it concerned.
class IoError : public Error {
 public:
  IoError(int code, const std::string& operation, const std::string& path);
  int code() const noexcept { return code_; }
  const std::string& path() const noexcept { return path_; }

 private:
  int code_;
  std::string path_;
};

/// The caller passed something the library cannot accept (a bug in the caller, not the file).
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

}  // namespace ckptio
