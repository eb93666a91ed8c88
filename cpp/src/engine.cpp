#include "engine.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include <onnxruntime_cxx_api.h>

#include "error.hpp"
#include "noise.hpp"
#include "resize.hpp"
#include "sampler.hpp"
#include "schedule.hpp"

namespace wuerstchen {

// ---------------------------------------------------------------------------------------------- tensors

// A dense tensor in host memory, float32 or int64.
struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
  std::vector<int64_t> ids;  // int64 tensors

  static Tensor zeros(std::vector<int64_t> shape) {
    Tensor t{std::move(shape), {}, {}};
    t.data.assign(t.count(), 0.0f);
    return t;
  }
  size_t count() const {
    size_t n = 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    return n;
  }
};

// The rows of `parts` one after another (torch.cat along the batch).
Tensor concat(const std::vector<const Tensor*>& parts) {
  Tensor out{parts[0]->shape, {}, {}};
  out.shape[0] = 0;
  for (const Tensor* p : parts) {
    out.shape[0] += p->shape[0];
    out.data.insert(out.data.end(), p->data.begin(), p->data.end());
    out.ids.insert(out.ids.end(), p->ids.begin(), p->ids.end());
  }
  return out;
}

// --------------------------------------------------------------------------------------------- graphs

// "[2, 16, 6, 6]", and a manifest's "[batch, 16, ph, pw]".
std::string shown(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t d = 0; d < shape.size(); ++d) out += (d ? ", " : "") + std::to_string(shape[d]);
  return out + "]";
}
std::string shown(const std::vector<Dim>& dims) {
  std::string out = "[";
  for (size_t d = 0; d < dims.size(); ++d) {
    const Dim& dim = dims[d];
    out += (d ? ", " : "") + (dim.symbol.empty() ? std::to_string(dim.factor)
                                                 : (dim.factor == 1 ? "" : std::to_string(dim.factor) + "*") + dim.symbol);
  }
  return out + "]";
}

Ort::Env& ort_env() {
  static Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "wuerstchen");
  return env;
}

// One bundle graph in ONNX Runtime: tensors in, in the manifest's input order; tensors out, shaped by the
// manifest's symbolic dims (learnt from the inputs, which must agree with each other).
class Graph {
 public:
  Graph(const Bundle& bundle, const std::string& name, const EngineOptions& options) : name_(name), spec_(bundle.graph(name)) {
    Ort::SessionOptions session_options;
    session_options.SetIntraOpNumThreads(options.threads);
    session_options.SetLogSeverityLevel(3);
    append_provider(session_options, options);
    session_ = std::make_unique<Ort::Session>(ort_env(), bundle.path(spec_.file).c_str(), session_options);
  }

  std::vector<Tensor> operator()(const std::vector<const Tensor*>& inputs) const {
    if (inputs.size() != spec_.inputs.size()) {
      throw Error("graph " + name_ + ": " + std::to_string(inputs.size()) + " inputs given, the manifest lists " +
                  std::to_string(spec_.inputs.size()));
    }
    std::map<std::string, int64_t> symbols;
    for (size_t i = 0; i < inputs.size(); ++i) learn(spec_.inputs[i], inputs[i]->shape, symbols);
    const Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<Ort::Value> in_values, out_values;
    std::vector<const char*> in_names, out_names;
    for (size_t i = 0; i < inputs.size(); ++i) {
      Tensor& t = const_cast<Tensor&>(*inputs[i]);  // ONNX Runtime's API takes non-const buffers; inputs are not written
      in_names.push_back(spec_.inputs[i].name.c_str());
      if (spec_.inputs[i].dtype == "int64") {
        in_values.push_back(Ort::Value::CreateTensor<int64_t>(memory, t.ids.data(), t.ids.size(), t.shape.data(), t.shape.size()));
      } else {
        in_values.push_back(Ort::Value::CreateTensor<float>(memory, t.data.data(), t.data.size(), t.shape.data(), t.shape.size()));
      }
    }
    std::vector<Tensor> outputs;
    outputs.reserve(spec_.outputs.size());
    for (const TensorSpec& spec : spec_.outputs) {
      if (spec.dtype != "float32") throw Error("graph " + name_ + ": output " + spec.name + " is " + spec.dtype + ", expected float32");
      outputs.push_back(Tensor::zeros(resolve(spec, symbols)));
      out_names.push_back(spec.name.c_str());
    }
    for (Tensor& t : outputs) {
      out_values.push_back(Ort::Value::CreateTensor<float>(memory, t.data.data(), t.data.size(), t.shape.data(), t.shape.size()));
    }
    session_->Run(Ort::RunOptions{nullptr}, in_names.data(), in_values.data(), in_values.size(), out_names.data(),
                  out_values.data(), out_values.size());
    return outputs;
  }

