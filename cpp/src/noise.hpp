// Standard normal noise drawn exactly as torch.randn draws it from a CPU torch.Generator, so that a seed
// gives the same latents in C++ as in Python.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <random>

#include "torch_cpu.hpp"

namespace wuerstchen {

// A CPU torch.Generator after manual_seed(seed): a Mersenne Twister seeded with the seed's low 32 bits.
class TorchGenerator {
 public:
  // `cpu` picks the normal kernel: the default build calls the C library's logf, sinf and cosf; the AVX2
  // and AVX-512 builds both use a vectorised Cephes polynomial (compiled with fused multiply-adds).
  explicit TorchGenerator(uint64_t seed, TorchCpu cpu = detect_torch_cpu());

  // torch.randn(shape, generator=g, dtype=torch.float32) for a contiguous tensor of `count` elements.
  void randn(float* out, size_t count);

 private:
  float uniform_float();    // [0, 1) from 24 random bits
  double uniform_double();  // [0, 1) from 53 random bits of two draws
  double normal_double();   // Box-Muller in double, caching the second value as torch does
  void normal_fill_16(float* data) const;

  std::mt19937 engine_;  // std::mt19937's seeding and output are torch's at::mt19937's
  bool polynomial_;  // the AVX2/AVX-512 kernel
  std::optional<double> next_double_normal_;
};

}  // namespace wuerstchen
