// SHA-256 (FIPS 180-4), to check every bundle file against its manifest hash.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace wuerstchen {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  std::string hex();  // finishes the digest

 private:
  void block(const uint8_t* chunk);
  uint32_t state_[8];
  uint8_t buffer_[64];
  size_t buffered_ = 0;
  uint64_t length_ = 0;
};

std::string sha256_hex(const void* data, size_t size);

}  // namespace wuerstchen
