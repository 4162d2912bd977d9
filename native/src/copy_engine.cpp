#include "copy_engine.h"

#include <atomic>
#include <cstring>
#include <stdexcept>

#include "crc32c.h"
#include "pool.h"

namespace resilient {

size_t chunk_count(size_t n, size_t chunk) { return n == 0 ? 0 : (n + chunk - 1) / chunk; }

std::vector<uint32_t> run_regions(const std::vector<Region>& regions, size_t chunk, size_t threads,
                                  bool copy, bool checksum, const StopWhen& stop, bool* stopped) {
  if (chunk == 0) throw std::invalid_argument("chunk size must be positive");
  struct Task {
    uint8_t* dst;
    const uint8_t* src;
    size_t n;
    size_t out;
  };
  std::vector<Task> tasks;
  size_t total = 0;
  for (const Region& r : regions) total += chunk_count(r.n, chunk);
  tasks.reserve(total);
  size_t out = 0;
  for (const Region& r : regions) {
    for (size_t off = 0; off < r.n; off += chunk) {
      size_t len = r.n - off < chunk ? r.n - off : chunk;
      tasks.push_back({r.dst ? r.dst + off : nullptr, r.src + off, len, out++});
    }
  }
  std::vector<uint32_t> crcs(checksum ? total : 0);
  std::atomic<bool> halted{false};
  parallel_for(tasks.size(), threads, [&](size_t i) {
    if (stop.word != nullptr) {
      if (halted.load(std::memory_order_relaxed)) return;
      if (__atomic_load_n(stop.word, __ATOMIC_ACQUIRE) > stop.above) {
        halted.store(true, std::memory_order_relaxed);
        return;
      }
    }
    const Task& t = tasks[i];
    if (checksum) {
      crcs[t.out] = (copy && t.dst) ? crc32c_copy(0, t.dst, t.src, t.n) : crc32c(0, t.src, t.n);
    } else if (copy && t.dst) {
      std::memcpy(t.dst, t.src, t.n);
    }
  });
  if (stopped != nullptr) *stopped = halted.load();
  return crcs;
}

}  // namespace resilient
