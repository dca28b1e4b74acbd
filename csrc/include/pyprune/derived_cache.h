// What a kernel derives from tensors that stay the same from call to call (a weight's transposed copy, the
// offsets of a sparsity pattern), kept between calls: an inference model calls with the same weights every time.
//
// An entry is reused only while each of its source tensors is alive, is the same TensorImpl with the same data
// pointer, and its version counter has not moved. Every in-place write bumps that counter (an optimizer step, a
// `.copy_`, an index assignment), under torch.inference_mode too, as long as the tensor is a normal one.
// Inference tensors (made inside torch.inference_mode) keep no version counter, so nothing derived from them is
// kept: it is rebuilt on every call.
//
// Writes through `.data` move no counter (`w.data.mul_(0.5)`, `w.data[mask] = 0`), and `p.data = t` can bring
// back an address seen before (torch.nn.utils.vector_to_parameters refills one flat buffer). Weights are written
// that way (pruning by hand, weight clipping, EMA), so an entry derived from a weight is also checked against a
// fingerprint of its contents (content_fingerprint), computed on every call: one read of the weight, instead of
// a silently stale result. What the CPU kernels derive from index tensors (a BSR validation, csr_conv2d's
// offsets) is checked against their fingerprint too: a stale one would read out of bounds. (The CUDA caches of derived indices
// match identity and version alone: fingerprinting device memory would cost a kernel and a sync per call.)
#pragma once
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <list>
#include <mutex>
#include <utility>
#include <vector>

#include "pyprune/cpu_features.h"

namespace pyprune {

namespace detail {

// 16 lanes x 4 independent chains of 32-bit words, each step h = (h ^ w) * M, h ^= h >> 16: a multiply
// carries a change upwards, the shift brings it back down, so every bit of every word reaches the state, and
// the order of the words matters. (A Fletcher sum missed changes that add the same constant to every word:
// a sign flip, a scale by a power of two.) n is a multiple of 64. One 64-byte vector per chain and step, in
// the registers of the target it is instantiated for.
typedef uint32_t U32x16 __attribute__((vector_size(64)));

template <int kDummy>
PYPRUNE_INLINE uint64_t mix64(const uint32_t* p, int64_t n) {
  U32x16 h[4];
  for (int j = 0; j < 4; ++j)
    for (int l = 0; l < 16; ++l) h[j][l] = 0x9e3779b9u * static_cast<uint32_t>(16 * j + l + 1);
  for (int64_t i = 0; i < n; i += 64)
    for (int j = 0; j < 4; ++j) {
      U32x16 w;
      std::memcpy(&w, p + i + 16 * j, sizeof(w));
      h[j] = (h[j] ^ w) * 0x85ebca6bu;
      h[j] ^= h[j] >> 16;
    }
  uint64_t out = 0x9e3779b97f4a7c15ull;
  for (int j = 0; j < 4; ++j)
    for (int l = 0; l < 16; ++l) {
      out = (out ^ h[j][l]) * 0xff51afd7ed558ccdull;
      out ^= out >> 33;
    }
  return out;
}

inline uint64_t mix64_baseline(const uint32_t* p, int64_t n) { return mix64<0>(p, n); }
#if PYPRUNE_X86
PYPRUNE_TARGET_AVX2 inline uint64_t mix64_avx2(const uint32_t* p, int64_t n) { return mix64<1>(p, n); }
PYPRUNE_TARGET_AVX512 inline uint64_t mix64_avx512(const uint32_t* p, int64_t n) { return mix64<2>(p, n); }
#endif

}  // namespace detail

// A 64-bit function of a contiguous CPU tensor's bytes and size, for DerivedCache::get's `content`: chunks of
// 256 KiB mixed in parallel (from L2 a few us per MiB and thread, from DRAM the memory's speed).
inline uint64_t content_fingerprint(const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "content_fingerprint: a contiguous CPU tensor");
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  const auto* p = static_cast<const uint8_t*>(t.data_ptr());
  uint64_t (*mix)(const uint32_t*, int64_t) = detail::mix64_baseline;
#if PYPRUNE_X86
  if (kernel_isa() == Isa::kAvx512) mix = detail::mix64_avx512;
  else if (kernel_isa() == Isa::kAvx2) mix = detail::mix64_avx2;
#endif
  constexpr int64_t kChunk = 256 << 10;  // bytes, a multiple of 256
  const int64_t full = bytes / 256 * 256, n_chunks = (full + kChunk - 1) / kChunk;
  std::vector<uint64_t> part(n_chunks);
  at::parallel_for(0, n_chunks, 4, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t len = std::min(kChunk, full - c * kChunk);
      part[c] = mix(reinterpret_cast<const uint32_t*>(p + c * kChunk), len / 4);
    }
  });
  uint64_t h = static_cast<uint64_t>(bytes) * 0xc4ceb9fe1a85ec53ull;
  for (int64_t c = 0; c < n_chunks; ++c) h = (h ^ (part[c] + static_cast<uint64_t>(c))) * 0xff51afd7ed558ccdull;
  for (int64_t i = full; i < bytes; ++i) h = (h ^ p[i]) * 0xff51afd7ed558ccdull;  // the last < 256 bytes
  return h ^ (h >> 33);
}

