#include "resize.hpp"

#include <algorithm>
#include <cmath>

namespace wuerstchen {
namespace {

// a·b + c rounded once where torch's build fuses it, twice where it does not.
inline float multiply_add(float a, float b, float c, bool fused) { return fused ? std::fma(a, b, c) : a * b + c; }

// Keys' cubic convolution kernel with a = −0.5 (PIL's choice, which torch follows with antialias=True).
float cubic_filter(float x, bool fused) {
  constexpr float a = -0.5f;
  x = std::fabs(x);
  if (x < 1.0f) {  // ((a + 2)·x − (a + 3))·x·x + 1
    const float t = multiply_add(a + 2.0f, x, -(a + 3.0f), fused);
    return multiply_add(t * x, x, 1.0f, fused);
  }
  if (x < 2.0f) {  // ((a·x − 5a)·x + 8a)·x − 4a
    float t = multiply_add(a, x, -5.0f * a, fused);
    t = multiply_add(t, x, 8.0f * a, fused);
    return multiply_add(t, x, -4.0f * a, fused);
  }
  return 0.0f;
}

// For each output index along one axis: the first input index, how many inputs it reads, and their
// weights (normalised to sum to one), as torch's antialiased kernels compute them.
struct AxisWeights {
  int64_t taps = 0;  // weights per output index, the widest window
  std::vector<int64_t> first, count;
  std::vector<float> weights;  // taps per output index
};

AxisWeights axis_weights(int64_t in_size, int64_t out_size, bool fused) {
  // align_corners=True: the scale maps the corner samples onto each other.
  const float scale = out_size > 1 ? static_cast<float>(in_size - 1) / static_cast<float>(out_size - 1) : 0.0f;
  const float support = scale >= 1.0f ? 2.0f * scale : 2.0f;  // the kernel's half-width, widened when shrinking
  const float inverse_scale = scale >= 1.0f ? static_cast<float>(1.0 / scale) : 1.0f;
  AxisWeights axis;
  axis.taps = static_cast<int64_t>(std::ceil(support)) * 2 + 1;
  axis.first.resize(out_size);
  axis.count.resize(out_size);
  axis.weights.assign(out_size * axis.taps, 0.0f);
  for (int64_t i = 0; i < out_size; ++i) {
    // torch centres windows at (i + 0.5)·scale for any align_corners (its antialiased kernels do so).
    const float center = static_cast<float>(scale * (static_cast<double>(i) + 0.5));
    const int64_t first = std::max<int64_t>(static_cast<int64_t>((center - support) + 0.5), 0);
    int64_t count = std::min<int64_t>(static_cast<int64_t>((center + support) + 0.5), in_size) - first;
    count = std::clamp<int64_t>(count, 0, axis.taps);
    float* w = &axis.weights[i * axis.taps];
    float total = 0.0f;
    for (int64_t j = 0; j < count; ++j) {
      const float distance = static_cast<float>(j + first) - center;  // int64 → float, then float arithmetic
      w[j] = cubic_filter(static_cast<float>((distance + 0.5) * inverse_scale), fused);
      total += w[j];
    }
    if (total != 0.0f) {
      for (int64_t j = 0; j < count; ++j) w[j] /= total;
    }
    axis.first[i] = first;
    axis.count[i] = count;
  }
  return axis;
}

// One pass along an axis: `lines` independent lines; element k of a line sits at `k * step`, and lines
// start `line_stride` apart in both input and output (which differ only along the resized axis).
void resize_axis(const float* in, float* out, const AxisWeights& axis, int64_t out_size, int64_t outer,
                 int64_t in_outer_stride, int64_t out_outer_stride, int64_t inner, int64_t step, bool fused) {
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t i = 0; i < out_size; ++i) {
      const float* w = &axis.weights[i * axis.taps];
      for (int64_t k = 0; k < inner; ++k) {
        const float* src = in + o * in_outer_stride + axis.first[i] * step + k;
        float sum = src[0] * w[0];
        for (int64_t j = 1; j < axis.count[i]; ++j) sum = multiply_add(src[j * step], w[j], sum, fused);
        out[o * out_outer_stride + i * step + k] = sum;
      }
    }
  }
}

}  // namespace

std::vector<float> resize_bicubic_antialiased(const float* input, int64_t planes, int64_t in_h, int64_t in_w,
                                              int64_t out_h, int64_t out_w, TorchCpu cpu) {
  const bool fused = fuses_multiply_add(cpu);
  std::vector<float> current(input, input + planes * in_h * in_w);
  int64_t width = in_w;
  if (out_w != in_w) {  // widths first (the contiguous axis), as torch does
    const AxisWeights axis = axis_weights(in_w, out_w, fused);
    std::vector<float> next(planes * in_h * out_w);
    resize_axis(current.data(), next.data(), axis, out_w, planes * in_h, in_w, out_w, 1, 1, fused);
    current.swap(next);
    width = out_w;
  }
  if (out_h != in_h) {
    const AxisWeights axis = axis_weights(in_h, out_h, fused);
    std::vector<float> next(planes * out_h * width);
    resize_axis(current.data(), next.data(), axis, out_h, planes, in_h * width, out_h * width, width, width, fused);
    current.swap(next);
  }
  return current;
}

}  // namespace wuerstchen
