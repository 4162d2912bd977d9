// C++ tests of the native core (run plain, or under ASan+UBSan with native/run_sanitizers.sh):
// CRC32C known answers, hardware == software, fused copy == memcpy + crc, combine, the copy engine's
// per-chunk results against a serial reference, the thread pool under concurrent callers, and the
// socket path (send_buffer / send_file_range / recv_checksum over a socketpair and a temp file).
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "copy_engine.h"
#include "crc32c.h"
#include "cuda_ops.h"
#include "net.h"
#include "pool.h"

using namespace resilient;

static int g_failures = 0;
#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                        \
    }                                                                      \
  } while (0)

static std::vector<uint8_t> random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

static void test_known_answers() {
  const char* s = "123456789";
  CHECK(crc32c(0, s, 9) == 0xE3069283u);
  CHECK(crc32c_sw(0, s, 9) == 0xE3069283u);
  CHECK(crc32c(0, nullptr, 0) == 0);
  std::vector<uint8_t> zeros(32, 0);
  CHECK(crc32c(0, zeros.data(), 32) == 0x8A9136AAu);  // RFC 3720 B.4
}

static void test_hw_sw_copy_combine() {
  for (size_t n : {1ul, 7ul, 8ul, 255ul, 256ul, 767ul, 768ul, 24575ul, 24576ul, 24577ul, 100003ul, 1ul << 20}) {
    auto data = random_bytes(n + 8, static_cast<uint32_t>(n));
    for (size_t misalign : {0ul, 3ul}) {
      const uint8_t* p = data.data() + misalign;
      size_t len = n + 8 - misalign - 1;
      uint32_t sw = crc32c_sw(0, p, len);
      CHECK(crc32c(0, p, len) == sw);
      std::vector<uint8_t> dst(len + 1, 0xAB);
      CHECK(crc32c_copy(0, dst.data(), p, len) == sw);
      CHECK(std::memcmp(dst.data(), p, len) == 0);
      CHECK(dst[len] == 0xAB);
      size_t cut = len / 3;
      CHECK(crc32c_combine(crc32c(0, p, cut), crc32c(0, p + cut, len - cut), len - cut) == sw);
      CHECK(crc32c(crc32c(0, p, cut), p + cut, len - cut) == sw);
    }
  }
  bool prev = crc32c_force_software(true);
  auto data = random_bytes(50000, 9);
  uint32_t forced = crc32c(0, data.data(), data.size());
  crc32c_force_software(prev);
  CHECK(forced == crc32c(0, data.data(), data.size()));
}

static void test_copy_engine() {
  const size_t chunk = 4096;
  std::vector<size_t> sizes = {0, 1, 4096, 4097, 3 * 4096 + 5, 100000};
  std::vector<std::vector<uint8_t>> srcs, dsts;
  std::vector<Region> regions;
  for (size_t i = 0; i < sizes.size(); ++i) {
    srcs.push_back(random_bytes(sizes[i], static_cast<uint32_t>(i + 100)));
    dsts.emplace_back(sizes[i], 0);
  }
  for (size_t i = 0; i < sizes.size(); ++i) regions.push_back({dsts[i].data(), srcs[i].data(), sizes[i]});
  std::vector<uint32_t> expected;
  for (size_t i = 0; i < sizes.size(); ++i)
    for (size_t off = 0; off < sizes[i]; off += chunk)
      expected.push_back(crc32c_sw(0, srcs[i].data() + off, std::min(chunk, sizes[i] - off)));
  for (size_t threads : {1ul, 2ul, 4ul}) {
    for (auto& d : dsts) std::fill(d.begin(), d.end(), 0);
    auto crcs = run_regions(regions, chunk, threads, true, true);
    CHECK(crcs == expected);
    for (size_t i = 0; i < sizes.size(); ++i) CHECK(dsts[i] == srcs[i]);
    auto only = run_regions(regions, chunk, threads, false, true);
    CHECK(only == expected);
  }
  for (auto& d : dsts) std::fill(d.begin(), d.end(), 0);
  auto none = run_regions(regions, chunk, 2, true, false);
  CHECK(none.empty());
  for (size_t i = 0; i < sizes.size(); ++i) CHECK(dsts[i] == srcs[i]);
}

static void test_copy_engine_stops() {
  const size_t chunk = 4096;
  auto src = random_bytes(10 * chunk, 7);
  std::vector<uint8_t> dst(src.size(), 0);
  alignas(8) int64_t word = 3;
  std::vector<Region> regions = {{dst.data(), src.data(), src.size()}};
  bool stopped = true;
  auto crcs = run_regions(regions, chunk, 2, true, true, StopWhen{&word, 3}, &stopped);  // not above: all
  CHECK(!stopped);
  CHECK(crcs.size() == 10);
  CHECK(dst == src);
  std::fill(dst.begin(), dst.end(), 0);
  word = 4;  // above before the run: no chunk is copied
  run_regions(regions, chunk, 2, true, true, StopWhen{&word, 3}, &stopped);
  CHECK(stopped);
  CHECK(std::all_of(dst.begin(), dst.end(), [](uint8_t b) { return b == 0; }));
  // raised part-way: on one thread the chunks run in order, and the first region's copy writes the word
  word = 0;
  const int64_t raised = 9;
  std::fill(dst.begin(), dst.end(), 0);
  std::vector<Region> raising = {{reinterpret_cast<uint8_t*>(&word), reinterpret_cast<const uint8_t*>(&raised), 8},
                                 {dst.data(), src.data(), src.size()}};
  run_regions(raising, chunk, 1, true, true, StopWhen{&word, 0}, &stopped);
  CHECK(stopped);
  CHECK(word == 9);
  CHECK(std::all_of(dst.begin(), dst.end(), [](uint8_t b) { return b == 0; }));
}

