// CUDA implementation of cuda_ops.h (compiled by nvcc only; linked with the static CUDA runtime so the
// module imports on machines without a driver).
//
// CRC kernel: one block per chunk, 256 threads. The chunk is viewed right-aligned in 256 lanes of `seg`
// bytes (leading zero padding leaves a raw CRC that starts at 0 unchanged); each thread computes the raw
// CRC of its lane from state 0, a tree reduction combines lanes with "append seg*2^j zero bytes"
// operators, and the standard init term (0xFFFFFFFF advanced over the chunk's length) is xored in.
#include <cuda_runtime.h>

#include <mutex>
#include <stdexcept>
#include <string>

#include "crc32c.h"
#include "cuda_ops.h"

namespace resilient {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kLevels = 8;  // log2(kThreads)

struct ShiftOps {
  uint32_t m[kLevels][32];
};

__constant__ uint32_t c_table[256];

std::string why_unavailable() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  }
  if (n == 0) return "no device found";
  return "";
}

void ensure_device() {
  static std::once_flag once;
  static std::string why;
  std::call_once(once, [] { why = why_unavailable(); });
  if (!why.empty()) throw std::runtime_error("no CUDA device: " + why);
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorName(e) + ": " +
                             cudaGetErrorString(e));
}

inline cudaStream_t S(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
inline cudaEvent_t E(uintptr_t e) { return reinterpret_cast<cudaEvent_t>(e); }

__device__ __forceinline__ uint32_t dev_times(const uint32_t* op, uint32_t vec) {
  uint32_t sum = 0;
#pragma unroll
  for (int i = 0; i < 32; ++i)
    if ((vec >> i) & 1u) sum ^= op[i];
  return sum;
}

__global__ void crc_kernel(const uint8_t* __restrict__ data, unsigned long long n,
                           unsigned long long chunk, unsigned int seg, const ShiftOps ops,
                           uint32_t init_full, uint32_t init_last, uint32_t* __restrict__ out) {
  __shared__ uint32_t table[256];
  __shared__ uint32_t lanes[kThreads];
  const int tid = threadIdx.x;
  table[tid] = c_table[tid];
  __syncthreads();
  const unsigned long long start = static_cast<unsigned long long>(blockIdx.x) * chunk;
  const unsigned long long len = (n - start < chunk) ? n - start : chunk;
  const unsigned long long pad = static_cast<unsigned long long>(seg) * kThreads - len;
  unsigned long long v = static_cast<unsigned long long>(tid) * seg;
  const unsigned long long vend = v + seg;
  if (v < pad) v = pad;
  const uint8_t* p = data + start - pad;
  uint32_t c = 0;
  // Bytes until 4-byte alignment, then words, then the tail.
  for (; v < vend && ((reinterpret_cast<uintptr_t>(p + v)) & 3); ++v)
    c = table[(c ^ p[v]) & 0xff] ^ (c >> 8);
  for (; v + 4 <= vend; v += 4) {
    uint32_t w = __ldg(reinterpret_cast<const unsigned int*>(p + v));
    c ^= w;
    c = table[c & 0xff] ^ (c >> 8);
    c = table[c & 0xff] ^ (c >> 8);
    c = table[c & 0xff] ^ (c >> 8);
    c = table[c & 0xff] ^ (c >> 8);
  }
  for (; v < vend; ++v) c = table[(c ^ p[v]) & 0xff] ^ (c >> 8);
  lanes[tid] = c;
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kLevels; ++j) {
    const int stride = 1 << j;
    if ((tid & (2 * stride - 1)) == 0) lanes[tid] = dev_times(ops.m[j], lanes[tid]) ^ lanes[tid + stride];
    __syncthreads();
  }
  if (tid == 0) out[blockIdx.x] = ~(lanes[0] ^ (len == chunk ? init_full : init_last));
}

uint32_t init_term(uint64_t len) {
  uint32_t op[32];
  crc32c_zeros_op_cached(op, len);
  return gf2_times(op, 0xFFFFFFFFu);
}

void upload_table() {
  static std::once_flag once;
  std::call_once(once, [] {
    uint32_t t[256];
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kCrc32cPoly : c >> 1;
      t[i] = c;
    }
    check(cudaMemcpyToSymbol(c_table, t, sizeof(t)), "cudaMemcpyToSymbol(crc table)");
  });
}

}  // namespace

bool compiled() { return true; }

bool available(std::string* why) {
  std::string w = why_unavailable();
  if (why) *why = w;
  return w.empty();
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

void set_device(int device) {
  ensure_device();
  check(cudaSetDevice(device), "cudaSetDevice");
}

void host_register(uintptr_t ptr, size_t n) {
  ensure_device();
  check(cudaHostRegister(reinterpret_cast<void*>(ptr), n, cudaHostRegisterPortable), "cudaHostRegister");
}

void host_unregister(uintptr_t ptr) {
  ensure_device();
  check(cudaHostUnregister(reinterpret_cast<void*>(ptr)), "cudaHostUnregister");
}

uintptr_t stream_create() {
  ensure_device();
  cudaStream_t s;
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
  return reinterpret_cast<uintptr_t>(s);
}

void stream_destroy(uintptr_t stream) {
  ensure_device();
  check(cudaStreamDestroy(S(stream)), "cudaStreamDestroy");
}

void stream_synchronize(uintptr_t stream) {
  ensure_device();
  check(cudaStreamSynchronize(S(stream)), "cudaStreamSynchronize");
}

void stream_wait_event(uintptr_t stream, uintptr_t event) {
  ensure_device();
  check(cudaStreamWaitEvent(S(stream), E(event), 0), "cudaStreamWaitEvent");
}

static void copy_chunked(uintptr_t dst, uintptr_t src, size_t n, uintptr_t stream, size_t chunk,
                         cudaMemcpyKind kind, const char* what) {
  ensure_device();
  if (chunk == 0) chunk = n ? n : 1;
  for (size_t off = 0; off < n; off += chunk) {
    size_t len = n - off < chunk ? n - off : chunk;
    check(cudaMemcpyAsync(reinterpret_cast<void*>(dst + off), reinterpret_cast<const void*>(src + off),
                          len, kind, S(stream)),
          what);
  }
}

void copy_d2h_async(uintptr_t dst, uintptr_t src, size_t n, uintptr_t stream, size_t chunk) {
  copy_chunked(dst, src, n, stream, chunk, cudaMemcpyDeviceToHost, "cudaMemcpyAsync(D2H)");
}

void copy_h2d_async(uintptr_t dst, uintptr_t src, size_t n, uintptr_t stream, size_t chunk) {
  copy_chunked(dst, src, n, stream, chunk, cudaMemcpyHostToDevice, "cudaMemcpyAsync(H2D)");
}

uintptr_t event_create(bool timing) {
  ensure_device();
  cudaEvent_t e;
  check(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming), "cudaEventCreate");
  return reinterpret_cast<uintptr_t>(e);
}

