// A minimal check macro for the torch-free C++ tests: failures are counted and printed, and main
// returns non-zero so ctest reports the test as failed.
#pragma once

#include <cmath>
#include <cstdio>

inline int g_failures = 0;

// variadic, so that template arguments with commas need no extra parentheses
#define CHECK(...)                                                               \
  do {                                                                           \
    if (!(__VA_ARGS__)) {                                                        \
      std::printf("%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #__VA_ARGS__);\
      ++g_failures;                                                              \
    }                                                                            \
  } while (0)

// |a - b| <= rtol * |b| (b is the expectation)
#define CHECK_CLOSE(a, b, rtol)                                                  \
  do {                                                                           \
    const double a_ = (a), b_ = (b);                                             \
    if (!(std::fabs(a_ - b_) <= (rtol) * std::fabs(b_))) {                       \
      std::printf("%s:%d: %s = %.17g, expected %s = %.17g\n", __FILE__, __LINE__, \
                  #a, a_, #b, b_);                                               \
      ++g_failures;                                                              \
    }                                                                            \
  } while (0)

inline int report(const char* name) {
  std::printf("%s: %s (%d failed checks)\n", name, g_failures ? "FAILED" : "passed", g_failures);
  return g_failures ? 1 : 0;
}
