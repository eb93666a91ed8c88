#include "tokenizer.hpp"

#include <algorithm>
#include <limits>

#include <nlohmann/json.hpp>

#include "error.hpp"
#include "unicode.hpp"

namespace wuerstchen {
namespace {

using nlohmann::json;

// GPT-2's reversible map from bytes to printable symbols, which byte-level BPE vocabularies are written in.
std::array<char32_t, 256> byte_to_symbol() {
  std::array<char32_t, 256> table{};
  std::array<bool, 256> printable{};
  for (int b = '!'; b <= '~'; ++b) printable[b] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) printable[b] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) printable[b] = true;
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) table[b] = printable[b] ? static_cast<char32_t>(b) : next++;
  return table;
}

const json& field(const json& object, const char* key, const std::string& where) {
  if (!object.is_object() || !object.contains(key)) throw Error(where + ": missing field " + key);
  return object.at(key);
}

std::string string_field(const json& object, const char* key, const std::string& where) {
  const json& value = field(object, key, where);
  if (!value.is_string()) throw Error(where + ": " + key + " is " + value.dump() + ", expected a string");
  return value.get<std::string>();
}

// The normaliser and pre-tokeniser must be CLIP's: what this class implements is exactly that pipeline.
void check_pipeline(const json& tokenizer, const std::string& where) {
  const std::string expected_normalizer =
      R"([{"type":"NFC"},{"content":" ","pattern":{"Regex":"\\s+"},"type":"Replace"},{"type":"Lowercase"}])";
  const json& normalizer = field(tokenizer, "normalizer", where);
  if (!normalizer.is_object() || normalizer.value("type", "") != "Sequence" ||
      normalizer.value("normalizers", json()).dump() != expected_normalizer) {
    throw Error(where + ": normalizer is " + normalizer.dump() + ", expected CLIP's (NFC, \\s+ to a space, lower case)");
  }
  const json& pre = field(tokenizer, "pre_tokenizer", where);
  const json steps = pre.is_object() ? pre.value("pretokenizers", json()) : json();
  const std::string clip_regex =
      R"(<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+)";
  const bool clip = steps.is_array() && steps.size() == 2 && steps[0].value("type", "") == "Split" &&
                    steps[0].value("pattern", json()).value("Regex", "") == clip_regex &&
                    steps[0].value("behavior", "") == "Removed" && steps[0].value("invert", false) &&
                    steps[1].value("type", "") == "ByteLevel" && !steps[1].value("add_prefix_space", true) &&
                    steps[1].value("use_regex", false);
  if (!clip) throw Error(where + ": pre_tokenizer is " + pre.dump() + ", expected CLIP's (its Split regex, then ByteLevel)");
}

bool starts_with(std::u32string_view text, size_t at, std::u32string_view prefix) {
  return text.size() - at >= prefix.size() && text.compare(at, prefix.size(), prefix) == 0;
}

bool is_other(char32_t c) { return !unicode::is_whitespace(c) && !unicode::is_letter(c) && !unicode::is_number(c); }

// The English contractions both regexes try first: 's 't 're 've 'm 'll 'd (lower case: after normalisation).
size_t contraction_length(std::u32string_view text, size_t at) {
  for (std::u32string_view c : {U"'s", U"'t", U"'re", U"'ve", U"'m", U"'ll", U"'d"}) {
    if (starts_with(text, at, c)) return c.size();
  }
  return 0;
}

// CLIP's Split regex, matches kept and the rest (whitespace) dropped:
//   <|startoftext|> | <|endoftext|> | contractions | [\p{L}]+ | [\p{N}] | [^\s\p{L}\p{N}]+
// The regex engine tries the alternatives in order at each position, which this scan does too.
std::vector<std::u32string_view> clip_split(std::u32string_view text) {
  std::vector<std::u32string_view> pieces;
  size_t i = 0;
  while (i < text.size()) {
    size_t length = 0;
    if (starts_with(text, i, U"<|startoftext|>")) {
      length = 15;
    } else if (starts_with(text, i, U"<|endoftext|>")) {
      length = 13;
    } else if ((length = contraction_length(text, i)) != 0) {
    } else if (unicode::is_letter(text[i])) {
      while (i + length < text.size() && unicode::is_letter(text[i + length])) ++length;
    } else if (unicode::is_number(text[i])) {
      length = 1;
    } else if (is_other(text[i])) {
      while (i + length < text.size() && is_other(text[i + length])) ++length;
    }
    if (length == 0) {
      ++i;  // whitespace
      continue;
    }
    pieces.push_back(text.substr(i, length));
    i += length;
  }
  return pieces;
}

