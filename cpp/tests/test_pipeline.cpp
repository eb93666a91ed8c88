// The whole pipeline against the Python engine's ONNX Runtime backend (fixtures: three sizes, seeds,
// guidance on and off, a negative prompt), through the C API; and bad bundles and requests as error strings.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <unistd.h>
#include <sstream>

#include "check.hpp"
#include "wuerstchen/wuerstchen.h"

namespace fs = std::filesystem;

namespace {

std::string bundle_folder() { return test::fixtures().at("bundle").get<std::string>(); }

// A copy of the fixture bundle in a scratch folder, to break.
fs::path copy_bundle(const std::string& name) {
  const fs::path target = fs::temp_directory_path() / ("wuerstchen-test-" + std::to_string(::getpid()) + "-" + name);
  fs::remove_all(target);
  fs::copy(bundle_folder(), target, fs::copy_options::recursive);
  return target;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

void write_text(const fs::path& path, const std::string& text) { std::ofstream(path) << text; }

std::string replace(std::string text, const std::string& from, const std::string& to) {
  const size_t at = text.find(from);
  if (at == std::string::npos) throw test::Failure("manifest has no " + from);
  return text.replace(at, from.size(), to);
}

// The error of creating an engine over `folder`, or "" when it loads.
std::string creation_error(const fs::path& folder) {
  wuerstchen_engine* engine = wuerstchen_create(folder.c_str(), nullptr);
  const char* error = wuerstchen_last_error(engine);
  std::string message = error != nullptr ? error : "";
  wuerstchen_destroy(engine);
  return message;
}

void check_contains(const std::string& text, const std::string& part) {
  CHECK_MSG(text.find(part) != std::string::npos, "\"" + text + "\" does not mention \"" + part + "\"");
  CHECK_MSG(text.find('\n') == std::string::npos, "\"" + text + "\" is not one line");
}

}  // namespace

TEST("images: equal to the Python engine at three sizes (floats within 1/255, bytes counted)") {
  wuerstchen_engine* engine = wuerstchen_create(bundle_folder().c_str(), nullptr);
  CHECK_MSG(wuerstchen_last_error(engine) == nullptr, wuerstchen_last_error(engine));
  for (const auto& image : test::fixtures().at("images")) {
    const std::vector<float> expected = test::load_array<float>(image.at("image"));
    const std::string prompt = image.at("prompt"), negative = image.at("negative_prompt");
    wuerstchen_request request;
    wuerstchen_default_request(&request);
    request.prompt = prompt.c_str();
    request.negative_prompt = negative.c_str();
    request.height = image.at("height"), request.width = image.at("width");
    request.seed = image.at("seed");
    request.prior_steps = image.at("prior_steps").is_null() ? 0 : image.at("prior_steps").get<int>();
    request.decoder_steps = image.at("decoder_steps");
    request.prior_guidance = image.at("prior_guidance"), request.decoder_guidance = image.at("decoder_guidance");
    std::vector<float> rgb(expected.size());
    CHECK_MSG(wuerstchen_generate_float(engine, &request, rgb.data(), rgb.size()) == 0, wuerstchen_last_error(engine));
    std::vector<uint8_t> bytes(expected.size());
    CHECK_MSG(wuerstchen_generate(engine, &request, bytes.data(), bytes.size()) == 0, wuerstchen_last_error(engine));
    double largest = 0;
    size_t unequal_floats = 0, unequal_bytes = 0;
    for (size_t i = 0; i < expected.size(); ++i) {
      largest = std::max(largest, std::fabs(static_cast<double>(rgb[i]) - expected[i]));
      unequal_floats += rgb[i] != expected[i];
      unequal_bytes += bytes[i] != static_cast<uint8_t>(std::nearbyint(expected[i] * 255.0f));
    }
    std::printf("       %s: max |C++ - Python| = %.3g; %zu of %zu floats differ, %zu bytes differ\n",
                image.at("name").get<std::string>().c_str(), largest, unequal_floats, expected.size(), unequal_bytes);
    CHECK_MSG(largest <= 1.0 / 255, image.at("name").get<std::string>() + ": differs by " + std::to_string(largest));
  }
  wuerstchen_destroy(engine);
}

TEST("requests: sizes off the grid or outside the bundle, bad buffers, bad UTF-8 are error strings") {
  wuerstchen_engine* engine = wuerstchen_create(bundle_folder().c_str(), nullptr);
  CHECK(wuerstchen_last_error(engine) == nullptr);
  wuerstchen_request request;
  wuerstchen_default_request(&request);
  request.prompt = "a cat";
  request.height = request.width = 128;
  request.prior_steps = request.decoder_steps = 1;
  std::vector<uint8_t> rgb(4096 * 4096 * 3);
  auto error = [&](size_t size) {
    CHECK(wuerstchen_generate(engine, &request, rgb.data(), size) != 0);
    return std::string(wuerstchen_last_error(engine));
  };
  check_contains(error(100), "buffer of 100 values: expected height × width × 3 = 49152");
  request.height = 4096;
  check_contains(error(rgb.size()), "height=4096 is outside the sizes this bundle serves");
  request.height = 200;
  check_contains(error(rgb.size()), "height=200 is off the model's size grid");
  request.height = 128;
  request.prompt = "caf\xc3";
  check_contains(error(128 * 128 * 3), "prompt is not valid UTF-8");
  request.prompt = nullptr;
  check_contains(error(128 * 128 * 3), "prompt is NULL");
  request.prompt = "a cat";
  request.prior_guidance = NAN;
  check_contains(error(128 * 128 * 3), "prior_guidance=nan");
  request.prior_guidance = 4;
  CHECK_MSG(wuerstchen_generate(engine, &request, rgb.data(), 128 * 128 * 3) == 0, wuerstchen_last_error(engine));
  CHECK(wuerstchen_last_error(engine) == nullptr);
  wuerstchen_destroy(engine);
}

TEST("bundles: other format_version, missing, altered, unlisted or escaping files are error strings") {
  const fs::path manifest_name = "manifest.json";
  struct Case {
    const char* name;
    std::function<void(const fs::path&)> mutate;
    const char* expected;
  };
  const std::vector<Case> cases = {
      {"version", [&](const fs::path& b) { write_text(b / manifest_name, replace(read_text(b / manifest_name), "\"format_version\": 1", "\"format_version\": 2")); },
       "format_version=2 is not supported: this engine reads version 1"},
      {"format", [&](const fs::path& b) { write_text(b / manifest_name, replace(read_text(b / manifest_name), "wuerstchen-bundle", "other")); },
       "format is not \"wuerstchen-bundle\""},
      {"missing", [&](const fs::path& b) { fs::remove(b / "decoder_step.onnx"); }, "decoder_step.onnx is missing"},
      {"altered", [&](const fs::path& b) { std::ofstream(b / "prior_text.onnx", std::ios::app) << "!"; }, "prior_text.onnx was altered"},
      {"altered_tokenizer", [&](const fs::path& b) { std::ofstream(b / "tokenizer_prior/tokenizer.json", std::ios::app) << " "; },
       "tokenizer.json was altered"},
      {"unlisted", [&](const fs::path& b) {
         fs::copy_file(b / "vqgan_decode.onnx", b / "extra.onnx");
         write_text(b / manifest_name, replace(read_text(b / manifest_name), "\"file\": \"vqgan_decode.onnx\"", "\"file\": \"extra.onnx\""));
       },
       "graph vqgan_decode file \"extra.onnx\" is not listed in files"},
      {"dotdot", [&](const fs::path& b) { write_text(b / manifest_name, replace(read_text(b / manifest_name), "\"files\": {", "\"files\": {\"../x\": \"00\",")); },
       "leaves the bundle"},
      {"absolute", [&](const fs::path& b) { write_text(b / manifest_name, replace(read_text(b / manifest_name), "\"files\": {", "\"files\": {\"/etc/passwd\": \"00\",")); },
       "is not a path relative to the bundle"},
      {"symlink", [&](const fs::path& b) { fs::remove(b / "prior_step.onnx"); fs::create_symlink(fs::path(bundle_folder()) / "prior_step.onnx", b / "prior_step.onnx"); },
       "lies outside the bundle"},
      {"json", [&](const fs::path& b) { write_text(b / manifest_name, read_text(b / manifest_name).substr(0, 100)); }, "is not valid JSON"},
      {"no_manifest", [&](const fs::path& b) { fs::remove(b / manifest_name); }, "no manifest.json"},
      {"wrong_type", [&](const fs::path& b) { write_text(b / manifest_name, replace(read_text(b / manifest_name), "\"max\": 512", "\"max\": \"big\"")); },
       "manifest.sizes.max is \"big\", expected an integer"},
      {"no_graph", [&](const fs::path& b) { write_text(b / manifest_name, replace(read_text(b / manifest_name), "\"prior_condition\": {", "\"prior_conditions\": {")); },
       "graph prior_condition is missing"},
      {"dtype", [&](const fs::path& b) { write_text(b / manifest_name, replace(read_text(b / manifest_name), "\"dtype\": \"float32\"", "\"dtype\": \"float16\"")); },
       "the C++ engine runs float32 bundles"},
  };
  for (const Case& c : cases) {
    const fs::path copy = copy_bundle(c.name);
    c.mutate(copy);
    check_contains(creation_error(copy), c.expected);
    fs::remove_all(copy);
  }
}

TEST_MAIN()
