// CRC32C on the host: SSE4.2 crc32 instruction on three interleaved lanes (combined with zero-shift
// tables), a slicing-by-8 software fallback, and a fused copy+checksum used by the copy engine.
#include "crc32c.h"

#include <array>
#include <atomic>
#include <cstring>
#include <mutex>
#include <unordered_map>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define RESILIENT_X86 1
#endif

namespace resilient {
namespace {

struct SwTables {
  uint32_t t[8][256];
  SwTables() {
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kCrc32cPoly : c >> 1;
      t[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = t[0][n];
      for (int k = 1; k < 8; ++k) {
        c = t[0][c & 0xff] ^ (c >> 8);
        t[k][n] = c;
      }
    }
  }
};

const SwTables& sw_tables() {
  static const SwTables tables;
  return tables;
}

// Table form of a zero-shift operator: shift(crc) = t[0][b0] ^ t[1][b1] ^ t[2][b2] ^ t[3][b3].
struct ShiftTable {
  uint32_t t[4][256];
  explicit ShiftTable(uint64_t nbytes) {
    uint32_t op[32];
    crc32c_zeros_op(op, nbytes);
    for (int k = 0; k < 4; ++k)
      for (uint32_t b = 0; b < 256; ++b) t[k][b] = gf2_times(op, b << (8 * k));
  }
  inline uint32_t apply(uint32_t c) const {
    return t[0][c & 0xff] ^ t[1][(c >> 8) & 0xff] ^ t[2][(c >> 16) & 0xff] ^ t[3][c >> 24];
  }
};

constexpr size_t kLong = 8192;
constexpr size_t kShort = 256;

const ShiftTable& long_shift() {
  static const ShiftTable table(kLong);
  return table;
}
const ShiftTable& short_shift() {
  static const ShiftTable table(kShort);
  return table;
}

std::atomic<bool> g_force_sw{false};

bool detect_hw() {
#if RESILIENT_X86
  return __builtin_cpu_supports("sse4.2");
#else
  return false;
#endif
}

uint32_t sw_raw(uint32_t c, const uint8_t* p, size_t n) {
  const SwTables& T = sw_tables();
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    c = T.t[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    --n;
  }
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    w ^= c;
    c = T.t[7][w & 0xff] ^ T.t[6][(w >> 8) & 0xff] ^ T.t[5][(w >> 16) & 0xff] ^
        T.t[4][(w >> 24) & 0xff] ^ T.t[3][(w >> 32) & 0xff] ^ T.t[2][(w >> 40) & 0xff] ^
        T.t[1][(w >> 48) & 0xff] ^ T.t[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) c = T.t[0][(c ^ *p++) & 0xff] ^ (c >> 8);
  return c;
}

#if RESILIENT_X86
template <bool kCopy>
__attribute__((target("sse4.2"))) uint32_t hw_raw(uint32_t crc, uint8_t* dst, const uint8_t* src,
                                                  size_t n) {
  uint64_t c0 = crc;
  while (n && (reinterpret_cast<uintptr_t>(src) & 7)) {
    uint8_t b = *src++;
    if (kCopy) *dst++ = b;
    c0 = _mm_crc32_u8(static_cast<uint32_t>(c0), b);
    --n;
  }
  const ShiftTable* tables[2] = {&long_shift(), &short_shift()};
  const size_t lanes[2] = {kLong, kShort};
  for (int level = 0; level < 2; ++level) {
    const size_t lane = lanes[level];
    const ShiftTable& shift = *tables[level];
    while (n >= 3 * lane) {
      uint64_t c1 = 0, c2 = 0;
      const uint8_t* end = src + lane;
      do {
        uint64_t a, b, c;
        std::memcpy(&a, src, 8);
        std::memcpy(&b, src + lane, 8);
        std::memcpy(&c, src + 2 * lane, 8);
        if (kCopy) {
          std::memcpy(dst, &a, 8);
          std::memcpy(dst + lane, &b, 8);
          std::memcpy(dst + 2 * lane, &c, 8);
          dst += 8;
        }
        c0 = _mm_crc32_u64(c0, a);
        c1 = _mm_crc32_u64(c1, b);
        c2 = _mm_crc32_u64(c2, c);
        src += 8;
      } while (src < end);
      c0 = shift.apply(static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1);
      c0 = shift.apply(static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c2);
      src += 2 * lane;
      if (kCopy) dst += 2 * lane;
      n -= 3 * lane;
    }
  }
  while (n >= 8) {
    uint64_t a;
    std::memcpy(&a, src, 8);
    if (kCopy) {
      std::memcpy(dst, &a, 8);
      dst += 8;
    }
    c0 = _mm_crc32_u64(c0, a);
    src += 8;
    n -= 8;
  }
  while (n--) {
    uint8_t b = *src++;
    if (kCopy) *dst++ = b;
    c0 = _mm_crc32_u8(static_cast<uint32_t>(c0), b);
  }
  return static_cast<uint32_t>(c0);
}
#endif

bool use_hw() {
  static const bool hw = detect_hw();
  return hw && !g_force_sw.load(std::memory_order_relaxed);
}

}  // namespace

uint32_t gf2_times(const uint32_t op[32], uint32_t vec) {
  uint32_t sum = 0;
  for (int i = 0; vec; ++i, vec >>= 1)
    if (vec & 1) sum ^= op[i];
  return sum;
}

static void gf2_square(uint32_t sq[32], const uint32_t m[32]) {
  for (int n = 0; n < 32; ++n) sq[n] = gf2_times(m, m[n]);
}

void crc32c_zeros_op(uint32_t op[32], uint64_t nbytes) {
  uint32_t a[32], b[32];
  a[0] = kCrc32cPoly;  // one zero bit
  for (int n = 1; n < 32; ++n) a[n] = 1u << (n - 1);
  gf2_square(b, a);  // two bits
  gf2_square(a, b);  // four bits
  gf2_square(b, a);  // one byte
  for (int n = 0; n < 32; ++n) op[n] = 1u << n;
  uint32_t* cur = b;
  uint32_t* nxt = a;
  while (nbytes) {
    if (nbytes & 1) {
      uint32_t tmp[32];
      for (int n = 0; n < 32; ++n) tmp[n] = gf2_times(cur, op[n]);
      std::memcpy(op, tmp, sizeof(tmp));
    }
    nbytes >>= 1;
    if (!nbytes) break;
    gf2_square(nxt, cur);
    uint32_t* t = cur;
    cur = nxt;
    nxt = t;
  }
}

void crc32c_zeros_op_cached(uint32_t op[32], uint64_t nbytes) {
  static std::mutex mu;
  static std::unordered_map<uint64_t, std::array<uint32_t, 32>> cache;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(nbytes);
    if (it != cache.end()) {
      std::memcpy(op, it->second.data(), 32 * sizeof(uint32_t));
      return;
    }
  }
  crc32c_zeros_op(op, nbytes);  // outside the lock: two threads may both compute a new length, harmlessly
  std::array<uint32_t, 32> entry;
  std::memcpy(entry.data(), op, 32 * sizeof(uint32_t));
  std::lock_guard<std::mutex> lock(mu);
  if (cache.size() >= kZerosOpCacheSize) cache.clear();
  cache.emplace(nbytes, entry);
}

uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  uint32_t op[32];
  crc32c_zeros_op(op, len_b);
  return gf2_times(op, crc_a) ^ crc_b;
}

bool crc32c_hw_available() { return detect_hw(); }

bool crc32c_force_software(bool on) { return g_force_sw.exchange(on); }

uint32_t crc32c_sw(uint32_t crc, const void* buf, size_t n) {
  return ~sw_raw(~crc, static_cast<const uint8_t*>(buf), n);
}

uint32_t crc32c(uint32_t crc, const void* buf, size_t n) {
#if RESILIENT_X86
  if (use_hw()) return ~hw_raw<false>(~crc, nullptr, static_cast<const uint8_t*>(buf), n);
#endif
  return crc32c_sw(crc, buf, n);
}

uint32_t crc32c_copy(uint32_t crc, void* dst, const void* src, size_t n) {
#if RESILIENT_X86
  if (use_hw())
    return ~hw_raw<true>(~crc, static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), n);
#endif
  std::memcpy(dst, src, n);
  return crc32c_sw(crc, dst, n);
}

}  // namespace resilient