// ByteLevel's own GPT-2 split of each piece (pieces hold no whitespace here):
//   contractions | \p{L}+ | \p{N}+ | [^\s\p{L}\p{N}]+
// It only cuts CLIP's special-token pieces that normalisation made ("<|endoftext|>" typed in upper case).
std::vector<std::u32string_view> gpt2_split(std::u32string_view piece) {
  std::vector<std::u32string_view> parts;
  size_t i = 0;
  while (i < piece.size()) {
    size_t length = contraction_length(piece, i);
    if (length == 0) {
      bool (*same)(char32_t) = unicode::is_letter(piece[i]) ? unicode::is_letter
                               : unicode::is_number(piece[i]) ? unicode::is_number
                                                              : is_other;
      while (i + length < piece.size() && same(piece[i + length])) ++length;
    }
    parts.push_back(piece.substr(i, length));
    i += length;
  }
  return parts;
}

uint64_t pair_key(int64_t left, int64_t right) {
  return (static_cast<uint64_t>(left) << 32) | static_cast<uint64_t>(right);
}

}  // namespace

ClipTokenizer::ClipTokenizer(std::string_view tokenizer_json, std::string_view config_json, const std::string& where)
    : byte_symbols_(byte_to_symbol()) {
  const std::string file = where + "/tokenizer.json";
  json tokenizer, config;
  try {
    tokenizer = json::parse(tokenizer_json);
    config = json::parse(config_json);
  } catch (const json::exception& error) {
    throw Error(where + ": tokenizer files are not valid JSON: " + error.what());
  }
  check_pipeline(tokenizer, file);
  const json& model = field(tokenizer, "model", file);
  if (string_field(model, "type", file + ": model") != "BPE") throw Error(file + ": model.type is not BPE");
  const json prefix = model.value("continuing_subword_prefix", json(""));
  if (!prefix.is_null() && prefix != "") throw Error(file + ": model.continuing_subword_prefix is " + prefix.dump() + "; CLIP's BPE has none");
  end_of_word_ = string_field(model, "end_of_word_suffix", file + ": model");
  const json& vocab = field(model, "vocab", file + ": model");
  if (!vocab.is_object()) throw Error(file + ": model.vocab is not an object");
  for (const auto& [token, id] : vocab.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      throw Error(file + ": model.vocab[" + json(token).dump() + "] = " + id.dump() + ", expected a token id");
    }
    vocab_.emplace(token, id.get<int64_t>());
  }
  const json& merges = field(model, "merges", file + ": model");
  if (!merges.is_array()) throw Error(file + ": model.merges is not a list");
  int32_t rank = 0;
  for (const json& merge : merges) {
    std::string left, right;
    if (merge.is_string()) {  // "left right", the older layout
      const std::string text = merge.get<std::string>();
      const size_t space = text.find(' ');
      if (space != std::string::npos) left = text.substr(0, space), right = text.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string()) {
      left = merge[0].get<std::string>(), right = merge[1].get<std::string>();
    }
    const auto l = vocab_.find(left), r = vocab_.find(right), m = vocab_.find(left + right);
    if (l == vocab_.end() || r == vocab_.end() || m == vocab_.end()) {
      throw Error(file + ": merge " + merge.dump() + " is not made of vocabulary tokens");
    }
    merges_.emplace(pair_key(l->second, r->second), std::make_pair(rank++, m->second));
  }
  const json& added = field(tokenizer, "added_tokens", file);
  if (!added.is_array()) throw Error(file + ": added_tokens is not a list");
  for (const json& token : added) {
    if (!token.is_object() || !token.value("content", json()).is_string() || !token.value("id", json()).is_number_integer()) {
      throw Error(file + ": added token " + token.dump() + " has no content and id");
    }
    if (token.value("normalized", true) || token.value("lstrip", false) || token.value("rstrip", false) ||
        token.value("single_word", false)) {
      throw Error(file + ": added token " + token.dump() + " is not a plain special token, as CLIP's are");
    }
    added_tokens_.emplace_back(unicode::decode_utf8(token.at("content").get<std::string>(), "an added token"),
                               token.at("id").get<int64_t>());
    vocab_.emplace(token.at("content").get<std::string>(), token.at("id").get<int64_t>());
  }
  std::stable_sort(added_tokens_.begin(), added_tokens_.end(),
                   [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });

  auto token_id = [&](const std::string& token, const std::string& what) {
    const auto it = vocab_.find(token);
    if (it == vocab_.end()) throw Error(where + ": " + what + " " + json(token).dump() + " is not in the vocabulary");
    return it->second;
  };
  const json& post = field(tokenizer, "post_processor", file);
  const json& cls = field(post, "cls", file + ": post_processor");
  const json& sep = field(post, "sep", file + ": post_processor");
  if (!cls.is_array() || cls.size() != 2 || !cls[0].is_string() || !sep.is_array() || sep.size() != 2 || !sep[0].is_string()) {
    throw Error(file + ": post_processor has no cls and sep tokens");
  }
  start_id_ = token_id(cls[0].get<std::string>(), "start token");
  end_id_ = token_id(sep[0].get<std::string>(), "end token");
  unknown_id_ = model.value("unk_token", json()).is_string() ? token_id(model.at("unk_token").get<std::string>(), "unk_token") : -1;
  const json& pad = field(config, "pad_token", where + "/tokenizer_config.json");
  const std::string pad_token = pad.is_string() ? pad.get<std::string>() : pad.is_object() ? pad.value("content", "") : "";
  pad_id_ = token_id(pad_token, "pad_token");
}

