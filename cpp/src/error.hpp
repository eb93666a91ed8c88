// One exception type for every error the engine reports: a one-line message naming the field, the value
// and what was expected. The C API turns it into the handle's last error string.
#pragma once

#include <stdexcept>
#include <string>

namespace wuerstchen {

struct Error : std::runtime_error {
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace wuerstchen
