// One denoising step's arithmetic outside the graphs: classifier-free guidance and the sampler update,
// element by element with the float32 operations torch performs for engine/denoise.py.
#pragma once

#include <array>
#include <cstddef>

#include "torch_cpu.hpp"

namespace wuerstchen {

// eps = torch.lerp(eps_negative, eps_prompt, scale), in place in `eps_prompt`.
void guide(float* eps_prompt, const float* eps_negative, size_t count, float scale, TorchCpu cpu = detect_torch_cpu());

// x ← √(1/α)·(x − (1 − α)·eps/√(1 − ᾱ)) + noise_scale·noise, in place; `coefficients` is one row of the
// schedule. Each operation is rounded to float32, as torch's separate tensor operations are.
void sampler_step(float* x, const float* eps, const float* noise, size_t count, const std::array<float, 4>& coefficients);

}  // namespace wuerstchen
