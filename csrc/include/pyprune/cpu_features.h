// Runtime ISA dispatch: kernels are compiled for a portable baseline and, on x86-64, again for AVX2+FMA and
// AVX-512 through function target attributes; the widest one the running CPU supports is picked at call time.
// PYPRUNE_ISA=baseline|avx2|avx512 caps the choice (for testing every path on one machine).
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

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

// NAME's entry point (NAME_baseline / _avx2 / _avx512, defined by the including file) for the ISA the kernels
// run on (kernel_isa()).
#if PYPRUNE_X86
#define PYPRUNE_ISA_ENTRY(NAME)                                                                             \
  (kernel_isa() == Isa::kAvx512 ? NAME##_avx512 : kernel_isa() == Isa::kAvx2 ? NAME##_avx2 : NAME##_baseline)
#else
#define PYPRUNE_ISA_ENTRY(NAME) NAME##_baseline
#endif

// Bytes of cpu0's cache at `level` (1, 2, 3; 0: the highest level it reports, the last-level cache), read from
// Linux's sysfs; 0 where it is unknown. (glibc's sysconf(_SC_LEVEL3_CACHE_SIZE) said 320 MiB on a Zen 4 VM whose
// sysfs and lscpu say 32 MiB.)
inline int64_t cache_bytes(int64_t level) {
  int64_t top = 0, size = 0;
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream level_file(dir + "level"), size_file(dir + "size"), type_file(dir + "type");
    int64_t lv = 0, value = 0;
    char unit = 0;
    std::string type;
    if (!(level_file >> lv) || !(size_file >> value) || value <= 0) continue;
    if ((type_file >> type) && type == "Instruction") continue;
    size_file >> unit;  // "32768K": a K, M or G suffix, if any
    const int64_t scale = unit == 'K' ? 1 << 10 : unit == 'M' ? 1 << 20 : unit == 'G' ? 1 << 30 : 1;
    if (level ? lv == level : lv > top) {
      top = lv;
      size = value * scale;
    }
  }
  return size;
}

inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = cache_bytes(0);
  return bytes;
}

inline int64_t l2_cache_bytes() {
  static const int64_t bytes = cache_bytes(2);
  return bytes;
}

inline const char* kernel_isa_name() {
  switch (kernel_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace pyprune
