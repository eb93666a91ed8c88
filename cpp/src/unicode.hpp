// The Unicode pieces of CLIP's tokenizer: UTF-8, NFC, per-character lower case, and the character classes
// of its pre-tokenizer (\s, \p{L}, \p{N}). Tables come from unicode_tables.inc.
#pragma once

#include <string>
#include <string_view>

namespace wuerstchen::unicode {

// The code points of UTF-8 text; Error on malformed UTF-8 (naming `what` and the byte offset).
std::u32string decode_utf8(std::string_view text, const char* what);
std::string encode_utf8(std::u32string_view text);

std::u32string nfc(std::u32string_view text);
std::u32string lowercase(std::u32string_view text);  // each character's full lower-case mapping

bool is_whitespace(char32_t c);  // the White_Space property, which \s matches
bool is_letter(char32_t c);      // \p{L}
bool is_number(char32_t c);      // \p{N}

}  // namespace wuerstchen::unicode
