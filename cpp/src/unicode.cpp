#include "unicode.hpp"

#include <algorithm>
#include <cstdint>
#include <iterator>

#include "error.hpp"

namespace wuerstchen::unicode {
namespace {

struct CodeRange {
  char32_t first, last;
};
struct LowerMapping {
  char32_t from;
  char32_t to[3];  // zero-padded
};
struct CombiningRange {
  char32_t first, last;
  uint8_t combining_class;
};
struct Decomposition {
  char32_t from;
  char32_t to[2];  // zero-padded
};
struct Composition {
  char32_t first, second, composite;
};

#include "unicode_tables.inc"

template <size_t N>
bool in_ranges(const CodeRange (&table)[N], char32_t c) {
  const CodeRange* end = table + N;
  const CodeRange* it = std::upper_bound(table, end, c, [](char32_t v, const CodeRange& r) { return v < r.first; });
  return it != table && c <= std::prev(it)->last;
}

uint8_t combining_class(char32_t c) {
  const auto* end = std::end(kCombining);
  const auto* it = std::upper_bound(std::begin(kCombining), end, c,
                                    [](char32_t v, const CombiningRange& r) { return v < r.first; });
  if (it == std::begin(kCombining) || c > std::prev(it)->last) return 0;
  return std::prev(it)->combining_class;
}

// Hangul syllables decompose and compose by arithmetic (Unicode §3.12).
constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr char32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

void decompose(char32_t c, std::u32string& out) {
  if (c >= kSBase && c < kSBase + kSCount) {
    const char32_t index = c - kSBase;
    out.push_back(kLBase + index / kNCount);
    out.push_back(kVBase + (index % kNCount) / kTCount);
    if (index % kTCount != 0) out.push_back(kTBase + index % kTCount);
    return;
  }
  const auto* end = std::end(kDecompositions);
  const auto* it = std::lower_bound(std::begin(kDecompositions), end, c,
                                    [](const Decomposition& d, char32_t v) { return d.from < v; });
  if (it == end || it->from != c) {
    out.push_back(c);
    return;
  }
  decompose(it->to[0], out);
  if (it->to[1] != 0) decompose(it->to[1], out);
}

char32_t compose(char32_t first, char32_t second) {
  if (first >= kLBase && first < kLBase + kLCount && second >= kVBase && second < kVBase + kVCount) {
    return kSBase + ((first - kLBase) * kVCount + (second - kVBase)) * kTCount;
  }
  if (first >= kSBase && first < kSBase + kSCount && (first - kSBase) % kTCount == 0 && second > kTBase &&
      second < kTBase + kTCount) {
    return first + (second - kTBase);
  }
  const auto* end = std::end(kCompositions);
  const auto* it = std::lower_bound(std::begin(kCompositions), end, std::make_pair(first, second),
                                    [](const Composition& c, const std::pair<char32_t, char32_t>& v) {
                                      return std::make_pair(c.first, c.second) < v;
                                    });
  return it != end && it->first == first && it->second == second ? it->composite : 0;
}

}  // namespace

std::u32string decode_utf8(std::string_view text, const char* what) {
  std::u32string out;
  out.reserve(text.size());
  size_t i = 0;
  while (i < text.size()) {
    const auto byte = static_cast<unsigned char>(text[i]);
    int length = byte < 0x80 ? 1 : (byte >> 5) == 0x6 ? 2 : (byte >> 4) == 0xE ? 3 : (byte >> 3) == 0x1E ? 4 : 0;
    char32_t c = length == 1 ? byte : length == 2 ? byte & 0x1F : length == 3 ? byte & 0x0F : byte & 0x07;
    bool valid = length != 0 && i + length <= text.size();
    for (int k = 1; valid && k < length; ++k) {
      const auto next = static_cast<unsigned char>(text[i + k]);
      valid = (next & 0xC0) == 0x80;
      c = (c << 6) | (next & 0x3F);
    }
    const char32_t smallest[] = {0, 0, 0x80, 0x800, 0x10000};
    valid = valid && c >= smallest[length] && c <= 0x10FFFF && !(c >= 0xD800 && c <= 0xDFFF);
    if (!valid) throw Error(std::string(what) + " is not valid UTF-8 (at byte " + std::to_string(i) + ")");
    out.push_back(c);
    i += length;
  }
  return out;
}

std::string encode_utf8(std::u32string_view text) {
  std::string out;
  for (char32_t c : text) {
    if (c < 0x80) {
      out += static_cast<char>(c);
    } else if (c < 0x800) {
      out += static_cast<char>(0xC0 | (c >> 6));
      out += static_cast<char>(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
      out += static_cast<char>(0xE0 | (c >> 12));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (c & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (c >> 18));
      out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (c & 0x3F));
    }
  }
  return out;
}

std::u32string nfc(std::u32string_view text) {
  // 1. Canonical decomposition, then each run of combining marks in canonical order (a stable sort).
  std::u32string decomposed;
  for (char32_t c : text) decompose(c, decomposed);
  for (size_t i = 0; i < decomposed.size();) {
    if (combining_class(decomposed[i]) == 0) {
      ++i;
      continue;
    }
    size_t end = i;
    while (end < decomposed.size() && combining_class(decomposed[end]) != 0) ++end;
    std::stable_sort(decomposed.begin() + i, decomposed.begin() + end,
                     [](char32_t a, char32_t b) { return combining_class(a) < combining_class(b); });
    i = end;
  }
  // 2. Canonical composition: each mark joins the last starter unless blocked by a mark of the same or a
  //    higher class between them.
  std::u32string out;
  size_t starter = std::u32string::npos;
  int last_class = -1;
  for (char32_t c : decomposed) {
    const int cls = combining_class(c);
    if (starter != std::u32string::npos && (last_class < cls || (last_class == 0 && out.size() == starter + 1))) {
      if (const char32_t composite = compose(out[starter], c)) {
        out[starter] = composite;
        continue;
      }
    }
    if (cls == 0) {
      starter = out.size();
      last_class = 0;
    } else {
      last_class = cls;
    }
    out.push_back(c);
  }
  return out;
}

std::u32string lowercase(std::u32string_view text) {
  std::u32string out;
  out.reserve(text.size());
  for (char32_t c : text) {
    const auto* end = std::end(kLowercase);
    const auto* it = std::lower_bound(std::begin(kLowercase), end, c,
                                      [](const LowerMapping& m, char32_t v) { return m.from < v; });
    if (it == end || it->from != c) {
      out.push_back(c);
      continue;
    }
    for (char32_t mapped : it->to) {
      if (mapped != 0) out.push_back(mapped);
    }
  }
  return out;
}

bool is_whitespace(char32_t c) {
  return (c >= 0x9 && c <= 0xD) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
         c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

bool is_letter(char32_t c) { return in_ranges(kLetters, c); }
bool is_number(char32_t c) { return in_ranges(kNumbers, c); }

}  // namespace wuerstchen::unicode
