// A minimal test harness for the C++ core's CTest executables (no gtest dependency, so the sanitizer builds
// need nothing but a compiler). CHECK records a failure and continues; main returns non-zero if any failed.
#pragma once
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace zctest {

struct Registry {
  std::vector<std::pair<std::string, std::function<void()>>> tests;
  int failures = 0;
  static Registry& get() {
    static Registry r;
    return r;
  }
};

struct Register {
  Register(const char* name, std::function<void()> fn) { Registry::get().tests.emplace_back(name, std::move(fn)); }
};

inline int run_all() {
  auto& r = Registry::get();
  int passed = 0, failed = 0;
  for (auto& [name, fn] : r.tests) {
    const int before = r.failures;
    try {
      fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s: unexpected exception: %s\n", name.c_str(), e.what());
      ++r.failures;
    }
    if (r.failures == before) ++passed; else ++failed;
    std::printf("%s %s\n", r.failures == before ? "PASS" : "FAIL", name.c_str());
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace zctest

#define ZC_TEST(name)                                                   \
  static void name();                                                   \
  static ::zctest::Register name##_registration(#name, name);           \
  static void name()

#define CHECK(cond)                                                                          \
  do {                                                                                       \
    if (!(cond)) {                                                                           \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);          \
      ++::zctest::Registry::get().failures;                                                  \
    }                                                                                        \
  } while (0)

// CHECK_THROWS(expr, "substring"): expr must throw a std::exception whose message contains the substring.
#define CHECK_THROWS(expr, substring)                                                          \
  do {                                                                                         \
    bool zc_threw = false;                                                                     \
    try {                                                                                      \
      (void)(expr);                                                                            \
    } catch (const std::exception& zc_e) {                                                     \
      zc_threw = std::string(zc_e.what()).find(substring) != std::string::npos;                \
      if (!zc_threw) std::fprintf(stderr, "%s:%d: wrong message: %s\n", __FILE__, __LINE__, zc_e.what()); \
    }                                                                                          \
    if (!zc_threw) {                                                                           \
      std::fprintf(stderr, "%s:%d: expected %s to throw '%s'\n", __FILE__, __LINE__, #expr, substring); \
      ++::zctest::Registry::get().failures;                                                    \
    }                                                                                          \
  } while (0)

#define ZC_TEST_MAIN() \
  int main() { return ::zctest::run_all(); }
