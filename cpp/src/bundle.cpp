#include "bundle.hpp"

#include <fstream>
#include <regex>
#include <sstream>

#include <nlohmann/json.hpp>

#include "error.hpp"
#include "sha256.hpp"

namespace wuerstchen {

namespace fs = std::filesystem;
using nlohmann::json;

const char* const kGraphNames[7] = {"prior_text",  "prior_condition", "prior_step",  "decoder_text",
                                    "decoder_condition", "decoder_step", "vqgan_decode"};

namespace {

// Typed access to the manifest: a missing or mistyped field names its path, what it is and what was expected.
class Field {
 public:
  Field(const json& value, std::string path, const std::string& manifest) : value_(value), path_(std::move(path)), manifest_(manifest) {}

  Field operator[](const char* key) const {
    if (!value_.is_object()) fail("an object");
    if (!value_.contains(key)) throw Error(manifest_ + ": " + path_ + "." + key + " is missing");
    return Field(value_.at(key), path_ + "." + key, manifest_);
  }
  Field operator[](size_t index) const {
    if (index >= size()) fail("a list of more than " + std::to_string(index) + " entries");
    return Field(value_.at(index), path_ + "[" + std::to_string(index) + "]", manifest_);
  }
  size_t size() const {
    if (!value_.is_array()) fail("a list");
    return value_.size();
  }
  bool has(const char* key) const { return value_.is_object() && value_.contains(key); }
  std::string text() const {
    if (!value_.is_string()) fail("a string");
    return value_.get<std::string>();
  }
  double number() const {
    if (!value_.is_number()) fail("a number");
    return value_.get<double>();
  }
  int integer(int low = 0, int high = 1 << 30) const {
    if (!value_.is_number_integer() || value_.get<int64_t>() < low || value_.get<int64_t>() > high) {
      fail("an integer from " + std::to_string(low) + " to " + std::to_string(high));
    }
    return value_.get<int>();
  }
  std::vector<std::string> strings() const {
    std::vector<std::string> out;
    for (size_t i = 0; i < size(); ++i) out.push_back((*this)[i].text());
    return out;
  }
  const json& raw() const { return value_; }
  [[noreturn]] void fail(const std::string& expected) const {
    std::string shown = value_.dump();
    if (shown.size() > 60) shown = shown.substr(0, 57) + "...";
    throw Error(manifest_ + ": " + path_ + " is " + shown + ", expected " + expected);
  }

