// CUDA side of the store: host registration of the segment mapping, chunked async D2H/H2D copies on a
// caller-given stream, events, and a CRC32C kernel producing the host's per-chunk checksums.
//
// Handles (streams, events, pointers) are plain integers so no CUDA or torch header leaks out. Built
// from cuda_ops.cu when nvcc is available, else from cuda_stub.cpp; either way every call on a machine
// without a usable device throws std::runtime_error starting with "no CUDA device".
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace resilient {
namespace cuda {

bool compiled();
bool available(std::string* why);
int device_count();
void set_device(int device);
void host_register(uintptr_t ptr, size_t n);
void host_unregister(uintptr_t ptr);
uintptr_t stream_create();
void stream_destroy(uintptr_t stream);
void stream_synchronize(uintptr_t stream);
void stream_wait_event(uintptr_t stream, uintptr_t event);
void copy_d2h_async(uintptr_t dst, uintptr_t src, size_t n, uintptr_t stream, size_t chunk);
void copy_h2d_async(uintptr_t dst, uintptr_t src, size_t n, uintptr_t stream, size_t chunk);
uintptr_t event_create(bool timing);
void event_destroy(uintptr_t event);
void event_record(uintptr_t event, uintptr_t stream);
bool event_query(uintptr_t event);
void event_synchronize(uintptr_t event);
float event_elapsed_ms(uintptr_t start, uintptr_t end);
// Per-chunk CRC32C of device memory; synchronizes `stream` before returning.
std::vector<uint32_t> crc32c_device(uintptr_t ptr, size_t n, size_t chunk, uintptr_t stream);
// The same CRCs queued on `stream` without waiting: ceil(n / chunk) uint32 land at `out` (page-locked host
// memory the caller keeps alive) once the stream reaches them. Returns the number of chunks.
size_t crc32c_device_async(uintptr_t ptr, size_t n, size_t chunk, uintptr_t stream, uintptr_t out);

}  // namespace cuda
}  // namespace resilient
