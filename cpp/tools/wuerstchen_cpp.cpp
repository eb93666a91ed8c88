// wuerstchen-cpp: the sample program. One image from a bundle, through the C++ wrapper over the C API.
//
//   wuerstchen-cpp PROMPT --bundle DIR --out FILE.png [--height 1024] [--width 1024] [--seed 0]
//       [--prior-steps N] [--decoder-steps 12] [--guidance 4] [--decoder-guidance 0] [--negative-prompt TEXT]
//       [--threads 0] [--provider cpu|cuda|tensorrt] [--device-id 0]
//
// The same flags as `wuerstchen generate --bundle` give the same picture. Errors: one line on stderr, exit 2.
#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "png.hpp"
#include "wuerstchen/wuerstchen.hpp"

namespace {

const char* const kUsage =
    "usage: wuerstchen-cpp PROMPT --bundle DIR --out FILE.png [--height 1024] [--width 1024] [--seed 0] "
    "[--prior-steps N] [--decoder-steps 12] [--guidance 4] [--decoder-guidance 0] [--negative-prompt TEXT] "
    "[--threads 0] [--provider cpu|cuda|tensorrt] [--device-id 0]";

template <typename T>
T parse_number(const std::string& flag, const std::string& text) {
  T value{};
  const char* end = text.data() + text.size();
  const auto [stop, error] = std::from_chars(text.data(), end, value);
  if (text.empty() || error != std::errc() || stop != end) {
    throw std::invalid_argument(flag + "=" + text + ": expected " + (std::is_floating_point_v<T> ? "a number" : "an integer"));
  }
  return value;
}

float parse_float(const std::string& flag, const std::string& text) {
  // from_chars for floats needs GCC 11+; strtof with a full-string check works everywhere.
  char* stop = nullptr;
  const float value = std::strtof(text.c_str(), &stop);
  if (text.empty() || stop != text.c_str() + text.size()) throw std::invalid_argument(flag + "=" + text + ": expected a number");
  return value;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::vector<std::string> positional;
    std::map<std::string, std::string> flags;
    const std::vector<std::string> known = {"--bundle", "--out", "--height", "--width", "--seed", "--prior-steps", "--decoder-steps",
                                            "--guidance", "--decoder-guidance", "--negative-prompt", "--threads", "--provider",
                                            "--device-id"};
    for (int i = 1; i < argc; ++i) {
      std::string arg = argv[i];
      if (arg == "-h" || arg == "--help") {
        std::puts(kUsage);
        return 0;
      }
      if (arg.rfind("--", 0) != 0) {
        positional.push_back(arg);
        continue;
      }
      std::string value;
      const size_t equals = arg.find('=');
      if (equals != std::string::npos) {
        value = arg.substr(equals + 1);
        arg = arg.substr(0, equals);
      } else if (i + 1 < argc) {
        value = argv[++i];
      } else {
        throw std::invalid_argument(arg + ": expected a value");
      }
      if (std::find(known.begin(), known.end(), arg) == known.end()) throw std::invalid_argument(arg + ": unknown flag; " + kUsage);
      flags[arg] = value;
    }
    if (positional.size() != 1) throw std::invalid_argument("expected one PROMPT, got " + std::to_string(positional.size()) + "; " + kUsage);
    for (const char* required : {"--bundle", "--out"}) {
      if (!flags.count(required)) throw std::invalid_argument(std::string(required) + " is missing; " + kUsage);
    }
    auto flag = [&](const char* name, const char* fallback) { return flags.count(name) ? flags[name] : std::string(fallback); };

    wuerstchen::Options options;
    options.provider = flag("--provider", "cpu");
    options.device_id = parse_number<int>("--device-id", flag("--device-id", "0"));
    options.threads = parse_number<int>("--threads", flag("--threads", "0"));
    wuerstchen::GenerateRequest request;
    request.prompt = positional[0];
    request.negative_prompt = flag("--negative-prompt", "");
    request.height = parse_number<int>("--height", flag("--height", "1024"));
    request.width = parse_number<int>("--width", flag("--width", "1024"));
    request.seed = parse_number<uint64_t>("--seed", flag("--seed", "0"));
    request.prior_steps = parse_number<int>("--prior-steps", flag("--prior-steps", "0"));
    request.decoder_steps = parse_number<int>("--decoder-steps", flag("--decoder-steps", "12"));
    request.prior_guidance = parse_float("--guidance", flag("--guidance", "4"));
    request.decoder_guidance = parse_float("--decoder-guidance", flag("--decoder-guidance", "0"));
    for (auto [name, value] : {std::pair{"--height", request.height}, std::pair{"--width", request.width},
                               std::pair{"--decoder-steps", request.decoder_steps}}) {
      if (value <= 0) throw std::invalid_argument(std::string(name) + "=" + std::to_string(value) + ": expected a positive integer");
    }
    if (flags.count("--prior-steps") && request.prior_steps <= 0) {
      throw std::invalid_argument("--prior-steps=" + flags["--prior-steps"] + ": expected a positive integer");
    }
    for (auto [name, value] : {std::pair{"--guidance", request.prior_guidance}, std::pair{"--decoder-guidance", request.decoder_guidance}}) {
      if (value < 0) throw std::invalid_argument(std::string(name) + "=" + flags[name] + ": expected 0 or more");
    }

    wuerstchen::Pipeline pipeline(flag("--bundle", ""), options);
    const std::vector<uint8_t> rgb = pipeline.generate(request);
    wuerstchen::write_png(flag("--out", ""), rgb.data(), request.width, request.height);
    std::printf("wrote %s (%dx%d, seed %llu)\n", flag("--out", "").c_str(), request.width, request.height,
                static_cast<unsigned long long>(request.seed));
    return 0;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "error: %s\n", error.what());
    return 2;
  }
}
