// A C++ wrapper over the C API (wuerstchen.h): errors become std::runtime_error, buffers std::vector.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "wuerstchen.h"

namespace wuerstchen {

struct Options {
  std::string provider = "cpu";  // "cpu", "cuda" or "tensorrt"
  int device_id = 0;
  int threads = 0;
  bool check_hashes = true;
};

struct GenerateRequest {
  std::string prompt, negative_prompt;
  int height = 0, width = 0;  // 0: the bundle's default size
  int prior_steps = 0, decoder_steps = 0;
  float prior_guidance = -1, decoder_guidance = -1;
  uint64_t seed = 0;
};

class Pipeline {
 public:
  explicit Pipeline(const std::string& bundle_folder, const Options& options = {}) {
    wuerstchen_options c_options;
    wuerstchen_default_options(&c_options);
    c_options.provider = options.provider.c_str();
    c_options.device_id = options.device_id;
    c_options.threads = options.threads;
    c_options.check_hashes = options.check_hashes ? 1 : 0;
    engine_.reset(wuerstchen_create(bundle_folder.c_str(), &c_options));
    if (!engine_) throw std::bad_alloc();
    if (const char* error = wuerstchen_last_error(engine_.get())) throw std::runtime_error(error);
  }

  // Height × width × 3 bytes of RGB.
  std::vector<uint8_t> generate(const GenerateRequest& request) {
    wuerstchen_request c_request = to_c(request);
    std::vector<uint8_t> rgb(static_cast<size_t>(c_request.height) * c_request.width * 3);
    if (wuerstchen_generate(engine_.get(), &c_request, rgb.data(), rgb.size()) != 0) {
      throw std::runtime_error(wuerstchen_last_error(engine_.get()));
    }
    return rgb;
  }

 private:
  wuerstchen_request to_c(const GenerateRequest& request) const {
    wuerstchen_request r;
    wuerstchen_default_request(&r);
    r.prompt = request.prompt.c_str();
    r.negative_prompt = request.negative_prompt.c_str();
    r.height = request.height, r.width = request.width;
    r.prior_steps = request.prior_steps, r.decoder_steps = request.decoder_steps;
    r.prior_guidance = request.prior_guidance, r.decoder_guidance = request.decoder_guidance;
    r.seed = request.seed;
    for (auto [name, value] : {std::pair{"height", r.height}, std::pair{"width", r.width}}) {
      if (value <= 0) {
        throw std::invalid_argument(std::string(name) + "=" + std::to_string(value) + ": expected the image's size in pixels (the buffer's)");
      }
    }
    return r;
  }

  struct Destroy {
    void operator()(wuerstchen_engine* engine) const { wuerstchen_destroy(engine); }
  };
  std::unique_ptr<wuerstchen_engine, Destroy> engine_;
};

}  // namespace wuerstchen
