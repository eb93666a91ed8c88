// Reading a bundle (the folder `wuerstchen export` writes): manifest.json checked before anything runs.
// Refused, each with a one-line error: a missing or invalid manifest, another format or format_version,
// a missing graph, a file listed with a path that leaves the folder (absolute, "..", or a symlink out), a
// missing or altered file (SHA-256), and a graph or tokenizer file the manifest does not list.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "schedule.hpp"

namespace wuerstchen {

constexpr int kBundleFormatVersion = 1;

// One dimension of a graph's tensor: factor · symbol ("4*dh" → 4, "dh"; "batch" → 1, "batch"), or a fixed
// size (77 → 77, "").
struct Dim {
  int64_t factor = 1;
  std::string symbol;
};

struct TensorSpec {
  std::string name;
  std::string dtype;      // "float32" or "int64" in the bundles this engine runs
  std::vector<Dim> dims;
};

struct GraphSpec {
  std::string file;
  std::vector<std::string> external_data;
  std::vector<TensorSpec> inputs, outputs;
};

// What the pipeline needs from the manifest's config, sizes and schedule sections.
struct BundleConfig {
  int min_size = 0, max_size = 0, size_step = 0;  // image sides the graphs serve
  double resolution_multiple = 0;                 // prior latent = ceil(side / this)
  double latent_dim_scale = 0;                    // decoder latent = int(prior latent · this)
  int prior_channels = 0, decoder_channels = 0, image_channels = 0;
  int decoder_patch_size = 0, decoder_level_count = 0, vqgan_upscale = 0;
  int decoder_downscale() const { return decoder_patch_size << (decoder_level_count - 1); }
  std::vector<int> pyramid_levels;  // the decoder levels the image embedding is resized to (effnet_pyramid)
  float latent_mean = 0, latent_std = 0;  // image_embeddings = prior_latents · mean − std
  CosineSchedule prior_schedule, decoder_schedule;
  std::vector<double> default_prior_timesteps;
  int default_decoder_steps = 0;
  float default_prior_guidance = 0, default_decoder_guidance = 0;
  int default_height = 0, default_width = 0;
};

class Bundle {
 public:
  // Opens and checks the bundle; with `check_hashes`, every listed file's SHA-256 is verified.
  static Bundle open(const std::string& folder, bool check_hashes = true);

  const BundleConfig& config() const { return config_; }
  const GraphSpec& graph(const std::string& name) const;
  // A listed file's bytes, hashed again as read (so what is used is what was checked).
  std::string read(const std::string& relative) const;
  std::filesystem::path path(const std::string& relative) const { return root_ / relative; }
  const std::string& tokenizer_folder(const std::string& stage) const { return tokenizers_.at(stage); }

 private:
  std::filesystem::path root_;
  BundleConfig config_;
  std::map<std::string, GraphSpec> graphs_;
  std::map<std::string, std::string> tokenizers_;
  std::map<std::string, std::string> files_;  // relative path → SHA-256
};

// The graphs a bundle has, in pipeline order.
extern const char* const kGraphNames[7];

}  // namespace wuerstchen
