// The C++ CLIP tokenizer against transformers' AutoTokenizer: CLIP's real 49,408-token vocabulary and the
// bundle's two tokenizer folders, on the fixture script's 500+ prompts (accents composed and decomposed,
// other scripts, emoji, tabs and newlines, special tokens, 300+ characters); plus cases needing no fixtures.
#include <fstream>
#include <sstream>

#include "check.hpp"
#include "error.hpp"
#include "tokenizer.hpp"
#include "unicode.hpp"

using namespace wuerstchen;

namespace {

std::string read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

ClipTokenizer load(const std::string& folder) {
  return ClipTokenizer(read(folder + "/tokenizer.json"), read(folder + "/tokenizer_config.json"), folder);
}

// A byte-level vocabulary with two merges, as a tokenizer.json in CLIP's layout.
std::string tiny_tokenizer_json() {
  nlohmann::json vocab = nlohmann::json::object();
  const std::u32string letters = U"abcdefghijklmnopqrstuvwxyz'!.,";
  for (char32_t c : letters) {
    const std::string s = unicode::encode_utf8(std::u32string(1, c));
    vocab[s] = vocab.size();
    vocab[s + "</w>"] = vocab.size();
  }
  vocab["ab"] = vocab.size();
  vocab["abc</w>"] = vocab.size();
  vocab["<|startoftext|>"] = 1000;
  vocab["<|endoftext|>"] = 1001;
  nlohmann::json tokenizer = {
      {"added_tokens",
       {{{"id", 1000}, {"content", "<|startoftext|>"}, {"normalized", false}, {"special", true}},
        {{"id", 1001}, {"content", "<|endoftext|>"}, {"normalized", false}, {"special", true}}}},
      {"normalizer",
       {{"type", "Sequence"},
        {"normalizers",
         {{{"type", "NFC"}}, {{"type", "Replace"}, {"pattern", {{"Regex", "\\s+"}}}, {"content", " "}}, {{"type", "Lowercase"}}}}}},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"},
           {"pattern", {{"Regex", "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"}}},
           {"behavior", "Removed"},
           {"invert", true}},
          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}}}}},
      {"post_processor", {{"type", "RobertaProcessing"}, {"cls", {"<|startoftext|>", 1000}}, {"sep", {"<|endoftext|>", 1001}}}},
      {"model",
       {{"type", "BPE"},
        {"end_of_word_suffix", "</w>"},
        {"continuing_subword_prefix", ""},
        {"unk_token", "<|endoftext|>"},
        {"vocab", vocab},
        {"merges", nlohmann::json::array({nlohmann::json::array({"a", "b"}), nlohmann::json::array({"ab", "c</w>"})})}}}};
  return tokenizer.dump();
}

}  // namespace

TEST("tokenizer: BPE merges, end-of-word suffix, start/end tokens, padding (no fixtures)") {
  const ClipTokenizer tokenizer(tiny_tokenizer_json(), R"({"pad_token": "<|endoftext|>"})", "tiny");
  const TokenizedPrompt abc = tokenizer.encode("ABC ab\t\nc");
  // "abc" merges to abc</w>; "ab" stays a, b</w> (the pair a, b</w> has no merge); "c" is c</w>.
  nlohmann::json vocab = nlohmann::json::parse(tiny_tokenizer_json())["model"]["vocab"];
  CHECK_EQ(abc.ids[0], 1000);
  CHECK_EQ(abc.ids[1], vocab["abc</w>"].get<int64_t>());
  CHECK_EQ(abc.ids[2], vocab["a"].get<int64_t>());
  CHECK_EQ(abc.ids[3], vocab["b</w>"].get<int64_t>());
  CHECK_EQ(abc.ids[4], vocab["c</w>"].get<int64_t>());
  CHECK_EQ(abc.ids[5], 1001);
  CHECK_EQ(abc.ids[76], 1001);
  CHECK_EQ(abc.attention_mask[5], 1);
  CHECK_EQ(abc.attention_mask[6], 0);
  CHECK(!abc.truncated);
  const TokenizedPrompt long_prompt = tokenizer.encode(std::string(200, 'x') + " " + std::string(200, ' ') + "y");
  CHECK(long_prompt.truncated);
  CHECK_EQ(long_prompt.ids[76], 1001);
  CHECK_EQ(long_prompt.attention_mask[76], 1);
}

TEST("tokenizer: malformed UTF-8 and foreign tokenizers are one-line errors (no fixtures)") {
  const ClipTokenizer tokenizer(tiny_tokenizer_json(), R"({"pad_token": "<|endoftext|>"})", "tiny");
  try {
    tokenizer.encode("bad \xff byte");
    CHECK_MSG(false, "no error for malformed UTF-8");
  } catch (const Error& error) {
    CHECK_EQ(std::string(error.what()), std::string("prompt is not valid UTF-8 (at byte 4)"));
  }
  nlohmann::json other = nlohmann::json::parse(tiny_tokenizer_json());
  other["normalizer"] = {{"type", "NFKC"}};
  try {
    ClipTokenizer bad(other.dump(), R"({"pad_token": "<|endoftext|>"})", "other");
    CHECK_MSG(false, "no error for a foreign normalizer");
  } catch (const Error& error) {
    CHECK_MSG(std::string(error.what()).find("normalizer") != std::string::npos, error.what());
  }
}

TEST("tokenizer: equal to transformers on every fixture prompt, for CLIP's vocabulary and the bundle's") {
  const auto& tokens = test::fixtures().at("tokens");
  const auto prompts = tokens.at("prompts").get<std::vector<std::string>>();
  for (const auto& entry : tokens.at("tokenizers")) {
    const ClipTokenizer tokenizer = load(entry.at("folder").get<std::string>());
    const std::vector<int64_t> ids = test::load_array<int64_t>(entry.at("ids"));
    const std::vector<int64_t> mask = test::load_array<int64_t>(entry.at("mask"));
    size_t differing = 0;
    std::string first;
    for (size_t p = 0; p < prompts.size(); ++p) {
      const TokenizedPrompt encoded = tokenizer.encode(prompts[p]);
      bool equal = true;
      for (int i = 0; i < kTextTokens; ++i) {
        equal &= encoded.ids[i] == ids[p * kTextTokens + i] && encoded.attention_mask[i] == mask[p * kTextTokens + i];
      }
      if (!equal && differing++ == 0) first = nlohmann::json(prompts[p]).dump();
    }
    CHECK_MSG(differing == 0, entry.at("name").get<std::string>() + ": " + std::to_string(differing) + " of " +
                                  std::to_string(prompts.size()) + " prompts differ, first " + first);
    std::printf("       %s: %zu prompts equal\n", entry.at("name").get<std::string>().c_str(), prompts.size());
  }
}

TEST_MAIN()
