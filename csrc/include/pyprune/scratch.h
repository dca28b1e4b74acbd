// Scratch memory for a kernel's temporaries (a restaged input, a per-thread band of planes), kept by the thread
// that asked for it for its next call instead of freed.
//
// Why: a temporary of a few MiB from at::empty comes back to glibc's heap, which returns it to the system once
// the free space at its top passes the trim threshold, and the next call's copy then faults on every 4 KiB page
// (a minor fault ~1 us on the Xeon VM, both threads faulting under the same lock): a 128->128 3x3 @28 batch 8
// conv on NCHW x, whose kept channels are restaged as channels_last, took ~1,100 faults a call.
//
// A slot holds one buffer per thread; a bigger request replaces it. A request over kScratchKeepBytes is
// allocated for the call alone. The memory is not cleared. A slot must not be asked for twice while its
// buffer is in use on the same thread (each caller owns its slot numbers).
#pragma once
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

namespace pyprune {

constexpr int64_t kScratchKeepBytes = int64_t(64) << 20;
constexpr int kScratchSlots = 3;
enum ScratchSlot : int { kScratchCall = 0, kScratchTile = 1, kScratchBand = 2 };

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using FloatBuffer = std::unique_ptr<float, FreeDeleter>;

inline FloatBuffer aligned_floats(int64_t n) {
  const size_t bytes = ((static_cast<size_t>(n > 0 ? n : 1) * sizeof(float)) + 63) / 64 * 64;
  float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (!p) throw std::bad_alloc();
  return FloatBuffer(p);
}

// At least n floats, 64-byte aligned, valid until this thread asks for the same slot again (a request over the
// limit: until this Scratch is destroyed or assigned to).
class Scratch {
 public:
  Scratch(ScratchSlot slot, int64_t n) {
    if (n * static_cast<int64_t>(sizeof(float)) > kScratchKeepBytes) {
      own_ = aligned_floats(n);
      ptr_ = own_.get();
      return;
    }
    thread_local FloatBuffer kept[kScratchSlots];
    thread_local int64_t capacity[kScratchSlots] = {};
    if (capacity[slot] < n) {
      kept[slot].reset();
      kept[slot] = aligned_floats(n);
      capacity[slot] = n;
    }
    ptr_ = kept[slot].get();
  }
  Scratch() = default;
  float* get() const { return ptr_; }

 private:
  FloatBuffer own_;
  float* ptr_ = nullptr;
};

}  // namespace pyprune
