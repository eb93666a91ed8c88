#include "torch_cpu.hpp"

#include <cstdlib>
#include <string>

namespace wuerstchen {

TorchCpu detect_torch_cpu() {
  if (const char* forced = std::getenv("ATEN_CPU_CAPABILITY")) {
    const std::string value = forced;
    if (value == "default") return TorchCpu::Default;
    if (value == "avx2") return TorchCpu::Avx2;
    if (value == "avx512") return TorchCpu::Avx512;
  }
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool fma = __builtin_cpu_supports("fma");
  if (fma && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq")) {
    return TorchCpu::Avx512;
  }
  if (fma && __builtin_cpu_supports("avx2")) return TorchCpu::Avx2;
#endif
  return TorchCpu::Default;
}

const char* torch_cpu_name(TorchCpu cpu) {
  switch (cpu) {
    case TorchCpu::Default: return "default";
    case TorchCpu::Avx2: return "avx2";
    case TorchCpu::Avx512: return "avx512";
  }
  return "default";
}

}  // namespace wuerstchen
