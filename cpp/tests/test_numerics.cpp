// The arithmetic C++ does outside the graphs, bit for bit against torch's CPU kernels: the seeded noise,
// the pyramid resize, guidance with the sampler step, and the schedules, for each torch CPU build
// (default, AVX2, AVX-512) that the fixture script could run on this machine.
#include <cmath>
#include <cstring>

#include "check.hpp"
#include "noise.hpp"
#include "resize.hpp"
#include "sampler.hpp"
#include "schedule.hpp"

using namespace wuerstchen;

namespace {

TorchCpu build_of(const nlohmann::json& numerics) {
  const std::string name = numerics.at("build");
  return name == "avx2" ? TorchCpu::Avx2 : name == "avx512" ? TorchCpu::Avx512 : TorchCpu::Default;
}

// Elements whose bits differ, and the largest absolute difference.
struct Difference {
  size_t mismatched = 0;
  double largest = 0;
  std::string text() const { return std::to_string(mismatched) + " elements differ, by up to " + std::to_string(largest); }
};

Difference compare(const float* a, const std::vector<float>& b) {
  Difference d;
  for (size_t i = 0; i < b.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) {
      ++d.mismatched;
      d.largest = std::max(d.largest, std::fabs(static_cast<double>(a[i]) - b[i]));
    }
  }
  return d;
}

// Units in the last place between two finite floats of the same sign.
int64_t ulp_distance(float a, float b) {
  int32_t ia, ib;
  std::memcpy(&ia, &a, sizeof ia);
  std::memcpy(&ib, &b, sizeof ib);
  return std::llabs(static_cast<int64_t>(ia) - ib);
}

}  // namespace

TEST("noise: torch.randn from a seeded CPU generator, every build, bit-equal") {
  size_t total = 0;
  for (const auto& numerics : test::fixtures().at("numerics")) {
    for (const auto& draw : numerics.at("noise")) {
      const std::vector<float> expected = test::load_array<float>(draw.at("values"));
      TorchGenerator generator(draw.at("seed").get<uint64_t>(), build_of(numerics));
      std::vector<float> drawn;
      for (size_t count : draw.at("counts").get<std::vector<size_t>>()) {
        std::vector<float> values(count);
        generator.randn(values.data(), count);
        drawn.insert(drawn.end(), values.begin(), values.end());
      }
      CHECK_EQ(drawn.size(), expected.size());
      const Difference d = compare(drawn.data(), expected);
      CHECK_MSG(d.mismatched == 0, numerics.at("build").get<std::string>() + " seed " + draw.at("seed").dump() + ": " + d.text());
      total += drawn.size();
    }
  }
  std::printf("       %zu normals equal\n", total);
}

// Bit-equal to torch's default build. Its AVX2 and AVX-512 builds let the compiler fuse some of the
// resize's multiply-adds and not others (which ones is the compiler's choice, not the source's), so there
// C++ fuses the weighted sum and the filter's polynomial and is held to 1e-6 relative; the spread is printed.
TEST("resize: antialiased bicubic, align_corners: default build bit-equal, AVX builds within 1e-6") {
  for (const auto& numerics : test::fixtures().at("numerics")) {
    const bool exact = build_of(numerics) == TorchCpu::Default;
    size_t mismatched = 0, total = 0;
    double largest_relative = 0;
    for (const auto& resize : numerics.at("resize")) {
      const auto in_shape = resize.at("input").at("shape").get<std::vector<int64_t>>();
      const auto out_shape = resize.at("output").at("shape").get<std::vector<int64_t>>();
      const std::vector<float> input = test::load_array<float>(resize.at("input"));
      const std::vector<float> expected = test::load_array<float>(resize.at("output"));
      const std::vector<float> output = resize_bicubic_antialiased(input.data(), in_shape[0] * in_shape[1], in_shape[2],
                                                                   in_shape[3], out_shape[2], out_shape[3], build_of(numerics));
      const std::string label = numerics.at("build").get<std::string>() + " " + resize.at("input").at("shape").dump() +
                                " -> " + resize.at("output").at("shape").dump();
      const Difference d = compare(output.data(), expected);
      CHECK_MSG(!exact || d.mismatched == 0, label + ": " + d.text());
      double scale = 0;
      for (float v : expected) scale = std::max(scale, std::fabs(static_cast<double>(v)));
      CHECK_MSG(d.largest <= 1e-6 * scale, label + ": " + d.text());
      mismatched += d.mismatched;
      total += expected.size();
      largest_relative = std::max(largest_relative, d.largest / scale);
    }
    std::printf("       %s: %zu of %zu values differ, by at most %.2g of the largest\n",
                numerics.at("build").get<std::string>().c_str(), mismatched, total, largest_relative);
  }
}

