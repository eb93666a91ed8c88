// A minimal PNG writer: 8-bit RGB, zlib stream of stored (uncompressed) deflate blocks, no dependencies.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace wuerstchen {

// The PNG file's bytes for `rgb` (height × width × 3).
std::vector<uint8_t> encode_png(const uint8_t* rgb, int width, int height);

// Writes the PNG to `path`; Error naming the path when it cannot.
void write_png(const std::string& path, const uint8_t* rgb, int width, int height);

}  // namespace wuerstchen
