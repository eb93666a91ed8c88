// The DDPM-Würstchen sampler as the bundle's manifest states it (schedule.step, schedule.alpha_cumprod),
// computed with the float32 operations of the Python engine's engine/schedule.py.
#pragma once

#include <array>
#include <vector>

#include "torch_cpu.hpp"

namespace wuerstchen {

struct CosineSchedule {
  double s = 0.008;     // the cosine schedule's offset
  double scaler = 1.0;  // t ↦ 1 − (1 − t)^scaler above 1, t^scaler below 1
};

// torch.linspace(1, 0, steps + 1) in float32: `steps` evaluations from 1 down to 0.
std::vector<float> linear_timesteps(int steps, TorchCpu cpu = detect_torch_cpu());

// A custom list of noise levels (the manifest's default_prior_timesteps) as float32.
std::vector<float> custom_timesteps(const std::vector<double>& timesteps);

// Everything a step needs. `ratios[i]` is the noise level the model sees at step i; `coefficients[i]`
// holds √(1/α), 1 − α, √(1 − ᾱ(t)) and the noise scale √((1 − α)(1 − ᾱ(t_next))/(1 − ᾱ(t))), zero when
// t_next = 0, with α = ᾱ(t)/ᾱ(t_next).
struct DenoisingSchedule {
  std::vector<float> ratios;
  std::vector<std::array<float, 4>> coefficients;
  int steps() const { return static_cast<int>(ratios.size()); }
};

// The schedule over a grid of noise levels (model evaluations at all but the last); fp32 bundles only.
DenoisingSchedule make_schedule(const std::vector<float>& grid, const CosineSchedule& config);

// ᾱ(t) of the cosine schedule, clamped to [1e-4, 0.9999], as engine/schedule.py alpha_cumprod computes it.
float alpha_cumprod(float t, const CosineSchedule& config);

}  // namespace wuerstchen