 private:
  const json& value_;
  std::string path_;
  const std::string& manifest_;
};

std::string read_whole(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("bundle file " + path.string() + " cannot be read");
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

std::string file_sha256(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("bundle file " + path.string() + " cannot be read");
  Sha256 digest;
  std::vector<char> chunk(1 << 20);
  while (in) {
    in.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
    digest.update(chunk.data(), static_cast<size_t>(in.gcount()));
  }
  return digest.hex();
}

// A manifest path must name a file inside the bundle: relative, no "..", and inside once symlinks resolve.
fs::path checked_path(const fs::path& root, const std::string& relative, const std::string& manifest) {
  const fs::path path(relative);
  if (relative.empty() || path.is_absolute() || path.has_root_name() || path.has_root_directory()) {
    throw Error(manifest + ": file \"" + relative + "\" is not a path relative to the bundle");
  }
  for (const fs::path& part : path) {
    if (part == "..") throw Error(manifest + ": file \"" + relative + "\" leaves the bundle (\"..\")");
  }
  std::error_code error;
  const fs::path resolved = fs::weakly_canonical(root / path, error);
  const fs::path base = fs::canonical(root, error);
  const std::string inside = base.string() + "/";
  if (error || resolved.string().compare(0, inside.size(), inside) != 0) {
    throw Error(manifest + ": file \"" + relative + "\" lies outside the bundle (a symlink out?)");
  }
  return resolved;
}

// A shape entry, as the Python reader takes it: a size from 1 to 2^20, or one of the bundle's symbols with an
// optional factor ("batch", "16*dh").
Dim parse_dim(const Field& field) {
  constexpr int64_t kMaxSize = int64_t{1} << 20;
  const char* expected = "a size from 1 to 1048576 or a symbol such as \"batch\" or \"16*dh\" (batch, ph, pw, dh, dw)";
  const json& dim = field.raw();
  if (dim.is_number_integer()) {
    if (dim.get<int64_t>() < 1 || dim.get<int64_t>() > kMaxSize) field.fail(expected);
    return {dim.get<int64_t>(), ""};
  }
  static const std::regex form("(?:([1-9][0-9]{0,6})\\*)?(batch|ph|pw|dh|dw)");
  std::smatch match;
  const std::string text = dim.is_string() ? dim.get<std::string>() : "";
  if (!std::regex_match(text, match, form)) field.fail(expected);
  const int64_t factor = match[1].matched ? std::stoll(match[1].str()) : 1;
  if (factor > kMaxSize) field.fail(expected);
  return {factor, match[2].str()};
}

std::vector<TensorSpec> tensor_specs(const Field& list) {
  std::vector<TensorSpec> specs;
  for (size_t i = 0; i < list.size(); ++i) {
    TensorSpec spec{list[i]["name"].text(), list[i]["dtype"].text(), {}};
    const Field shape = list[i]["shape"];
    for (size_t d = 0; d < shape.size(); ++d) spec.dims.push_back(parse_dim(shape[d]));
    if (spec.dtype != "float32" && spec.dtype != "int64") {
      list[i]["dtype"].fail("float32 or int64 (this engine runs float32 bundles)");
    }
    specs.push_back(std::move(spec));
  }
  return specs;
}

}  // namespace

Bundle Bundle::open(const std::string& folder, bool check_hashes) {
  Bundle bundle;
  bundle.root_ = fs::path(folder);
  const fs::path manifest_path = bundle.root_ / "manifest.json";
  const std::string manifest_name = manifest_path.string();
  std::error_code error;
  if (folder.empty() || !fs::is_directory(bundle.root_, error)) throw Error("bundle=\"" + folder + "\": folder does not exist");
  if (!fs::is_regular_file(manifest_path, error)) {
    throw Error("bundle=\"" + folder + "\": no manifest.json; expected a folder written by `wuerstchen export`");
  }
  json manifest;
  try {
    manifest = json::parse(read_whole(manifest_path));
  } catch (const json::exception& parse_error) {
    throw Error(manifest_name + " is not valid JSON: " + parse_error.what());
  }
  const Field root(manifest, "manifest", manifest_name);
  if (!manifest.is_object() || !root.has("format") || !manifest["format"].is_string() ||
      manifest["format"] != "wuerstchen-bundle") {
    throw Error(manifest_name + ": format is not \"wuerstchen-bundle\"");
  }
  if (!root.has("format_version") || manifest["format_version"] != kBundleFormatVersion) {
    throw Error(manifest_name + ": format_version=" + (root.has("format_version") ? manifest["format_version"].dump() : "missing") +
                " is not supported: this engine reads version " + std::to_string(kBundleFormatVersion));
  }
  const std::string dtype = root["dtype"].text();
  if (dtype != "float32") {
    throw Error(manifest_name + ": dtype=\"" + dtype + "\": the C++ engine runs float32 bundles (export with --dtype fp32)");
  }

  // 1. Every listed file: inside the bundle, present, unaltered.
  const Field files = root["files"];
  if (!files.raw().is_object() || files.raw().empty()) files.fail("an object of file → SHA-256");
  for (const auto& [relative, digest] : files.raw().items()) {
    if (!digest.is_string()) files[relative.c_str()].fail("a SHA-256 hex string");
    const fs::path path = checked_path(bundle.root_, relative, manifest_name);
    if (!fs::is_regular_file(path, error)) throw Error("bundle file " + (bundle.root_ / relative).string() + " is missing");
    if (check_hashes && file_sha256(path) != digest.get<std::string>()) {
      throw Error("bundle file " + (bundle.root_ / relative).string() + " was altered: its SHA-256 differs from the manifest's " +
                  digest.get<std::string>().substr(0, 12) + "…");
    }
    bundle.files_[relative] = digest.get<std::string>();
  }
  auto require_listed = [&](const std::string& relative, const std::string& what) {
    if (!bundle.files_.count(relative)) {
      throw Error(manifest_name + ": " + what + " \"" + relative + "\" is not listed in files, so it cannot be checked");
    }
  };

  // 2. The graphs.
  const Field graphs = root["graphs"];
  for (const char* name : kGraphNames) {
    if (!graphs.has(name)) throw Error(manifest_name + ": graph " + name + " is missing; a bundle has all seven graphs");
    const Field graph = graphs[name];
    GraphSpec spec{graph["file"].text(), graph.has("external_data") ? graph["external_data"].strings() : std::vector<std::string>{},
                   tensor_specs(graph["inputs"]), tensor_specs(graph["outputs"])};
    require_listed(spec.file, std::string("graph ") + name + " file");
    for (const std::string& data : spec.external_data) require_listed(data, std::string("graph ") + name + " external data");
    bundle.graphs_[name] = std::move(spec);
  }

  // 3. The tokenizers.
  const Field tokenizers = root["tokenizers"];
  if (tokenizers["max_length"].integer() != 77) tokenizers["max_length"].fail("77, CLIP's context");
  for (const char* stage : {"prior", "decoder"}) {
    const std::string folder_name = tokenizers[stage].text();
    for (const char* file : {"tokenizer.json", "tokenizer_config.json"}) require_listed(folder_name + "/" + file, "tokenizer file");
    bundle.tokenizers_[stage] = folder_name;
  }

  // 4. Sizes, shapes and the schedule.
  BundleConfig& c = bundle.config_;
  const Field sizes = root["sizes"];
  c.size_step = sizes["step"].integer(1, 1 << 16);
  c.min_size = sizes["min"].integer(1, 1 << 16);
  c.max_size = sizes["max"].integer(c.min_size, 1 << 16);
  const Field config = root["config"];
  c.resolution_multiple = config["resolution_multiple"].number();
  c.latent_dim_scale = config["latent_dim_scale"].number();
  if (!(c.resolution_multiple > 0) || !(c.latent_dim_scale > 0)) config["resolution_multiple"].fail("positive scales");
  c.prior_channels = config["prior"]["c_in"].integer(1, 4096);
  c.decoder_channels = config["decoder"]["c_in"].integer(1, 4096);
  c.decoder_patch_size = config["decoder"]["patch_size"].integer(1, 64);
  c.decoder_level_count = static_cast<int>(config["decoder"]["c_hidden"].size());
  if (c.decoder_level_count < 1 || c.decoder_level_count > 8) config["decoder"]["c_hidden"].fail("1 to 8 levels");
  const Field vqgan = config["vqgan"];
  c.vqgan_upscale = vqgan["up_down_scale_factor"].integer(1, 64) << (vqgan["levels"].integer(1, 8) - 1);
  c.image_channels = vqgan["out_channels"].integer(1, 4);
  const Field schedule = root["schedule"];
  for (auto [stage, target] : {std::pair{"prior", &c.prior_schedule}, std::pair{"decoder", &c.decoder_schedule}}) {
    target->s = schedule[stage]["s"].number();
    target->scaler = schedule[stage]["scaler"].number();
  }
  c.latent_mean = static_cast<float>(schedule["image_embeddings"]["latent_mean"].number());
  c.latent_std = static_cast<float>(schedule["image_embeddings"]["latent_std"].number());
  const Field levels = schedule["effnet_pyramid"]["levels"];
  for (size_t i = 0; i < levels.size(); ++i) c.pyramid_levels.push_back(levels[i].integer(0, c.decoder_level_count - 1));
  const Field timesteps = schedule["default_prior_timesteps"];
  for (size_t i = 0; i < timesteps.size(); ++i) c.default_prior_timesteps.push_back(timesteps[i].number());
  c.default_decoder_steps = schedule["default_decoder_steps"].integer(1, 10000);
  c.default_prior_guidance = static_cast<float>(schedule["default_prior_guidance"].number());
  c.default_decoder_guidance = static_cast<float>(schedule["default_decoder_guidance"].number());
  c.default_height = schedule["default_size"][size_t{0}].integer(1, 1 << 16);
  c.default_width = schedule["default_size"][size_t{1}].integer(1, 1 << 16);
  return bundle;
}

const GraphSpec& Bundle::graph(const std::string& name) const { return graphs_.at(name); }

std::string Bundle::read(const std::string& relative) const {
  const auto listed = files_.find(relative);
  if (listed == files_.end()) throw Error("bundle file " + relative + " is not listed in the manifest");
  std::string bytes = read_whole(root_ / relative);
  if (sha256_hex(bytes.data(), bytes.size()) != listed->second) {
    throw Error("bundle file " + path(relative).string() + " was altered: its SHA-256 differs from the manifest's " +
                listed->second.substr(0, 12) + "…");
  }
  return bytes;
}

}  // namespace wuerstchen
