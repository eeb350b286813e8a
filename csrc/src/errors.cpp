#include "ckptio/errors.hpp"

#include <system_error>

namespace ckptio {
namespace {

// std::generic_category().message() is thread-safe, unlike strerror().
std::string io_message(int code, const std::string& operation, const std::string& path) {
  return operation + " '" + path + "': " + std::generic_category().message(code);
}

}  // namespace

IoError::IoError(int code, const std::string& operation, const std::string& path)
    : Error(io_message(code, operation, path)), code_(code), path_(path) {}

}  // namespace ckptio
