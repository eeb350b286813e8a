// A minimal test harness (gtest is not available here): TEST registers a function, CHECK*
// record failures with file:line and keep going, main() runs everything and prints
// "N passed, M failed".
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace harness {

using TestFn = void (*)();

struct TestCase {
  const char* name;
  TestFn fn;
};

std::vector<TestCase>& registry();

struct Registrar {
  Registrar(const char* name, TestFn fn) { registry().push_back(TestCase{name, fn}); }
};

/// Records a failure of the running test.
void fail(const char* file, int line, const std::string& message);

template <typename T>
std::string show(const T& v) {
  if constexpr (std::is_same_v<T, bool>) {
    return v ? "true" : "false";
  } else if constexpr (std::is_integral_v<T> || std::is_enum_v<T>) {
    using U = std::conditional_t<std::is_enum_v<T>, std::underlying_type<T>, std::common_type<T>>;
    using V = typename U::type;
    if constexpr (std::is_signed_v<V>) {
      return std::to_string(static_cast<long long>(v));
    } else {
      return std::to_string(static_cast<unsigned long long>(v));
    }
  } else if constexpr (std::is_convertible_v<const T&, std::string>) {
    return "\"" + std::string(v) + "\"";
  } else {
    return "<value>";
  }
}

/// == that does not warn (or lie) when comparing signed with unsigned integers.
template <typename A, typename B>
bool equal(const A& a, const B& b) {
  if constexpr (std::is_integral_v<A> && std::is_integral_v<B> && !std::is_same_v<A, bool> &&
                !std::is_same_v<B, bool>) {
    if constexpr (std::is_signed_v<A> == std::is_signed_v<B>) {
      return a == b;
    } else if constexpr (std::is_signed_v<A>) {
      return a >= 0 && static_cast<std::make_unsigned_t<A>>(a) == b;
    } else {
      return b >= 0 && a == static_cast<std::make_unsigned_t<B>>(b);
    }
  } else {
    return a == b;
  }
}

/// A fresh directory under $TMPDIR (or /tmp), removed with its contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
std::vector<std::uint8_t> pattern(std::size_t n, std::uint64_t seed);

/// Whether the page holding `offset` of the file at `path` is in the page cache, asked with
/// mincore on a fresh mapping, which (unlike File::cached's one-byte read) starts no readahead.
bool page_cached(const std::string& path, std::uint64_t offset);

/// Writes back and drops the file's pages from the page cache; false when the kernel keeps
/// them (tmpfs), so a test of the cold path has nothing to test.
bool evict(const std::string& path);

}  // namespace harness

#define HARNESS_CAT2(a, b) a##b
#define HARNESS_CAT(a, b) HARNESS_CAT2(a, b)

#define TEST(name)                                                              \
  static void test_##name();                                                    \
  static const ::harness::Registrar HARNESS_CAT(harness_registrar_, name){#name, \
                                                                        &test_##name}; \
  static void test_##name()

#define CHECK(cond)                                                   \
  do {                                                                \
    if (!(cond)) ::harness::fail(__FILE__, __LINE__, "CHECK(" #cond ") failed"); \
  } while (0)

#define CHECK_EQ(a, b)                                                                    \
  do {                                                                                    \
    const auto& harness_a_ = (a);                                                         \
    const auto& harness_b_ = (b);                                                         \
    if (!::harness::equal(harness_a_, harness_b_)) {                                      \
      ::harness::fail(__FILE__, __LINE__,                                                 \
                      "CHECK_EQ(" #a ", " #b ") failed: " + ::harness::show(harness_a_) + \
                          " != " + ::harness::show(harness_b_));                          \
    }                                                                                     \
  } while (0)

#define CHECK_THROWS(expr, Type)                                                          \
  do {                                                                                    \
    bool harness_thrown_ = false;                                                         \
    try {                                                                                 \
      (void)(expr);                                                                       \
    } catch (const Type&) {                                                               \
      harness_thrown_ = true;                                                             \
    } catch (const std::exception& harness_e_) {                                          \
      harness_thrown_ = true;                                                             \
      ::harness::fail(__FILE__, __LINE__,                                                 \
                      "CHECK_THROWS(" #expr ", " #Type ") threw another type: " +         \
                          std::string(harness_e_.what()));                                \
    } catch (...) {                                                                       \
      harness_thrown_ = true;                                                             \
      ::harness::fail(__FILE__, __LINE__,                                                 \
                      "CHECK_THROWS(" #expr ", " #Type ") threw a non-std exception");    \
    }                                                                                     \
    if (!harness_thrown_) {                                                               \
      ::harness::fail(__FILE__, __LINE__, "CHECK_THROWS(" #expr ", " #Type ") did not throw"); \
    }                                                                                     \
  } while (0)