 private:
  static void append_provider(Ort::SessionOptions& session_options, const EngineOptions& options) {
    if (options.provider == Provider::Cpu) return;
#ifdef WUERSTCHEN_GPU
    const OrtApi& api = Ort::GetApi();
    const std::string device = std::to_string(options.device_id);
    if (options.provider == Provider::TensorRT) {
      OrtTensorRTProviderOptionsV2* trt = nullptr;
      Ort::ThrowOnError(api.CreateTensorRTProviderOptions(&trt));
      const char* keys[] = {"device_id", "trt_engine_cache_enable", "trt_engine_cache_path"};
      const char* values[] = {device.c_str(), "1", "trt-cache"};
      Ort::ThrowOnError(api.UpdateTensorRTProviderOptions(trt, keys, values, 3));
      const OrtStatus* status = api.SessionOptionsAppendExecutionProvider_TensorRT_V2(session_options, trt);
      api.ReleaseTensorRTProviderOptions(trt);
      Ort::ThrowOnError(const_cast<OrtStatus*>(status));
    }
    OrtCUDAProviderOptionsV2* cuda = nullptr;  // CUDA runs what TensorRT does not take
    Ort::ThrowOnError(api.CreateCUDAProviderOptions(&cuda));
    const char* keys[] = {"device_id"};
    const char* values[] = {device.c_str()};
    Ort::ThrowOnError(api.UpdateCUDAProviderOptions(cuda, keys, values, 1));
    const OrtStatus* status = api.SessionOptionsAppendExecutionProvider_CUDA_V2(session_options, cuda);
    api.ReleaseCUDAProviderOptions(cuda);
    Ort::ThrowOnError(const_cast<OrtStatus*>(status));
#else
    (void)session_options;
    throw Error(std::string("provider=") + (options.provider == Provider::Cuda ? "cuda" : "tensorrt") +
                ": this build has no GPU providers; build with WUERSTCHEN_GPU=1 cpp/build.sh (onnxruntime-gpu)");
#endif
  }

  void learn(const TensorSpec& spec, const std::vector<int64_t>& shape, std::map<std::string, int64_t>& symbols) const {
    bool ok = shape.size() == spec.dims.size();
    for (size_t d = 0; ok && d < shape.size(); ++d) {
      const Dim& dim = spec.dims[d];
      if (!dim.symbol.empty() && !symbols.count(dim.symbol) && shape[d] % dim.factor == 0) {
        symbols[dim.symbol] = shape[d] / dim.factor;
      }
      ok = shape[d] == dim.factor * (dim.symbol.empty() ? 1 : symbols[dim.symbol]);
    }
    if (!ok) {
      throw Error("graph " + name_ + ": input " + spec.name + " has shape " + shown(shape) + ", expected the manifest's " +
                  shown(spec.dims));
    }
  }

  std::vector<int64_t> resolve(const TensorSpec& spec, const std::map<std::string, int64_t>& symbols) const {
    std::vector<int64_t> shape;
    for (const Dim& dim : spec.dims) {
      if (!dim.symbol.empty() && !symbols.count(dim.symbol)) {
        throw Error("graph " + name_ + ": output " + spec.name + " has dimension " + dim.symbol + ", which no input has");
      }
      shape.push_back(dim.factor * (dim.symbol.empty() ? 1 : symbols.at(dim.symbol)));
    }
    return shape;
  }

  std::string name_;
  GraphSpec spec_;
  std::unique_ptr<Ort::Session> session_;
};

// ------------------------------------------------------------------------------------------------ engine

Engine::Engine(const std::string& bundle_folder, const EngineOptions& options)
    : bundle_(Bundle::open(bundle_folder, options.check_hashes)), options_(options) {
  if (options.threads < 0) throw Error("threads=" + std::to_string(options.threads) + ": expected 0 (automatic) or more");
  auto tokenizer = [&](const char* stage) {
    const std::string folder = bundle_.tokenizer_folder(stage);
    return std::make_unique<ClipTokenizer>(bundle_.read(folder + "/tokenizer.json"), bundle_.read(folder + "/tokenizer_config.json"),
                                           bundle_.path(folder).string());
  };
  prior_tokenizer_ = tokenizer("prior");
  decoder_tokenizer_ = tokenizer("decoder");
  try {
    for (const char* name : kGraphNames) graphs_[name] = std::make_unique<Graph>(bundle_, name, options_);
  } catch (const Ort::Exception& error) {
    throw Error(std::string("ONNX Runtime could not load the bundle's graphs: ") + error.what());
  }
}

Engine::~Engine() = default;

