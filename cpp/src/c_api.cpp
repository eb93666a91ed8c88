// The C API over wuerstchen::Engine: every exception becomes the handle's last error string.
#include <cmath>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>

#include "engine.hpp"
#include "error.hpp"
#include "wuerstchen/wuerstchen.h"

struct wuerstchen_engine {
  std::unique_ptr<wuerstchen::Engine> engine;
  std::string error;
  bool failed = false;
};

namespace {

template <typename Body>
int guarded(wuerstchen_engine* handle, Body body) {
  if (handle == nullptr) return 1;
  try {
    handle->failed = false;
    body();
    return 0;
  } catch (const std::bad_alloc&) {
    handle->error = "out of memory";
  } catch (const std::exception& error) {
    handle->error = error.what();
  } catch (...) {
    handle->error = "unknown error";
  }
  // One line: errors from libraries may carry newlines.
  for (char& c : handle->error) c = (c == '\n' || c == '\r') ? ' ' : c;
  handle->failed = true;
  return 1;
}

wuerstchen::Image generate_image(wuerstchen_engine* handle, const wuerstchen_request* request, size_t channels_count) {
  using wuerstchen::Error;
  if (handle->engine == nullptr) throw Error(handle->error.empty() ? "the engine was not created" : handle->error);
  if (request == nullptr) throw Error("request is NULL");
  if (request->prompt == nullptr) throw Error("prompt is NULL: expected a UTF-8 string");
  wuerstchen::Request r;
  r.prompt = request->prompt;
  r.negative_prompt = request->negative_prompt != nullptr ? request->negative_prompt : "";
  r.height = request->height, r.width = request->width;
  r.prior_steps = request->prior_steps, r.decoder_steps = request->decoder_steps;
  r.prior_guidance = request->prior_guidance, r.decoder_guidance = request->decoder_guidance;
  r.seed = request->seed;
  const wuerstchen::Request resolved = handle->engine->resolve(r);
  const size_t needed = static_cast<size_t>(resolved.height) * resolved.width * 3;
  if (channels_count != needed) {
    throw Error("buffer of " + std::to_string(channels_count) + " values: expected height × width × 3 = " + std::to_string(needed));
  }
  return handle->engine->generate(resolved);
}

}  // namespace

extern "C" {

void wuerstchen_default_options(wuerstchen_options* options) {
  if (options == nullptr) return;
  options->provider = "cpu";
  options->device_id = 0;
  options->threads = 0;
  options->check_hashes = 1;
}

void wuerstchen_default_request(wuerstchen_request* request) {
  if (request == nullptr) return;
  *request = wuerstchen_request{};
  request->prompt = "";
  request->negative_prompt = "";
  request->prior_guidance = -1;
  request->decoder_guidance = -1;
}

wuerstchen_engine* wuerstchen_create(const char* bundle_folder, const wuerstchen_options* options) {
  auto* handle = new (std::nothrow) wuerstchen_engine;
  if (handle == nullptr) return nullptr;
  guarded(handle, [&] {
    using wuerstchen::Error;
    if (bundle_folder == nullptr) throw Error("bundle folder is NULL");
    wuerstchen_options defaults;
    wuerstchen_default_options(&defaults);
    const wuerstchen_options& o = options != nullptr ? *options : defaults;
    wuerstchen::EngineOptions engine_options;
    const std::string provider = o.provider != nullptr ? o.provider : "cpu";
    if (provider == "cpu") {
      engine_options.provider = wuerstchen::Provider::Cpu;
    } else if (provider == "cuda") {
      engine_options.provider = wuerstchen::Provider::Cuda;
    } else if (provider == "tensorrt") {
      engine_options.provider = wuerstchen::Provider::TensorRT;
    } else {
      throw Error("provider=\"" + provider + "\": expected cpu, cuda or tensorrt");
    }
    if (o.device_id < 0) throw Error("device_id=" + std::to_string(o.device_id) + ": expected 0 or more");
    engine_options.device_id = o.device_id;
    engine_options.threads = o.threads;
    engine_options.check_hashes = o.check_hashes != 0;
    handle->engine = std::make_unique<wuerstchen::Engine>(bundle_folder, engine_options);
  });
  return handle;
}

int wuerstchen_generate(wuerstchen_engine* engine, const wuerstchen_request* request, uint8_t* rgb, size_t rgb_size) {
  return guarded(engine, [&] {
    if (rgb == nullptr) throw wuerstchen::Error("rgb buffer is NULL");
    const wuerstchen::Image image = generate_image(engine, request, rgb_size);
    // As the Python engine: round(x · 255) in float32, half to even.
    for (size_t i = 0; i < image.rgb.size(); ++i) rgb[i] = static_cast<uint8_t>(std::nearbyint(image.rgb[i] * 255.0f));
  });
}

int wuerstchen_generate_float(wuerstchen_engine* engine, const wuerstchen_request* request, float* rgb, size_t rgb_count) {
  return guarded(engine, [&] {
    if (rgb == nullptr) throw wuerstchen::Error("rgb buffer is NULL");
    const wuerstchen::Image image = generate_image(engine, request, rgb_count);
    std::memcpy(rgb, image.rgb.data(), image.rgb.size() * sizeof(float));
  });
}

const char* wuerstchen_last_error(const wuerstchen_engine* engine) {
  if (engine == nullptr) return "engine is NULL";
  return engine->failed ? engine->error.c_str() : nullptr;
}

void wuerstchen_destroy(wuerstchen_engine* engine) { delete engine; }

}  // extern "C"