static void test_pool_concurrent_callers() {
  std::vector<std::thread> callers;
  std::vector<long> sums(4, 0);
  for (int c = 0; c < 4; ++c) {
    callers.emplace_back([c, &sums] {
      for (int round = 0; round < 50; ++round) {
        std::vector<long> parts(64, 0);
        parallel_for(parts.size(), 4, [&](size_t i) { parts[i] = static_cast<long>(i); });
        long s = 0;
        for (long p : parts) s += p;
        sums[c] += s;
      }
    });
  }
  for (auto& t : callers) t.join();
  for (long s : sums) CHECK(s == 50L * (63 * 64 / 2));
}

static void test_sockets() {
  int sv[2];
  CHECK(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
  const size_t n = 3 * 65536 + 17;
  auto data = random_bytes(n, 77);
  char path[] = "/tmp/resilient-native-test-XXXXXX";
  int fd = ::mkstemp(path);
  CHECK(fd >= 0);
  CHECK(::write(fd, data.data(), n) == static_cast<ssize_t>(n));
  std::vector<uint8_t> got(2 * n, 0);
  std::vector<uint32_t> crcs;
  int64_t received = 0;
  std::thread reader([&] {
    received = recv_checksum(sv[1], got.data(), 2 * n, {{0, n}, {n + 5, n - 5}}, 65536, 5.0, &crcs);
  });
  CHECK(send_buffer(sv[0], data.data(), n, 5.0) == static_cast<int64_t>(n));
  CHECK(send_file_range(sv[0], fd, 0, n, 5.0) == static_cast<int64_t>(n));
  reader.join();
  CHECK(received == static_cast<int64_t>(2 * n));
  CHECK(std::memcmp(got.data(), data.data(), n) == 0);
  CHECK(std::memcmp(got.data() + n, data.data(), n) == 0);
  std::vector<Region> regions = {{nullptr, got.data(), n}, {nullptr, got.data() + n + 5, n - 5}};
  CHECK(crcs == run_regions(regions, 65536, 1, false, true));
  // short read: the peer closes early
  std::thread short_reader([&] {
    received = recv_checksum(sv[1], got.data(), n, {{0, n}}, 65536, 5.0, &crcs);
  });
  CHECK(send_buffer(sv[0], data.data(), 1000, 5.0) == 1000);
  ::shutdown(sv[0], SHUT_WR);
  short_reader.join();
  CHECK(received == 1000);
  ::close(sv[0]);
  ::close(sv[1]);
  ::close(fd);
  ::unlink(path);
  // idle timeout: nothing arrives
  int sv2[2];
  CHECK(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv2) == 0);
  bool threw = false;
  try {
    recv_checksum(sv2[1], got.data(), 10, {}, 65536, 0.05, &crcs);
  } catch (const NetError& e) {
    threw = e.err == ETIMEDOUT;
  }
  CHECK(threw);
  ::close(sv2[0]);
  ::close(sv2[1]);
}

static void test_cuda_reports_cleanly() {
  std::string why;
  if (!cuda::available(&why)) {
    CHECK(!why.empty());
    bool threw = false;
    try {
      cuda::stream_create();
    } catch (const std::runtime_error& e) {
      threw = std::string(e.what()).rfind("no CUDA device", 0) == 0;
    }
    CHECK(threw);
  }
}

static void test_cached_zeros_op() {
  // Equal to the direct operator on first use, on reuse, and after the cache started over.
  uint32_t direct[32], cached[32];
  for (int round = 0; round < 2; ++round) {
    for (uint64_t n : {0ull, 1ull, 4096ull, 4097ull, 1ull << 20, (1ull << 26) - 12345, 1ull << 40}) {
      crc32c_zeros_op(direct, n);
      crc32c_zeros_op_cached(cached, n);
      CHECK(std::memcmp(direct, cached, sizeof(direct)) == 0);
    }
  }
  for (uint64_t n = 1; n <= kZerosOpCacheSize + 10; ++n) crc32c_zeros_op_cached(cached, n * 8);
  crc32c_zeros_op(direct, 8 * 3);
  crc32c_zeros_op_cached(cached, 8 * 3);
  CHECK(std::memcmp(direct, cached, sizeof(direct)) == 0);
  auto data = random_bytes(3000, 5);
  crc32c_zeros_op_cached(cached, 1000);
  uint32_t a = crc32c(0, data.data(), 2000), b = crc32c(0, data.data() + 2000, 1000);
  // advancing crc(A) over len(B) zero bytes, then xoring crc(B), is crc(A||B)
  CHECK((gf2_times(cached, a) ^ b) == crc32c(0, data.data(), 3000));
}

int main() {
  test_known_answers();
  test_hw_sw_copy_combine();
  test_cached_zeros_op();
  test_copy_engine();
  test_copy_engine_stops();
  test_pool_concurrent_callers();
  test_sockets();
  test_cuda_reports_cleanly();
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all native tests passed (hw crc32c: %s)\n", crc32c_hw_available() ? "yes" : "no");
  return 0;
}
