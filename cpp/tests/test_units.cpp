// Units that need no Python: SHA-256 against FIPS 180-4's vectors, the PNG writer, the C API's errors.
#include <cmath>
#include <cstring>

#include "check.hpp"
#include "png.hpp"
#include "sha256.hpp"
#include "unicode.hpp"
#include "wuerstchen/wuerstchen.h"

using namespace wuerstchen;

TEST("sha256: FIPS 180-4 test vectors, across block boundaries") {
  CHECK_EQ(sha256_hex("", 0), std::string("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
  CHECK_EQ(sha256_hex("abc", 3), std::string("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
  const std::string two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  CHECK_EQ(sha256_hex(two_blocks.data(), two_blocks.size()),
           std::string("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"));
  Sha256 streamed;  // a million 'a's, fed in uneven pieces
  const std::string piece(999, 'a');
  size_t fed = 0;
  while (fed + piece.size() <= 1000000) streamed.update(piece.data(), piece.size()), fed += piece.size();
  streamed.update(piece.data(), 1000000 - fed);
  CHECK_EQ(streamed.hex(), std::string("cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"));
}

TEST("png: signature, chunk layout, stored blocks that hold the pixels, CRCs") {
  const int width = 300, height = 200;  // 180,200 bytes of scanlines: three stored blocks
  std::vector<uint8_t> rgb(width * height * 3);
  for (size_t i = 0; i < rgb.size(); ++i) rgb[i] = static_cast<uint8_t>(i * 7);
  const std::vector<uint8_t> png = encode_png(rgb.data(), width, height);
  CHECK(std::memcmp(png.data(), "\x89PNG\r\n\x1a\n", 8) == 0);
  CHECK(std::memcmp(png.data() + 12, "IHDR", 4) == 0);
  // Unpack IDAT's stored blocks and compare with the scanlines.
  const size_t idat = 8 + 25;
  const uint32_t length = (png[idat] << 24) | (png[idat + 1] << 16) | (png[idat + 2] << 8) | png[idat + 3];
  CHECK(std::memcmp(png.data() + idat + 4, "IDAT", 4) == 0);
  std::vector<uint8_t> raw;
  size_t at = idat + 8 + 2;
  bool last = false;
  while (!last) {
    last = png[at] & 1;
    const size_t size = png[at + 1] | (png[at + 2] << 8);
    CHECK_EQ(size, static_cast<size_t>(~(png[at + 3] | (png[at + 4] << 8)) & 0xffff));
    raw.insert(raw.end(), png.begin() + at + 5, png.begin() + at + 5 + size);
    at += 5 + size;
  }
  CHECK_EQ(at + 4, idat + 8 + length);  // Adler-32 ends the zlib stream
  CHECK_EQ(raw.size(), static_cast<size_t>((width * 3 + 1) * height));
  for (int y = 0; y < height; ++y) {
    CHECK_EQ(raw[y * (width * 3 + 1)], 0);
    CHECK(std::memcmp(&raw[y * (width * 3 + 1) + 1], &rgb[y * width * 3], width * 3) == 0);
  }
  CHECK(std::memcmp(png.data() + png.size() - 8, "IEND", 4) == 0);
}

TEST("unicode: NFC composes, decomposed accents and Hangul; lower case maps per character") {
  CHECK(unicode::nfc(U"e\u0301") == U"\u00e9");
  CHECK(unicode::nfc(U"a\u0308\u0301") == U"\u01df" || unicode::nfc(U"a\u0308\u0301") == U"\u00e4\u0301");
  CHECK(unicode::nfc(U"\u1100\u1161\u11a8") == U"\uac01");
  CHECK(unicode::nfc(U"\u0301x") == U"\u0301x");
  CHECK(unicode::lowercase(U"\u0130Σ") == U"i\u0307σ");
  CHECK(unicode::is_letter(U'東') && unicode::is_number(U'½') && !unicode::is_letter(U'🐶') && unicode::is_whitespace(U'\u3000'));
}

TEST("C API: NULL arguments and a missing bundle are error strings, never crashes") {
  CHECK(std::string(wuerstchen_last_error(nullptr)) == "engine is NULL");
  wuerstchen_engine* engine = wuerstchen_create(nullptr, nullptr);
  CHECK(engine != nullptr);
  CHECK_EQ(std::string(wuerstchen_last_error(engine)), std::string("bundle folder is NULL"));
  wuerstchen_request request;
  wuerstchen_default_request(&request);
  uint8_t pixel[3];
  CHECK(wuerstchen_generate(engine, &request, pixel, sizeof pixel) != 0);
  CHECK_EQ(std::string(wuerstchen_last_error(engine)), std::string("bundle folder is NULL"));
  wuerstchen_destroy(engine);

  engine = wuerstchen_create("/no/such/bundle", nullptr);
  CHECK_EQ(std::string(wuerstchen_last_error(engine)), std::string("bundle=\"/no/such/bundle\": folder does not exist"));
  CHECK(wuerstchen_generate(engine, nullptr, pixel, sizeof pixel) != 0);
  wuerstchen_destroy(engine);
  wuerstchen_destroy(nullptr);

  wuerstchen_options options;
  wuerstchen_default_options(&options);
  options.provider = "quantum";
  engine = wuerstchen_create("/no/such/bundle", &options);
  CHECK_EQ(std::string(wuerstchen_last_error(engine)), std::string("provider=\"quantum\": expected cpu, cuda or tensorrt"));
  wuerstchen_destroy(engine);
}

TEST_MAIN()
