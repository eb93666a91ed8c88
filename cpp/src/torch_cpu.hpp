// Which of PyTorch's CPU kernels this machine's torch runs, for the parts of the pipeline that C++ must
// reproduce bit for bit (the noise, the pyramid resize, guidance and the sampler).
#pragma once

namespace wuerstchen {

// torch compiles each CPU kernel once per instruction set and picks one build at start-up. The AVX2
// and AVX-512 builds are compiled with FMA, so the compiler fuses a multiply feeding an add into one
// rounding, and their normal sampler uses a vectorised polynomial log/sin/cos; the default build does
// neither. Results differ in the last bits, so C++ follows the build that torch would pick.
enum class TorchCpu { Default, Avx2, Avx512 };

// The build torch picks here: ATEN_CPU_CAPABILITY when set ("default", "avx2", "avx512"), else AVX-512
// (with VL, BW, DQ and FMA) or AVX2 (with FMA) as the CPU has them, else the default build.
TorchCpu detect_torch_cpu();

// Whether that build fuses multiply-adds (every build but the default one).
inline bool fuses_multiply_add(TorchCpu cpu) { return cpu != TorchCpu::Default; }

const char* torch_cpu_name(TorchCpu cpu);

}  // namespace wuerstchen
