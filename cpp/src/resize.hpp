// The decoder's image-embedding pyramid: torch's antialiased bicubic resize, reproduced bit for bit.
#pragma once

#include <cstdint>
#include <vector>

#include "torch_cpu.hpp"

namespace wuerstchen {

// F.interpolate(x, size=(out_h, out_w), mode="bicubic", antialias=True, align_corners=True) for float32
// NCHW input of `planes` = N·C planes of in_h × in_w: torch's separable kernel (widths first, then
// heights; Keys a = −0.5 widened by the scale when shrinking; weights normalised per output pixel),
// with the same float32 arithmetic. `cpu` says whether torch's build fuses multiply-adds. Inputs or outputs
// one pixel wide are not reproduced (torch treats them specially); the pipeline's levels are at least 2 wide.
std::vector<float> resize_bicubic_antialiased(const float* input, int64_t planes, int64_t in_h, int64_t in_w,
                                              int64_t out_h, int64_t out_w, TorchCpu cpu = detect_torch_cpu());

}  // namespace wuerstchen