TEST("guidance (torch.lerp) and the sampler step, every build, bit-equal") {
  for (const auto& numerics : test::fixtures().at("numerics")) {
    for (const auto& step : numerics.at("steps")) {
      std::vector<float> eps = test::load_array<float>(step.at("eps_prompt"));
      const std::vector<float> negative = test::load_array<float>(step.at("eps_negative"));
      guide(eps.data(), negative.data(), eps.size(), step.at("scale").get<float>(), build_of(numerics));
      const Difference guided = compare(eps.data(), test::load_array<float>(step.at("eps")));
      CHECK_MSG(guided.mismatched == 0, numerics.at("build").get<std::string>() + " lerp: " + guided.text());
      std::vector<float> x = test::load_array<float>(step.at("x"));
      const std::vector<float> noise = test::load_array<float>(step.at("noise"));
      const auto row = step.at("coefficients").get<std::vector<float>>();
      sampler_step(x.data(), eps.data(), noise.data(), x.size(), {row[0], row[1], row[2], row[3]});
      const Difference stepped = compare(x.data(), test::load_array<float>(step.at("stepped")));
      CHECK_MSG(stepped.mismatched == 0, numerics.at("build").get<std::string>() + " step: " + stepped.text());
    }
  }
}

// torch computes the schedule's square roots and cosines through MKL's vector math on small tensors, which
// is not always correctly rounded; C++ rounds correctly. The grids and the noise levels the model sees are
// bit-equal; a coefficient may differ by a few float32 roundings (1 − α near α ≈ 1 magnifies one rounding
// of α), so each is held to 1e-6 relative to max(|value|, 1); the largest differences are printed.
TEST("schedules: grids and noise levels bit-equal, coefficients within 1e-6, every build") {
  int64_t largest_ulps = 0;
  double largest_difference = 0;
  size_t mismatched = 0, total = 0;
  for (const auto& numerics : test::fixtures().at("numerics")) {
    for (const auto& entry : numerics.at("schedules")) {
      const std::vector<float> expected_grid = test::load_array<float>(entry.at("grid"));
      const std::string label = numerics.at("build").get<std::string>() + " " + entry.at("kind").get<std::string>() +
                                " " + entry.at("steps").dump() + " steps";
      std::vector<float> grid;
      if (entry.at("kind") == "linear") {
        grid = linear_timesteps(entry.at("steps").get<int>(), build_of(numerics));
        const Difference d = compare(grid.data(), expected_grid);
        CHECK_MSG(d.mismatched == 0, label + " grid: " + d.text());
      } else {
        grid = expected_grid;
      }
      const DenoisingSchedule schedule = make_schedule(grid, {entry.at("s").get<double>(), entry.at("scaler").get<double>()});
      const Difference ratios = compare(schedule.ratios.data(), test::load_array<float>(entry.at("ratios")));
      CHECK_MSG(ratios.mismatched == 0, label + " ratios: " + ratios.text());
      const std::vector<float> expected = test::load_array<float>(entry.at("coefficients"));
      for (size_t i = 0; i < expected.size(); ++i) {
        const int64_t ulps = ulp_distance(schedule.coefficients[i / 4][i % 4], expected[i]);
        const double difference = std::fabs(static_cast<double>(schedule.coefficients[i / 4][i % 4]) - expected[i]);
        largest_ulps = std::max(largest_ulps, ulps);
        largest_difference = std::max(largest_difference, difference);
        mismatched += ulps != 0;
        ++total;
        CHECK_MSG(difference <= 1e-6 * std::max(1.0, std::fabs(static_cast<double>(expected[i]))),
                  label + " coefficient " + std::to_string(i) + ": " + std::to_string(ulps) + " ulp apart");
      }
    }
  }
  std::printf("       coefficients: %zu of %zu differ, by at most %.3g (%lld ulp)\n", mismatched, total, largest_difference,
              static_cast<long long>(largest_ulps));
}

TEST_MAIN()
