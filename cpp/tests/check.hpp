// A minimal test runner: TEST(name) { ... } cases with CHECK/CHECK_EQ, run in order by test_main(), which
// prints one line per case and "N passed, M failed" at the end. A case that needs the Python fixtures calls
// fixtures(), which skips the whole executable (ctest's skip code 77) when they were not generated.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace test {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct Skip : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Case {
  const char* name;
  std::function<void()> body;
};

inline std::vector<Case>& cases() {
  static std::vector<Case> all;
  return all;
}

struct Register {
  Register(const char* name, std::function<void()> body) { cases().push_back({name, std::move(body)}); }
};

// Exit 0 when nothing failed, 77 (ctest's skip) when every case was skipped, 1 otherwise. With
// WUERSTCHEN_REQUIRE_FIXTURES set (as in CI), a skipped case fails.
inline int run_all() {
  int passed = 0, failed = 0, skipped = 0;
  const bool require = std::getenv("WUERSTCHEN_REQUIRE_FIXTURES") != nullptr;
  for (const Case& c : cases()) {
    try {
      c.body();
      std::printf("[ ok ] %s\n", c.name);
      ++passed;
    } catch (const Skip& skip) {
      std::printf("[%s] %s: %s\n", require ? "FAIL" : "skip", c.name, skip.what());
      ++(require ? failed : skipped);
    } catch (const std::exception& error) {
      std::printf("[FAIL] %s: %s\n", c.name, error.what());
      ++failed;
    }
  }
  std::printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
  return failed != 0 ? 1 : passed == 0 ? 77 : 0;
}

template <typename A, typename B>
std::string describe(const A& a, const B& b) {
  std::ostringstream out;
  out << a << " vs " << b;
  return out.str();
}

// The Python fixtures' index (cpp/tests/make_fixtures.py), from WUERSTCHEN_FIXTURES.
inline const nlohmann::json& fixtures() {
  static nlohmann::json index = [] {
    const char* folder = std::getenv("WUERSTCHEN_FIXTURES");
    if (folder == nullptr || *folder == '\0') {
      throw Skip("WUERSTCHEN_FIXTURES is not set: run cpp/tests/make_fixtures.py (as .ci/run does) to compare with Python");
    }
    std::ifstream in(std::string(folder) + "/index.json");
    if (!in) throw Skip(std::string("no index.json in WUERSTCHEN_FIXTURES=") + folder);
    return nlohmann::json::parse(in);
  }();
  return index;
}

inline std::string fixture_path(const std::string& name) { return std::string(std::getenv("WUERSTCHEN_FIXTURES")) + "/" + name; }

// An array the fixture script wrote: {"file": ..., "shape": [...]}.
template <typename T>
std::vector<T> load_array(const nlohmann::json& entry) {
  size_t count = 1;
  for (const auto& d : entry.at("shape")) count *= d.get<size_t>();
  std::vector<T> values(count);
  std::ifstream in(fixture_path(entry.at("file").get<std::string>()), std::ios::binary);
  in.read(reinterpret_cast<char*>(values.data()), static_cast<std::streamsize>(count * sizeof(T)));
  if (!in) throw Failure("fixture file " + entry.at("file").get<std::string>() + " is short");
  return values;
}

}  // namespace test

#define TEST_CONCAT2(a, b) a##b
#define TEST_CONCAT(a, b) TEST_CONCAT2(a, b)
#define TEST(name)                                                             \
  static void TEST_CONCAT(test_body_, __LINE__)();                             \
  static test::Register TEST_CONCAT(test_register_, __LINE__)(name, TEST_CONCAT(test_body_, __LINE__)); \
  static void TEST_CONCAT(test_body_, __LINE__)()
#define CHECK(condition)                                                                              \
  do {                                                                                                \
    if (!(condition)) throw test::Failure(std::string(__FILE__ ":") + std::to_string(__LINE__) + ": " #condition); \
  } while (0)
#define CHECK_MSG(condition, message)                                                                             \
  do {                                                                                                            \
    if (!(condition)) throw test::Failure(std::string(__FILE__ ":") + std::to_string(__LINE__) + ": " + (message)); \
  } while (0)
#define CHECK_EQ(a, b) CHECK_MSG((a) == (b), std::string(#a " == " #b ": ") + test::describe((a), (b)))
#define TEST_MAIN() \
  int main() { return test::run_all(); }