// Of two tensors (a CSR pattern's crow and col indices), in order.
inline uint64_t content_fingerprint(const at::Tensor& a, const at::Tensor& b) {
  return (content_fingerprint(a) * 0x9e3779b97f4a7c15ull) ^ content_fingerprint(b);
}

template <typename Value>
class DerivedCache {
 public:
  explicit DerivedCache(int64_t max_bytes) : max_bytes_(max_bytes) {}

  // The value derived from `sources` under `key` (the geometry it was built for): the kept one, or
  // build() (whose result takes bytes(value) bytes) kept for next time when every source can be tracked.
  // `content` (content_fingerprint of the sources, or 0 for none) must match too.
  template <typename Build, typename Bytes>
  Value get(const std::vector<at::Tensor>& sources, std::vector<int64_t> key, Build build, Bytes bytes,
            uint64_t content = 0) {
    bool trackable = true;
    for (const at::Tensor& t : sources) trackable = trackable && !t.is_inference();
    if (trackable) {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = entries_.begin(); it != entries_.end();) {
        // a source gone, or the same sources under the same key changed since: drop what was derived
        const bool superseded = it->key == key && it->same_tensors(sources) && !it->matches(sources, content);
        if (!it->alive() || superseded) {
          bytes_ -= it->bytes;
          it = entries_.erase(it);
          continue;
        }
        if (it->key == key && it->matches(sources, content)) {
          entries_.splice(entries_.begin(), entries_, it);
          return entries_.front().value;
        }
        ++it;
      }
    }
    Value value = build();
    const int64_t size = bytes(value);
    if (trackable && size <= max_bytes_) {
      Entry e{{}, std::move(key), value, size, content};
      for (const at::Tensor& t : sources) e.stamps.push_back(Stamp(t));
      std::lock_guard<std::mutex> lock(mu_);
      entries_.push_front(std::move(e));
      bytes_ += size;
      while (bytes_ > max_bytes_) {
        bytes_ -= entries_.back().bytes;
        entries_.pop_back();
      }
    }
    return value;
  }

 private:
  static uint32_t version(const at::Tensor& t) {
    return t.unsafeGetTensorImpl()->version_counter().current_version();
  }

  struct Stamp {
    explicit Stamp(const at::Tensor& t) : impl(t.getIntrusivePtr()), data(t.data_ptr()), ver(version(t)) {}
    c10::weak_intrusive_ptr<c10::TensorImpl> impl;
    const void* data;
    uint32_t ver;
  };

  struct Entry {
    std::vector<Stamp> stamps;
    std::vector<int64_t> key;
    Value value;
    int64_t bytes;
    uint64_t content;

    bool alive() const {
      for (const Stamp& s : stamps)
        if (s.impl.expired()) return false;
      return true;
    }
    // the weak pointers keep each TensorImpl's memory, so an address can't be reused by another tensor
    bool same_tensors(const std::vector<at::Tensor>& sources) const {
      if (sources.size() != stamps.size()) return false;
      for (size_t i = 0; i < stamps.size(); ++i)
        if (stamps[i].impl._unsafe_get_target() != sources[i].unsafeGetTensorImpl()) return false;
      return true;
    }
    bool matches(const std::vector<at::Tensor>& sources, uint64_t fingerprint) const {
      if (!same_tensors(sources) || fingerprint != content) return false;
      for (size_t i = 0; i < stamps.size(); ++i)
        if (stamps[i].data != sources[i].data_ptr() || stamps[i].ver != version(sources[i])) return false;
      return true;
    }
  };

  const int64_t max_bytes_;
  std::mutex mu_;
  std::list<Entry> entries_;  // most recently used first
  int64_t bytes_ = 0;
};

}  // namespace pyprune
