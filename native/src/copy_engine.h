// The copy engine: move many regions (tensor -> slot or slot -> tensor) on the thread pool, with a
// CRC32C per chunk of each region computed in the same pass.
//
// A region of n bytes has ceil(n / chunk) chunks (none when n == 0); results are flat, region after
// region, chunk after chunk. dst may be null (checksum only); checksum may be off (plain copy).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace resilient {

struct Region {
  uint8_t* dst;
  const uint8_t* src;
  size_t n;
};

struct StopWhen {
  const int64_t* word = nullptr;  // 8-byte aligned; nullptr: never stop
  int64_t above = 0;
};

size_t chunk_count(size_t n, size_t chunk);

std::vector<uint32_t> run_regions(const std::vector<Region>& regions, size_t chunk, size_t threads,
                                  bool copy, bool checksum, const StopWhen& stop = {},
                                  bool* stopped = nullptr);

}  // namespace resilient
