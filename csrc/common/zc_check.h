// Error checks for zerocore's C++ core. The core has no torch dependency (it builds standalone with CMake for
// sanitizer runs), so failures are std::runtime_error; torch's op dispatcher and pybind11 both turn those into
// Python RuntimeError with the message intact.
#pragma once
#include <cerrno>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

namespace zerocore {

template <typename... Parts>
[[noreturn]] inline void fail(const char* file, int line, const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  out << " [" << file << ":" << line << "]";
  throw std::runtime_error(out.str());
}

}  // namespace zerocore

// ZC_CHECK(cond, "what went wrong", value, ...): throws with the message when cond is false.
#define ZC_CHECK(cond, ...)                                          \
  do {                                                               \
    if (!(cond)) ::zerocore::fail(__FILE__, __LINE__, __VA_ARGS__);  \
  } while (0)

// ZC_CHECK_ERRNO(call_result >= 0, "pwrite ", path): appends strerror(errno) and the errno value.
#define ZC_CHECK_ERRNO(cond, ...)                                                                   \
  do {                                                                                              \
    if (!(cond)) {                                                                                  \
      const int zc_saved_errno = errno;                                                             \
      ::zerocore::fail(__FILE__, __LINE__, __VA_ARGS__, ": ", std::strerror(zc_saved_errno),       \
                       " (errno ", zc_saved_errno, ")");                                            \
    }                                                                                               \
  } while (0)
