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
// offsets) is checked against their fingerprint too: a stale one would read out of bounds. A value that is kept is
// built from a copy of its sources, taken in the pass that fingerprints them, so that a `.data` write racing the
// build cannot leave it keyed by contents it was not derived from. (The CUDA caches of derived
// indices match identity and version alone: fingerprinting device memory would cost a kernel and a sync per call.)
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

// 16 lanes x 8 independent chains of 32-bit words, each step h = (h ^ w) * M, h ^= h >> 16: a multiply
// carries a change upwards, the shift brings it back down, so every bit of every word reaches the state, and
// the order of the words matters. (A Fletcher sum missed changes that add the same constant to every word:
// a sign flip, a scale by a power of two.) n is a multiple of 64 (a last 64 words go to chains 0-3). One
// 64-byte vector per chain and step, in the registers of the target it is instantiated for. Eight chains,
// not four: a step is a dependent multiply, shift and two xors (vpmulld alone takes 10 cycles on Intel
// cores), so four chains left the multipliers idle (see fingerprint for what the change measured).
typedef uint32_t U32x16 __attribute__((vector_size(64)));

// With kCopy, each vector is also stored to `out`: the copy holds exactly the words that were mixed, even when
// the source changes meanwhile.
template <int kDummy, bool kCopy>
PYPRUNE_INLINE uint64_t mix64(const uint32_t* p, uint32_t* out, int64_t n) {
  constexpr int kChains = 8;
  U32x16 h[kChains];
  for (int j = 0; j < kChains; ++j)
    for (int l = 0; l < 16; ++l) h[j][l] = 0x9e3779b9u * static_cast<uint32_t>(16 * j + l + 1);
  const auto step = [&](int64_t i, int chains) {
    for (int j = 0; j < chains; ++j) {
      U32x16 w;
      std::memcpy(&w, p + i + 16 * j, sizeof(w));
      if constexpr (kCopy) std::memcpy(out + i + 16 * j, &w, sizeof(w));
      h[j] = (h[j] ^ w) * 0x85ebca6bu;
      h[j] ^= h[j] >> 16;
    }
  };
  int64_t i = 0;
  for (; i + 16 * kChains <= n; i += 16 * kChains) step(i, kChains);
  if (i < n) step(i, 4);
  uint64_t hash = 0x9e3779b97f4a7c15ull;
  for (int j = 0; j < kChains; ++j)
    for (int l = 0; l < 16; ++l) {
      hash = (hash ^ h[j][l]) * 0xff51afd7ed558ccdull;
      hash ^= hash >> 33;
    }
  return hash;
}

using Mix = uint64_t (*)(const uint32_t*, uint32_t*, int64_t);
template <bool kCopy>
inline uint64_t mix64_baseline(const uint32_t* p, uint32_t* out, int64_t n) { return mix64<0, kCopy>(p, out, n); }
#if PYPRUNE_X86
template <bool kCopy>
PYPRUNE_TARGET_AVX2 inline uint64_t mix64_avx2(const uint32_t* p, uint32_t* out, int64_t n) {
  return mix64<1, kCopy>(p, out, n);
}
template <bool kCopy>
PYPRUNE_TARGET_AVX512 inline uint64_t mix64_avx512(const uint32_t* p, uint32_t* out, int64_t n) {
  return mix64<2, kCopy>(p, out, n);
}
#endif

// content_fingerprint, and with `out` (bytes of the same size) a copy of what it read.
template <bool kCopy>
uint64_t fingerprint(const at::Tensor& t, uint8_t* out) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "content_fingerprint: a contiguous CPU tensor");
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  const auto* p = static_cast<const uint8_t*>(t.data_ptr());
  Mix mix = mix64_baseline<kCopy>;
#if PYPRUNE_X86
  if (kernel_isa() == Isa::kAvx512) mix = mix64_avx512<kCopy>;
  else if (kernel_isa() == Isa::kAvx2) mix = mix64_avx2<kCopy>;
