// Runtime ISA dispatch: kernels are compiled for a portable baseline and, on x86-64, again for AVX2+FMA and
// AVX-512 through function target attributes; the widest one the running CPU supports is picked at call time.
// PYPRUNE_ISA=baseline|avx2|avx512 caps the choice (for testing every path on one machine).
#pragma once
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PYPRUNE_X86 1
#define PYPRUNE_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define PYPRUNE_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#else
#define PYPRUNE_X86 0
#define PYPRUNE_TARGET_AVX2
#define PYPRUNE_TARGET_AVX512
#endif

#define PYPRUNE_INLINE inline __attribute__((always_inline))

namespace pyprune {

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

struct CpuFeatures {
  bool avx2 = false;
  bool avx512 = false;
};

inline CpuFeatures detect_cpu_features() {
  CpuFeatures f;
#if PYPRUNE_X86
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  f.avx512 = f.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#endif
  return f;
}

inline Isa kernel_isa() {
  static const Isa isa = [] {
    const CpuFeatures f = detect_cpu_features();
    Isa best = f.avx512 ? Isa::kAvx512 : (f.avx2 ? Isa::kAvx2 : Isa::kBaseline);
    if (const char* cap = std::getenv("PYPRUNE_ISA")) {
      Isa want = best;
      if (!std::strcmp(cap, "baseline")) want = Isa::kBaseline;
      else if (!std::strcmp(cap, "avx2")) want = Isa::kAvx2;
      if (static_cast<int>(want) < static_cast<int>(best)) best = want;
    }
    return best;
  }();
  return isa;
}

inline const char* kernel_isa_name() {
  switch (kernel_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace pyprune