void ClipTokenizer::bpe(std::u32string_view piece, std::vector<int64_t>& out) const {
  // 1. One symbol per character of the byte-level text, the last one with the end-of-word suffix.
  std::vector<int64_t> symbols;
  for (size_t i = 0; i < piece.size(); ++i) {
    std::string symbol = unicode::encode_utf8(piece.substr(i, 1));
    if (i + 1 == piece.size()) symbol += end_of_word_;
    const auto it = vocab_.find(symbol);
    if (it != vocab_.end()) {
      symbols.push_back(it->second);
    } else if (unknown_id_ >= 0) {
      symbols.push_back(unknown_id_);
    } else {
      throw Error("tokenizer: symbol " + json(symbol).dump() + " is not in the vocabulary and there is no unk_token");
    }
  }
  // 2. Merge the adjacent pair of lowest rank, leftmost first, until no pair has a merge.
  while (symbols.size() > 1) {
    size_t best = 0;
    int32_t best_rank = std::numeric_limits<int32_t>::max();
    int64_t merged = -1;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      const auto it = merges_.find(pair_key(symbols[i], symbols[i + 1]));
      if (it != merges_.end() && it->second.first < best_rank) {
        best = i, best_rank = it->second.first, merged = it->second.second;
      }
    }
    if (merged < 0) break;
    symbols[best] = merged;
    symbols.erase(symbols.begin() + static_cast<std::ptrdiff_t>(best) + 1);
  }
  out.insert(out.end(), symbols.begin(), symbols.end());
}

void ClipTokenizer::encode_segment(std::u32string_view segment, std::vector<int64_t>& out) const {
  // Normalise: NFC, every run of whitespace to one space, lower case; then split and map bytes to symbols.
  std::u32string text = unicode::nfc(segment);
  std::u32string collapsed;
  for (size_t i = 0; i < text.size();) {
    if (unicode::is_whitespace(text[i])) {
      collapsed.push_back(U' ');
      while (i < text.size() && unicode::is_whitespace(text[i])) ++i;
    } else {
      collapsed.push_back(text[i++]);
    }
  }
  const std::u32string normalized = unicode::lowercase(collapsed);
  for (std::u32string_view piece : clip_split(normalized)) {
    for (std::u32string_view part : gpt2_split(piece)) {
      std::u32string symbols;
      for (unsigned char byte : unicode::encode_utf8(part)) symbols.push_back(byte_symbols_[byte]);
      bpe(symbols, out);
    }
  }
}

std::vector<int64_t> ClipTokenizer::tokens(std::string_view utf8_prompt) const {
  const std::u32string text = unicode::decode_utf8(utf8_prompt, "prompt");
  // Special tokens are matched in the raw text first (they are not normalised); the text between them is
  // normalised and tokenised on its own.
  std::vector<int64_t> ids;
  size_t segment_start = 0;
  for (size_t i = 0; i < text.size();) {
    const auto match = std::find_if(added_tokens_.begin(), added_tokens_.end(),
                                    [&](const auto& token) { return starts_with(text, i, token.first); });
    if (match == added_tokens_.end()) {
      ++i;
      continue;
    }
    encode_segment(std::u32string_view(text).substr(segment_start, i - segment_start), ids);
    ids.push_back(match->second);
    i += match->first.size();
    segment_start = i;
  }
  encode_segment(std::u32string_view(text).substr(segment_start), ids);
  return ids;
}

TokenizedPrompt ClipTokenizer::encode(std::string_view utf8_prompt) const {
  std::vector<int64_t> ids = tokens(utf8_prompt);
  TokenizedPrompt result;
  result.truncated = ids.size() > kTextTokens - 2;
  if (result.truncated) ids.resize(kTextTokens - 2);
  result.ids.fill(pad_id_);
  result.ids[0] = start_id_;
  std::copy(ids.begin(), ids.end(), result.ids.begin() + 1);
  result.ids[ids.size() + 1] = end_id_;
  for (size_t i = 0; i < ids.size() + 2; ++i) result.attention_mask[i] = 1;
  return result;
}

}  // namespace wuerstchen