#endif
  // chunks of 64 KiB, two or more to a thread: in chunks of 256 KiB, four to a thread, weights up to 1 MiB
  // hashed on one thread while the other waited (Xeon VM, 2 threads, old and new builds alternating, this and
  // the eight chains together: pruned_conv2d on a 1x1 map, 1 MiB weight 60 -> 35 us a call, 0.25 MiB
  // 23 -> 19 us, 4 MiB within noise)
  constexpr int64_t kChunk = 64 << 10;  // bytes, a multiple of 256
  const int64_t full = bytes / 256 * 256, n_chunks = (full + kChunk - 1) / kChunk;
  std::vector<uint64_t> part(n_chunks);
  at::parallel_for(0, n_chunks, 2, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t len = std::min(kChunk, full - c * kChunk);
      part[c] = mix(reinterpret_cast<const uint32_t*>(p + c * kChunk),
                    kCopy ? reinterpret_cast<uint32_t*>(out + c * kChunk) : nullptr, len / 4);
    }
  });
  uint64_t h = static_cast<uint64_t>(bytes) * 0xc4ceb9fe1a85ec53ull;
  for (int64_t c = 0; c < n_chunks; ++c) h = (h ^ (part[c] + static_cast<uint64_t>(c))) * 0xff51afd7ed558ccdull;
  for (int64_t i = full; i < bytes; ++i) {  // the last < 256 bytes
    const uint8_t byte = p[i];
    if (kCopy) out[i] = byte;
    h = (h ^ byte) * 0xff51afd7ed558ccdull;
  }
  return h ^ (h >> 33);
}

// Several tensors' fingerprints as one, in order.
inline uint64_t combine(uint64_t h, uint64_t next) { return (h * 0x9e3779b97f4a7c15ull) ^ next; }

}  // namespace detail

// A 64-bit function of a contiguous CPU tensor's bytes and size: chunks of 64 KiB mixed in parallel.
inline uint64_t content_fingerprint(const at::Tensor& t) { return detail::fingerprint<false>(t, nullptr); }

template <typename Value>
class DerivedCache {
 public:
  explicit DerivedCache(int64_t max_bytes) : max_bytes_(max_bytes) {}

  // The value derived from `sources` under `key` (the geometry it was built for): the kept one, or
  // build(from) (whose result takes bytes(value) bytes), kept for next time when every source can be tracked.
  // `contents` hold the sources' data as contiguous CPU tensors (the sources themselves, or their contiguous
  // copies), and their content_fingerprint must match too. What is kept is built from copies of `contents`
  // and keyed by the fingerprint of exactly what was copied: a write through `.data` (no version moves) racing
  // this call can change a source while build() reads it, and a value derived from that mix was kept under
  // contents it was not derived from (A -> B -> A during one build: a wrong result on every later call with
  // A). The copy and its fingerprint take one pass; the sources are fingerprinted before that only when an
  // entry for them has seen no version move. Untracked sources: build(contents), nothing kept.
  template <typename Build, typename Bytes>
  Value get(const std::vector<at::Tensor>& sources, const std::vector<at::Tensor>& contents,
            std::vector<int64_t> key, Build build, Bytes bytes) {
    if (!trackable(sources)) return build(contents);
    Value value;
    if (candidate(sources, key)) {
      uint64_t now = 0;
      for (const at::Tensor& t : contents) now = detail::combine(now, content_fingerprint(t));
      if (lookup(sources, key, now, value)) return value;
    }
    std::vector<Stamp> stamps = stamp(sources);  // before the copies: a write during them moves a version
    std::vector<at::Tensor> copies;
    uint64_t copied = 0;
    for (const at::Tensor& t : contents) {
      copies.push_back(at::empty(t.sizes(), t.options()));
      copied = detail::combine(copied, detail::fingerprint<true>(t, static_cast<uint8_t*>(copies.back().data_ptr())));
    }
    value = build(copies);
    keep(std::move(stamps), std::move(key), value, bytes(value), copied);
    return value;
  }