void event_destroy(uintptr_t event) {
  ensure_device();
  check(cudaEventDestroy(E(event)), "cudaEventDestroy");
}

void event_record(uintptr_t event, uintptr_t stream) {
  ensure_device();
  check(cudaEventRecord(E(event), S(stream)), "cudaEventRecord");
}

bool event_query(uintptr_t event) {
  ensure_device();
  cudaError_t e = cudaEventQuery(E(event));
  if (e == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  check(e, "cudaEventQuery");
  return true;
}

void event_synchronize(uintptr_t event) {
  ensure_device();
  check(cudaEventSynchronize(E(event)), "cudaEventSynchronize");
}

float event_elapsed_ms(uintptr_t start, uintptr_t end) {
  ensure_device();
  float ms = 0;
  check(cudaEventElapsedTime(&ms, E(start), E(end)), "cudaEventElapsedTime");
  return ms;
}

namespace {

// Queues the CRC kernel on `stream` writing nchunks results to device memory, then a copy of them to
// `host_out` (page-locked, or pageable for the synchronous caller); frees the device buffer in stream order.
void crc_enqueue(uintptr_t ptr, size_t n, size_t chunk, uintptr_t stream, uint32_t* host_out, size_t nchunks) {
  if (nchunks > 0x7fffffffu) throw std::invalid_argument("too many chunks for one kernel launch");
  upload_table();
  const size_t seg = (chunk + kThreads - 1) / kThreads;
  if (seg > 0xffffffffu) throw std::invalid_argument("chunk size too large");
  ShiftOps ops;
  // Ten GF(2) operators per launch, cached: computed afresh they cost ~0.15-0.2 ms per tensor on the
  // calling thread, 5+ ms per GB of 32 MiB tensors of blocking time in an overlapped snapshot.
  for (int j = 0; j < kLevels; ++j) crc32c_zeros_op_cached(ops.m[j], static_cast<uint64_t>(seg) << j);
  const size_t last = n - (nchunks - 1) * chunk;
  const uint32_t init_full = init_term(chunk), init_last = init_term(last);
  uint32_t* dev_out = nullptr;
  check(cudaMallocAsync(reinterpret_cast<void**>(&dev_out), nchunks * sizeof(uint32_t), S(stream)),
        "cudaMallocAsync");
  crc_kernel<<<static_cast<unsigned>(nchunks), kThreads, 0, S(stream)>>>(
      reinterpret_cast<const uint8_t*>(ptr), n, chunk, static_cast<unsigned>(seg), ops, init_full,
      init_last, dev_out);
  cudaError_t launch = cudaGetLastError();
  cudaError_t copy = cudaMemcpyAsync(host_out, dev_out, nchunks * sizeof(uint32_t), cudaMemcpyDeviceToHost,
                                     S(stream));
  cudaError_t free_err = cudaFreeAsync(dev_out, S(stream));
  if (launch != cudaSuccess || copy != cudaSuccess || free_err != cudaSuccess)
    cudaStreamSynchronize(S(stream));  // nothing may still write into host_out once we throw
  check(launch, "crc32c kernel launch");
  check(copy, "cudaMemcpyAsync(crc results)");
  check(free_err, "cudaFreeAsync(crc results)");
}

size_t chunks_of(size_t n, size_t chunk) {
  if (chunk == 0) throw std::invalid_argument("chunk size must be positive");
  return n == 0 ? 0 : (n + chunk - 1) / chunk;
}

}  // namespace

std::vector<uint32_t> crc32c_device(uintptr_t ptr, size_t n, size_t chunk, uintptr_t stream) {
  ensure_device();
  const size_t nchunks = chunks_of(n, chunk);
  std::vector<uint32_t> out(nchunks);
  if (nchunks == 0) return out;
  crc_enqueue(ptr, n, chunk, stream, out.data(), nchunks);
  check(cudaStreamSynchronize(S(stream)), "cudaStreamSynchronize(crc)");
  return out;
}

size_t crc32c_device_async(uintptr_t ptr, size_t n, size_t chunk, uintptr_t stream, uintptr_t out) {
  ensure_device();
  const size_t nchunks = chunks_of(n, chunk);
  if (nchunks == 0) return 0;
  if (out == 0) throw std::invalid_argument("crc32c_device_async needs an output address");
  crc_enqueue(ptr, n, chunk, stream, reinterpret_cast<uint32_t*>(out), nchunks);
  return nchunks;
}

}  // namespace cuda
}  // namespace resilient
