// Packed weights kept between inference calls. Packing W into PanelGemm's panels is per-call
// work that does not scale with the steps: in a one-step call at batch 1 (a streaming
// LSTM(64, 128)) it was 19% of the time, more than the step itself. An inference call looks
// its weights up here by what identifies their values: the storage (held weakly, so that a
// freed weight never matches a new one at the same address), the data pointer, the shape
// and layout, and the tensor's version counter, which every in-place change through the
// tensor or a view of it bumps (optimizer.step(), load_state_dict, copy_ under no_grad). A
// change through `.data`, which has a counter of its own, is not seen: RNNKIT_WEIGHT_CACHE_MB=0
// turns the cache off. Training calls never use it (their weights change every step).
#pragma once

#include "bf16_gemm.h"
#include "panel_gemm.h"

#include <ATen/core/Tensor.h>
#include <c10/core/Storage.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdint>
#include <cstdlib>
#include <list>
#include <memory>
#include <mutex>
#include <optional>

namespace rnnkit {

// What the values of a weight tensor are at one moment.
struct WeightId {
  std::optional<c10::weak_intrusive_ptr<c10::StorageImpl>> storage;
  const c10::StorageImpl* storage_impl = nullptr;
  const void* data = nullptr;
  int64_t version = 0;

  static WeightId of(const at::Tensor& t) {
    WeightId id;
    if (!t.defined() || !t.has_storage()) return id;
    id.storage = t.storage().getWeakStorageImpl();
    id.storage_impl = t.storage().unsafeGetStorageImpl();
    id.data = t.data_ptr();
    id.version = t._version();
    return id;
  }
  bool known() const { return storage.has_value(); }
};

// The cache's size in bytes of packed panels, from RNNKIT_WEIGHT_CACHE_MB (default 64): the
// least recently used weights go first.
inline int64_t weight_cache_bytes() {
  static const int64_t bytes = [] {
    const char* mb = std::getenv("RNNKIT_WEIGHT_CACHE_MB");
    return (mb ? std::atoll(mb) : 64) * (int64_t(1) << 20);
  }();
  return bytes;
}

// The panels (of type P: PanelGemm<T>, or Bf16Gemm, each type a cache of its own) that make()
// packs from the weight that `id` names, [k, n] of them (`part`: which of several packings of
// that weight, e.g. a thread's rows of it): packed on a miss, shared (read-only) on a hit, by
// any thread.
template <typename P, typename Make>
std::shared_ptr<const P> cached(const WeightId& id, int64_t part, bool trans_w, int64_t n,
                                int64_t k, const Make& make) {
  const int64_t bytes = P::packed_bytes(n, k);
  if (!id.known() || bytes > weight_cache_bytes()) return make();
  struct Entry {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    const void* data;
    int64_t version, part, n, k, bytes;
    bool trans_w;
    std::shared_ptr<const P> panels;
  };
  static std::mutex mutex;
  static std::list<Entry> entries;  // most recently used first
  static int64_t held = 0;
  const auto same_weight = [&](const Entry& e) {
    const auto storage = e.storage.lock();
    return storage.get() == id.storage_impl && e.data == id.data && e.part == part &&
           e.n == n && e.k == k && e.trans_w == trans_w;
  };
  std::lock_guard<std::mutex> lock(mutex);
  for (auto it = entries.begin(); it != entries.end();) {
    if (same_weight(*it) && it->version == id.version) {
      entries.splice(entries.begin(), entries, it);
      return entries.front().panels;
    }
    // an older version of this weight, or a weight freed since: never used again
    if (same_weight(*it) || it->storage.expired()) {
      held -= it->bytes;
      it = entries.erase(it);
    } else {
      ++it;
    }
  }
  std::shared_ptr<const P> panels = make();
  entries.push_front(Entry{*id.storage, id.data, id.version, part, n, k, bytes, trans_w, panels});
  held += bytes;
  while (held > weight_cache_bytes()) {
    held -= entries.back().bytes;
    entries.pop_back();
  }
  return panels;
}

template <typename T, typename Make>
std::shared_ptr<const PanelGemm<T>> cached_panels(const WeightId& id, int64_t part, bool trans_w,
                                                  int64_t n, int64_t k, const Make& make) {
  return cached<PanelGemm<T>>(id, part, trans_w, n, k, make);
}

// PanelGemm(w, ldw, trans_w, n, k) of the weight that `id` names, w its values.
template <typename T>
std::shared_ptr<const PanelGemm<T>> cached_panels(const WeightId& id, const T* w, int64_t ldw,
                                                  bool trans_w, int64_t n, int64_t k) {
  // ldw is the weight's own: a part of its own
  return cached_panels<T>(id, -ldw, trans_w, n, k, [&] {
    return std::make_shared<const PanelGemm<T>>(w, ldw, trans_w, n, k);
  });
}

// Bf16Gemm(w, ldw, trans_w, n, k) of the bfloat16 weight that `id` names, w its values.
inline std::shared_ptr<const Bf16Gemm> cached_bf16(const WeightId& id, const c10::BFloat16* w,
                                                   int64_t ldw, bool trans_w, int64_t n,
                                                   int64_t k) {
  return cached<Bf16Gemm>(id, -ldw, trans_w, n, k, [&] {
    return std::make_shared<const Bf16Gemm>(w, ldw, trans_w, n, k);
  });
}

}  // namespace rnnkit