  // For sources matched by identity and version alone, read in place (the CUDA caches: a fingerprint of device
  // memory would cost a kernel and a sync per call).
  template <typename Build, typename Bytes>
  Value get(const std::vector<at::Tensor>& sources, std::vector<int64_t> key, Build build, Bytes bytes) {
    if (!trackable(sources)) return build(sources);
    Value value;
    if (lookup(sources, key, 0, value)) return value;
    std::vector<Stamp> stamps = stamp(sources);  // before build(): a version moved during it shows next call
    value = build(sources);
    keep(std::move(stamps), std::move(key), value, bytes(value), 0);
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
    bool unmoved(const std::vector<at::Tensor>& sources) const {
      if (!same_tensors(sources)) return false;
      for (size_t i = 0; i < stamps.size(); ++i)
        if (stamps[i].data != sources[i].data_ptr() || stamps[i].ver != version(sources[i])) return false;
      return true;
    }
    bool matches(const std::vector<at::Tensor>& sources, uint64_t fingerprint) const {
      return fingerprint == content && unmoved(sources);
    }
  };

  static bool trackable(const std::vector<at::Tensor>& sources) {
    for (const at::Tensor& t : sources)
      if (t.is_inference()) return false;
    return true;
  }

  static std::vector<Stamp> stamp(const std::vector<at::Tensor>& sources) {
    std::vector<Stamp> stamps;
    for (const at::Tensor& t : sources) stamps.push_back(Stamp(t));
    return stamps;
  }

  // Whether an entry for these sources (same tensors, data and versions) and key may hold their value: only
  // then is a fingerprint worth its pass over the sources (after an optimizer step none does). Entries whose
  // sources are gone, or that these sources under this key have outdated, are dropped on the way.
  bool candidate(const std::vector<at::Tensor>& sources, const std::vector<int64_t>& key) {
    std::lock_guard<std::mutex> lock(mu_);
    bool found = false;
    for (auto it = entries_.begin(); it != entries_.end();) {
      const bool mine = it->key == key && it->same_tensors(sources);
      if (!it->alive() || (mine && !it->unmoved(sources))) {
        bytes_ -= it->bytes;
        it = entries_.erase(it);
        continue;
      }
      found = found || mine;
      ++it;
    }
    return found;
  }

  // The kept value for these sources, key and contents, into `out`; entries whose sources are gone, or that
  // these sources under this key have outdated, are dropped on the way.
  bool lookup(const std::vector<at::Tensor>& sources, const std::vector<int64_t>& key, uint64_t content,
              Value& out) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end();) {
      const bool superseded = it->key == key && it->same_tensors(sources) && !it->matches(sources, content);
      if (!it->alive() || superseded) {
        bytes_ -= it->bytes;
        it = entries_.erase(it);
        continue;
      }
      if (it->key == key && it->matches(sources, content)) {
        entries_.splice(entries_.begin(), entries_, it);
        out = entries_.front().value;
        return true;
      }
      ++it;
    }
    return false;
  }

  void keep(std::vector<Stamp> stamps, std::vector<int64_t> key, const Value& value, int64_t size,
            uint64_t content) {
    if (size > max_bytes_) return;
    std::lock_guard<std::mutex> lock(mu_);
    entries_.push_front(Entry{std::move(stamps), std::move(key), value, size, content});
    bytes_ += size;
    while (bytes_ > max_bytes_) {
      bytes_ -= entries_.back().bytes;
      entries_.pop_back();
    }
  }

  const int64_t max_bytes_;
  std::mutex mu_;
  std::list<Entry> entries_;  // most recently used first
  int64_t bytes_ = 0;
};

}  // namespace pyprune
