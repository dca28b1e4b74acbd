// What a kernel derives from tensors that stay the same from call to call (a weight's transposed copy, the
// offsets of a sparsity pattern), kept between calls: an inference model calls with the same weights every time.
//
// An entry is reused only while each of its source tensors is alive, is the same TensorImpl with the same data
// pointer, and its version counter has not moved. Every in-place write bumps that counter (an optimizer step, a
// `.copy_`, an index assignment), under torch.inference_mode too, as long as the tensor is a normal one.
// Inference tensors (made inside torch.inference_mode) keep no version counter, so nothing derived from them is
// kept: it is rebuilt on every call.
#pragma once
#include <torch/extension.h>

#include <list>
#include <mutex>
#include <utility>
#include <vector>

namespace pyprune {

template <typename Value>
class DerivedCache {
 public:
  explicit DerivedCache(int64_t max_bytes) : max_bytes_(max_bytes) {}

  // The value derived from `sources` under `key` (the geometry it was built for): the kept one, or
  // build() (whose result takes bytes(value) bytes) kept for next time when every source can be tracked.
  template <typename Build, typename Bytes>
  Value get(const std::vector<at::Tensor>& sources, std::vector<int64_t> key, Build build, Bytes bytes) {
    bool trackable = true;
    for (const at::Tensor& t : sources) trackable = trackable && !t.is_inference();
    if (trackable) {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = entries_.begin(); it != entries_.end();) {
        if (!it->alive()) {  // a source is gone: drop what was derived from it
          bytes_ -= it->bytes;
          it = entries_.erase(it);
          continue;
        }
        if (it->key == key && it->matches(sources)) {
          entries_.splice(entries_.begin(), entries_, it);
          return entries_.front().value;
        }
        ++it;
      }
    }
    Value value = build();
    const int64_t size = bytes(value);
    if (trackable && size <= max_bytes_) {
      Entry e{{}, std::move(key), value, size};
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

    bool alive() const {
      for (const Stamp& s : stamps)
        if (s.impl.expired()) return false;
      return true;
    }
    // the weak pointers keep each TensorImpl's memory, so an address can't be reused by another tensor
    bool matches(const std::vector<at::Tensor>& sources) const {
      if (sources.size() != stamps.size()) return false;
      for (size_t i = 0; i < stamps.size(); ++i) {
        const at::Tensor& t = sources[i];
        if (stamps[i].impl._unsafe_get_target() != t.unsafeGetTensorImpl() || stamps[i].data != t.data_ptr() ||
            stamps[i].ver != version(t))
          return false;
      }
      return true;
    }
  };

  const int64_t max_bytes_;
  std::mutex mu_;
  std::list<Entry> entries_;  // most recently used first
  int64_t bytes_ = 0;
};

}  // namespace pyprune