Request Engine::resolve(const Request& request) const {
  const BundleConfig& c = bundle_.config();
  Request r = request;
  if (r.height == 0) r.height = std::clamp(c.default_height, c.min_size, c.max_size);
  if (r.width == 0) r.width = std::clamp(c.default_width, c.min_size, c.max_size);
  const std::string grid = "a multiple of " + std::to_string(c.size_step) + " from " + std::to_string(c.min_size) + " to " +
                           std::to_string(c.max_size);
  for (auto [name, value] : {std::pair{"height", r.height}, std::pair{"width", r.width}}) {
    if (value % c.size_step != 0) throw Error(std::string(name) + "=" + std::to_string(value) + " is off the model's size grid: expected " + grid);
    if (value < c.min_size || value > c.max_size) {
      throw Error(std::string(name) + "=" + std::to_string(value) + " is outside the sizes this bundle serves: expected " + grid);
    }
  }
  if (r.prior_steps < 0 || r.prior_steps > 10000) throw Error("prior_steps=" + std::to_string(r.prior_steps) + ": expected 1 to 10000, or 0 for the published schedule");
  if (r.decoder_steps == 0) r.decoder_steps = c.default_decoder_steps;
  if (r.decoder_steps < 0 || r.decoder_steps > 10000) throw Error("decoder_steps=" + std::to_string(r.decoder_steps) + ": expected 1 to 10000");
  if (r.prior_guidance < 0) r.prior_guidance = c.default_prior_guidance;
  if (r.decoder_guidance < 0) r.decoder_guidance = c.default_decoder_guidance;
  for (auto [name, value] : {std::pair{"prior_guidance", r.prior_guidance}, std::pair{"decoder_guidance", r.decoder_guidance}}) {
    if (!std::isfinite(value) || value > 1000) throw Error(std::string(name) + "=" + std::to_string(value) + ": expected a finite scale up to 1000");
  }
  return r;
}

namespace {

// CLIP states of one prompt: [1, 77, width]. Prompts and negative prompts are encoded in separate runs, as
// the Python engine encodes each list, so the graph sees the same batch sizes.
Tensor text_states(const Graph& graph, const ClipTokenizer& tokenizer, const std::string& prompt) {
  const TokenizedPrompt tokens = tokenizer.encode(prompt);
  Tensor ids{{1, kTextTokens}, {}, {tokens.ids.begin(), tokens.ids.end()}};
  Tensor mask{{1, kTextTokens}, {}, {tokens.attention_mask.begin(), tokens.attention_mask.end()}};
  return std::move(graph({&ids, &mask})[0]);
}

// The denoising loop: model on [x, x] against [prompt, negative] when guided, lerp, sampler step.
Tensor denoise(const Graph& step_graph, const std::vector<Tensor>& conditioning, const DenoisingSchedule& schedule,
               Tensor x, const std::vector<std::vector<float>>& noise, float guidance, TorchCpu cpu) {
  const bool guided = guidance > 1;
  const size_t count = x.count();
  for (int i = 0; i < schedule.steps(); ++i) {
    Tensor input = guided ? concat({&x, &x}) : x;
    Tensor r{{input.shape[0]}, std::vector<float>(static_cast<size_t>(input.shape[0]), schedule.ratios[i]), {}};
    std::vector<const Tensor*> inputs = {&input, &r};
    for (const Tensor& c : conditioning) inputs.push_back(&c);
    Tensor eps = std::move(step_graph(inputs)[0]);
    if (guided) guide(eps.data.data(), eps.data.data() + count, count, guidance, cpu);
    sampler_step(x.data.data(), eps.data.data(), noise[i].data(), count, schedule.coefficients[i]);
  }
  return x;
}

// The initial latents and one noise tensor per step, drawn in the reference's order (the last step's too,
// though it is multiplied by zero, to keep the generator in step).
std::pair<Tensor, std::vector<std::vector<float>>> draw_noise(TorchGenerator& generator, std::vector<int64_t> shape, int steps) {
  Tensor initial = Tensor::zeros(std::move(shape));
  generator.randn(initial.data.data(), initial.count());
  std::vector<std::vector<float>> noise(static_cast<size_t>(steps), std::vector<float>(initial.count()));
  for (auto& n : noise) generator.randn(n.data(), n.size());
  return {std::move(initial), std::move(noise)};
}

}  // namespace

