#include "schedule.hpp"

#include <algorithm>
#include <cmath>

namespace wuerstchen {
namespace {

constexpr float kPi = static_cast<float>(3.14159265358979323846);  // torch.pi, as a float32 operand

// cos in float32, rounded once from double: equal to torch's float cos on the schedule's arguments.
float cos_float(float x) { return static_cast<float>(std::cos(static_cast<double>(x))); }

}  // namespace

std::vector<float> linear_timesteps(int steps, TorchCpu cpu) {
  // torch's linspace kernel computes the first half forwards from the start and the second half
  // backwards from the end, each as one multiply-add (fused in torch's AVX builds).
  const int64_t points = steps + 1;
  const float start = 1.0f, end = 0.0f;
  const float step = (end - start) / static_cast<float>(points - 1);
  const int64_t halfway = points / 2;
  const bool fused = fuses_multiply_add(cpu);
  std::vector<float> grid(points);
  for (int64_t i = 0; i < points; ++i) {
    if (i < halfway) {
      const float k = static_cast<float>(i);
      grid[i] = fused ? std::fma(step, k, start) : start + step * k;
    } else {
      const float k = static_cast<float>(points - i - 1);
      grid[i] = fused ? std::fma(-step, k, end) : end - step * k;
    }
  }
  return grid;
}

std::vector<float> custom_timesteps(const std::vector<double>& timesteps) {
  std::vector<float> grid;
  for (double t : timesteps) grid.push_back(static_cast<float>(t));
  return grid;
}

float alpha_cumprod(float t, const CosineSchedule& config) {
  const float s = static_cast<float>(config.s);
  const float scaler = static_cast<float>(config.scaler);
  const float one_plus_s = 1.0f + s;
  const float initial_angle = s / one_plus_s * kPi * 0.5f;
  const float initial = cos_float(initial_angle) * cos_float(initial_angle);
  if (scaler > 1.0f) {
    t = 1.0f - std::pow(1.0f - t, scaler);
  } else if (scaler < 1.0f) {
    t = std::pow(t, scaler);
  }
  const float angle = (t + s) / one_plus_s * kPi * 0.5f;
  const float c = cos_float(angle);
  return std::clamp(c * c / initial, 0.0001f, 0.9999f);
}

DenoisingSchedule make_schedule(const std::vector<float>& grid, const CosineSchedule& config) {
  DenoisingSchedule schedule;
  for (size_t i = 0; i + 1 < grid.size(); ++i) {
    const float t = grid[i], t_next = grid[i + 1];
    const float acp = alpha_cumprod(t, config);  // at the level the model sees (float32 bundles: t itself)
    const float acp_next = alpha_cumprod(t_next, config);
    const float alpha = acp / acp_next;
    const float noise_scale = t_next != 0.0f ? std::sqrt((1.0f - alpha) * (1.0f - acp_next) / (1.0f - acp)) : 0.0f;
    schedule.ratios.push_back(t);
    schedule.coefficients.push_back({std::sqrt(1.0f / alpha), 1.0f - alpha, std::sqrt(1.0f - acp), noise_scale});
  }
  return schedule;
}

}  // namespace wuerstchen
