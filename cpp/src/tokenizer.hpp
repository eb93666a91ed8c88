// CLIP's tokenizer in C++, read from a bundle's tokenizer folder (tokenizer.json, tokenizer_config.json),
// equal to transformers' AutoTokenizer over the same folder: NFC, runs of whitespace to one space, lower
// case, CLIP's pre-tokenizer regex, GPT-2's byte-to-symbol map, BPE with an end-of-word suffix, then
// start/end tokens, truncation to 77 and padding.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace wuerstchen {

constexpr int kTextTokens = 77;  // CLIP's context

struct TokenizedPrompt {
  std::array<int64_t, kTextTokens> ids{};
  std::array<int64_t, kTextTokens> attention_mask{};
  bool truncated = false;  // the prompt had more than 75 tokens
};

class ClipTokenizer {
 public:
  // From the contents of tokenizer.json and tokenizer_config.json; `where` names the folder in errors.
  ClipTokenizer(std::string_view tokenizer_json, std::string_view config_json, const std::string& where);

  TokenizedPrompt encode(std::string_view utf8_prompt) const;

  // The token ids without start, end, truncation or padding (for tests and diagnostics).
  std::vector<int64_t> tokens(std::string_view utf8_prompt) const;

 private:
  void bpe(std::u32string_view piece, std::vector<int64_t>& out) const;
  void encode_segment(std::u32string_view segment, std::vector<int64_t>& out) const;

  std::unordered_map<std::string, int64_t> vocab_;
  std::unordered_map<uint64_t, std::pair<int32_t, int64_t>> merges_;  // (left id, right id) → (rank, merged id)
  std::vector<std::pair<std::u32string, int64_t>> added_tokens_;     // matched in the raw text, longest first
  std::string end_of_word_;
  int64_t unknown_id_ = -1, start_id_ = -1, end_id_ = -1, pad_id_ = -1;
  std::array<char32_t, 256> byte_symbols_{};
};

}  // namespace wuerstchen
