#include "sampler.hpp"

#include <cmath>

namespace wuerstchen {

void guide(float* eps_prompt, const float* eps_negative, size_t count, float scale, TorchCpu cpu) {
  // torch's lerp: start + w·(end − start) for |w| < 0.5, else end + (w − 1)·(end − start), one multiply-add
  // (fused in torch's AVX builds). Guidance runs at scales above 1, but both branches are kept exact.
  const bool fused = fuses_multiply_add(cpu);
  const bool small = std::fabs(scale) < 0.5f;
  const float coefficient = small ? scale : scale - 1.0f;
  for (size_t i = 0; i < count; ++i) {
    const float start = eps_negative[i], end = eps_prompt[i];
    const float difference = end - start;
    const float base = small ? start : end;
    eps_prompt[i] = fused ? std::fma(coefficient, difference, base) : coefficient * difference + base;
  }
}

void sampler_step(float* x, const float* eps, const float* noise, size_t count, const std::array<float, 4>& coefficients) {
  const auto [sqrt_recip_alpha, one_minus_alpha, sqrt_one_minus_acp, noise_scale] = coefficients;
  for (size_t i = 0; i < count; ++i) {
    const float scaled_eps = one_minus_alpha * eps[i] / sqrt_one_minus_acp;
    const float mean = sqrt_recip_alpha * (x[i] - scaled_eps);
    x[i] = mean + noise_scale * noise[i];
  }
}

}  // namespace wuerstchen
