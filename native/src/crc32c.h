// CRC32C (Castagnoli): the one checksum of the shard store, on host and device.
//
// crc32c(crc, buf, n) follows the usual convention: start with crc = 0, continue a running checksum by
// passing the previous result. crc32c_copy computes the same value while copying buf into dst in one
// pass. The GF(2) "append n zero bytes" operators let independent lanes be combined (used by the
// three-lane SSE4.2 loop here and by the CUDA kernel's tree reduction).
#pragma once

#include <cstddef>
#include <cstdint>

namespace resilient {

constexpr uint32_t kCrc32cPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

uint32_t crc32c(uint32_t crc, const void* buf, size_t n);
uint32_t crc32c_copy(uint32_t crc, void* dst, const void* src, size_t n);
uint32_t crc32c_sw(uint32_t crc, const void* buf, size_t n);
bool crc32c_hw_available();
// Force the software path (tests compare both paths); returns the previous setting.
bool crc32c_force_software(bool on);

// Operator (32 columns) that advances a raw (unconditioned) CRC state over `nbytes` zero bytes.
void crc32c_zeros_op(uint32_t op[32], uint64_t nbytes);
// The same operator from a process-wide cache (thread-safe; at most kZerosOpCacheSize lengths, then it
// starts over). The CUDA CRC launch needs ten of them per tensor, the same few lengths at every snapshot;
// computing one costs ~15-20 us of 32x32 GF(2) squarings on the calling (training) thread.
constexpr size_t kZerosOpCacheSize = 4096;
void crc32c_zeros_op_cached(uint32_t op[32], uint64_t nbytes);
uint32_t gf2_times(const uint32_t op[32], uint32_t vec);
// crc of A||B from crc(A), crc(B) and len(B).
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

}  // namespace resilient
