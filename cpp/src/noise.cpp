#include "noise.hpp"

#include <cmath>
#include <cstring>

namespace wuerstchen {
namespace {

constexpr double kPi = 3.14159265358979323846;

uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// The natural logarithm as torch's AVX2 normal kernel computes it (Cephes' logf polynomial), one lane
// at a time: every operation below is one IEEE single-precision operation of the vector code, in its
// order, so the result is bit-equal. Defined for the kernel's arguments, (0, 1].
float polynomial_log(float x) {
  x = std::fmax(x, bits_float(0x00800000));  // no denormals
  int32_t exponent = static_cast<int32_t>(float_bits(x) >> 23) - 0x7f;
  x = bits_float((float_bits(x) & ~0x7f800000u) | float_bits(0.5f));  // mantissa in [0.5, 1)
  float e = static_cast<float>(exponent) + 1.0f;
  const bool below_sqrt_half = x < 0.707106781186547524f;
  const float tmp = below_sqrt_half ? x : 0.0f;
  x = x - 1.0f;
  e = e - (below_sqrt_half ? 1.0f : 0.0f);
  x = x + tmp;
  const float z = x * x;
  const float coefficients[] = {7.0376836292E-2f,  -1.1514610310E-1f, 1.1676998740E-1f,
                                -1.2420140846E-1f, +1.4249322787E-1f, -1.6668057665E-1f,
                                +2.0000714765E-1f, -2.4999993993E-1f, +3.3333331174E-1f};
  float y = coefficients[0];
  for (int i = 1; i < 9; ++i) y = std::fma(y, x, coefficients[i]);
  y = y * x;
  y = std::fma(y, z, e * -2.12194440e-4f);
  y = std::fma(-z, 0.5f, y);
  x = std::fma(e, 0.693359375f, x + y);
  return x;
}

// Sine and cosine as torch's AVX2 normal kernel computes them together (Cephes' sinf/cosf with a
// three-part reduction by π/4), one lane at a time; bit-equal for the kernel's arguments, [0, 2π).
void polynomial_sincos(float x, float* sine, float* cosine) {
  uint32_t sign_sin = float_bits(x) & 0x80000000u;
  x = std::fabs(x);
  int32_t j = static_cast<int32_t>(x * 1.27323954473516f);  // truncation, as cvttps
  j = (j + 1) & ~1;
  const float y_octant = static_cast<float>(j);
  const uint32_t swap_sin = static_cast<uint32_t>(j & 4) << 29;
  const bool first_polynomial_for_sin = (j & 2) == 0;
  x = std::fma(y_octant, -0.78515625f, x);
  x = std::fma(y_octant, -2.4187564849853515625e-4f, x);
  x = std::fma(y_octant, -3.77489497744594108e-8f, x);
  const uint32_t sign_cos = static_cast<uint32_t>(~(j - 2) & 4) << 29;
  sign_sin ^= swap_sin;

  const float z = x * x;
  float y = 2.443315711809948E-005f;  // the cosine polynomial on [0, π/4]
  y = std::fma(y, z, -1.388731625493765E-003f);
  y = std::fma(y, z, 4.166664568298827E-002f);
  y = y * z;
  y = std::fma(y, z, -(z * 0.5f));
  y = y + 1.0f;
  float y2 = -1.9515295891E-4f;  // the sine polynomial on [0, π/4]
  y2 = std::fma(y2, z, 8.3321608736E-3f);
  y2 = std::fma(y2, z, -1.6666654611E-1f);
  y2 = y2 * z;
  y2 = std::fma(y2, x, x);

  // The vector code selects with masks and adds, which turns a -0 into +0: keep the same arithmetic.
  const float sin_from_sine = first_polynomial_for_sin ? y2 : 0.0f;
  const float sin_from_cosine = first_polynomial_for_sin ? 0.0f : y;
  y2 = y2 - sin_from_sine;
  y = y - sin_from_cosine;
  *sine = bits_float(float_bits(sin_from_cosine + sin_from_sine) ^ sign_sin);
  *cosine = bits_float(float_bits(y + y2) ^ sign_cos);
}

}  // namespace

TorchGenerator::TorchGenerator(uint64_t seed, TorchCpu cpu)
    : engine_(static_cast<uint32_t>(seed & 0xffffffffu)), polynomial_(cpu != TorchCpu::Default) {}

float TorchGenerator::uniform_float() {
  // 24 bits, the float's digits, scaled by 2^-24: exact, in [0, 1).
  return static_cast<float>(engine_() & ((1u << 24) - 1)) * (1.0f / (1u << 24));
}

double TorchGenerator::uniform_double() {
  const uint64_t high = engine_();
  const uint64_t low = engine_();
  const uint64_t bits = ((high << 32) | low) & ((uint64_t{1} << 53) - 1);
  return static_cast<double>(bits) * (1.0 / static_cast<double>(uint64_t{1} << 53));
}

double TorchGenerator::normal_double() {
  if (next_double_normal_) {
    const double cached = *next_double_normal_;
    next_double_normal_.reset();
    return cached;
  }
  const double u1 = uniform_double();
  const double u2 = uniform_double();
  const double radius = std::sqrt(-2.0 * std::log1p(-u2));
  const double theta = 2.0 * kPi * u1;
  next_double_normal_ = radius * std::sin(theta);
  return radius * std::cos(theta);
}

void TorchGenerator::normal_fill_16(float* data) const {
  // Box-Muller on 16 uniforms: the first 8 give the radii, the last 8 the angles.
  for (int j = 0; j < 8; ++j) {
    const float u1 = 1.0f - data[j];  // (0, 1], for the logarithm
    const float u2 = data[j + 8];
    if (polynomial_) {
      const float radius = std::sqrt(-2.0f * polynomial_log(u1));
      const float theta = static_cast<float>(2.0 * kPi) * u2;
      float sine, cosine;
      polynomial_sincos(theta, &sine, &cosine);
      data[j] = std::fma(radius * cosine, 1.0f, 0.0f);  // the kernel's fmadd with std 1 and mean 0
      data[j + 8] = std::fma(radius * sine, 1.0f, 0.0f);
    } else {
      const float radius = std::sqrt(-2.0f * std::log(u1));
      const float theta = static_cast<float>(2.0 * kPi * static_cast<double>(u2));  // rounded once, from double
      data[j] = radius * std::cos(theta) * 1.0f + 0.0f;
      data[j + 8] = radius * std::sin(theta) * 1.0f + 0.0f;
    }
  }
}

void TorchGenerator::randn(float* out, size_t count) {
  if (count < 16) {
    // Small tensors take torch's element-by-element path: double Box-Muller, each pair's second value cached.
    for (size_t i = 0; i < count; ++i) out[i] = static_cast<float>(normal_double());
    return;
  }
  for (size_t i = 0; i < count; ++i) out[i] = uniform_float();
  for (size_t i = 0; i + 16 <= count; i += 16) normal_fill_16(out + i);
  if (count % 16 != 0) {
    // torch redraws the last 16 values and transforms them again, overlapping the last full block.
    float* tail = out + count - 16;
    for (int i = 0; i < 16; ++i) tail[i] = uniform_float();
    normal_fill_16(tail);
  }
}

}  // namespace wuerstchen
