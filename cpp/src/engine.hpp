// The pipeline over a bundle, in C++: prompts → CLIP ids → prior loop → ×42 − 1 → pyramid → decoder loop
// → VQGAN → an RGB image. The same request and seed give the image `wuerstchen generate --bundle` makes.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bundle.hpp"
#include "tokenizer.hpp"
#include "torch_cpu.hpp"

namespace wuerstchen {

enum class Provider { Cpu, Cuda, TensorRT };

struct EngineOptions {
  Provider provider = Provider::Cpu;
  int device_id = 0;         // the GPU, for CUDA and TensorRT
  int threads = 0;           // ONNX Runtime's intra-op threads; 0 lets it choose, as Python does
  bool check_hashes = true;  // SHA-256 of every bundle file at load
  TorchCpu torch_cpu = detect_torch_cpu();  // whose arithmetic to reproduce (see torch_cpu.hpp)
};

struct Request {
  std::string prompt, negative_prompt;
  int height = 0, width = 0;  // 0: the bundle's default size
  int prior_steps = 0;        // 0: the published prior schedule (the manifest's default_prior_timesteps)
  int decoder_steps = 0;      // 0: the manifest's default
  float prior_guidance = -1, decoder_guidance = -1;  // negative: the manifest's defaults
  uint64_t seed = 0;
};

struct Image {
  int height = 0, width = 0;
  std::vector<float> rgb;  // height × width × 3, in [0, 1]
};

class Graph;

class Engine {
 public:
  Engine(const std::string& bundle_folder, const EngineOptions& options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // The request with its defaults filled in from the manifest, checked; Error names a bad field.
  Request resolve(const Request& request) const;
  Image generate(const Request& request) const;
  const Bundle& bundle() const { return bundle_; }

 private:
  Bundle bundle_;
  EngineOptions options_;
  std::unique_ptr<ClipTokenizer> prior_tokenizer_, decoder_tokenizer_;
  std::map<std::string, std::unique_ptr<Graph>> graphs_;
};

}  // namespace wuerstchen