Image Engine::generate(const Request& request) const {
  const Request r = resolve(request);
  const BundleConfig& c = bundle_.config();
  const TorchCpu cpu = options_.torch_cpu;
  try {
    // 1. Shapes, as engine/shapes.py: prior latent ceil(side / 42.67), decoder latent int(prior · 10.67).
    const int64_t ph = static_cast<int64_t>(std::ceil(r.height / c.resolution_multiple));
    const int64_t pw = static_cast<int64_t>(std::ceil(r.width / c.resolution_multiple));
    const int64_t dh = static_cast<int64_t>(ph * c.latent_dim_scale), dw = static_cast<int64_t>(pw * c.latent_dim_scale);
    if (dh % c.decoder_downscale() != 0 || dw % c.decoder_downscale() != 0) {
      throw Error("height=" + std::to_string(r.height) + ", width=" + std::to_string(r.width) + ": the decoder latent is not a multiple of " +
                  std::to_string(c.decoder_downscale()));
    }
    TorchGenerator generator(r.seed, cpu);

    // 2. Prior: text states, conditioning once, then the loop; image embeddings = latents · 42 − 1.
    const bool prior_guided = r.prior_guidance > 1;
    Tensor prior_text = text_states(*graphs_.at("prior_text"), *prior_tokenizer_, r.prompt);
    if (prior_guided) {
      const Tensor negative = text_states(*graphs_.at("prior_text"), *prior_tokenizer_, r.negative_prompt);
      prior_text = concat({&prior_text, &negative});
    }
    const std::vector<float> prior_grid = r.prior_steps == 0 ? custom_timesteps(c.default_prior_timesteps)
                                                             : linear_timesteps(r.prior_steps, cpu);
    const DenoisingSchedule prior_schedule = make_schedule(prior_grid, c.prior_schedule);
    auto [prior_initial, prior_noise] = draw_noise(generator, {1, c.prior_channels, ph, pw}, prior_schedule.steps());
    const std::vector<Tensor> prior_conditioning = (*graphs_.at("prior_condition"))({&prior_text});
    Tensor embeddings = denoise(*graphs_.at("prior_step"), prior_conditioning, prior_schedule, std::move(prior_initial),
                                prior_noise, r.prior_guidance, cpu);
    for (float& v : embeddings.data) {
      const float scaled = v * c.latent_mean;
      v = scaled - c.latent_std;
    }

    // 3. Decoder: text states, the pyramid (the negative half sees a zero embedding), conditioning, loop.
    const bool decoder_guided = r.decoder_guidance > 1;
    Tensor decoder_text = text_states(*graphs_.at("decoder_text"), *decoder_tokenizer_, r.prompt);
    if (decoder_guided) {
      const Tensor negative = text_states(*graphs_.at("decoder_text"), *decoder_tokenizer_, r.negative_prompt);
      decoder_text = concat({&decoder_text, &negative});
    }
    const DenoisingSchedule decoder_schedule = make_schedule(linear_timesteps(r.decoder_steps, cpu), c.decoder_schedule);
    auto [decoder_initial, decoder_noise] = draw_noise(generator, {1, c.decoder_channels, dh, dw}, decoder_schedule.steps());
    if (decoder_guided) {
      const Tensor zeros = Tensor::zeros(embeddings.shape);
      embeddings = concat({&embeddings, &zeros});
    }
    std::vector<Tensor> pyramid;
    for (int level : c.pyramid_levels) {
      const int64_t level_h = dh / (int64_t{c.decoder_patch_size} << level), level_w = dw / (int64_t{c.decoder_patch_size} << level);
      const int64_t planes = embeddings.shape[0] * embeddings.shape[1];
      pyramid.push_back(Tensor{{embeddings.shape[0], embeddings.shape[1], level_h, level_w},
                               resize_bicubic_antialiased(embeddings.data.data(), planes, ph, pw, level_h, level_w, cpu),
                               {}});
    }
    std::vector<const Tensor*> condition_inputs = {&decoder_text};
    for (const Tensor& level : pyramid) condition_inputs.push_back(&level);
    const std::vector<Tensor> decoder_conditioning = (*graphs_.at("decoder_condition"))(condition_inputs);
    const Tensor latents = denoise(*graphs_.at("decoder_step"), decoder_conditioning, decoder_schedule, std::move(decoder_initial),
                                   decoder_noise, r.decoder_guidance, cpu);

    // 4. VQGAN (it scales the latents and clamps the pixels itself), then CHW → HWC.
    const Tensor images = std::move((*graphs_.at("vqgan_decode"))({&latents})[0]);
    const std::vector<int64_t> expected = {1, 3, r.height, r.width};
    if (images.shape != expected) {
      // Only a manifest whose config disagrees with its graphs (latent_dim_scale, the VQGAN's scale) gets here.
      throw Error("vqgan_decode made images of shape " + shown(images.shape) + ", expected " + shown(expected) +
                  ": the manifest's config does not match its graphs");
    }
    Image image{r.height, r.width, {}};
    const size_t pixels = static_cast<size_t>(image.height) * image.width;
    image.rgb.resize(pixels * 3);
    for (size_t p = 0; p < pixels; ++p) {
      for (size_t ch = 0; ch < 3; ++ch) image.rgb[p * 3 + ch] = images.data[ch * pixels + p];
    }
    return image;
  } catch (const Ort::Exception& error) {
    throw Error(std::string("ONNX Runtime failed: ") + error.what());
  }
}

}  // namespace wuerstchen
