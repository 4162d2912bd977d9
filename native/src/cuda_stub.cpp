// Stand-in for cuda_ops.cu when the module is built without nvcc: CUDA is reported unavailable and every
// CUDA call fails with a clear "no CUDA device" error.
#include <stdexcept>

#include "cuda_ops.h"

namespace resilient {
namespace cuda {
namespace {
[[noreturn]] void fail() {
  throw std::runtime_error(
      "no CUDA device: resilient._native was built without CUDA support (rebuild with nvcc available "
      "and RESILIENT_CUDA=ON)");
}
}  // namespace

bool compiled() { return false; }
bool available(std::string* why) {
  if (why) *why = "built without CUDA support";
  return false;
}
int device_count() { return 0; }
void set_device(int) { fail(); }
void host_register(uintptr_t, size_t) { fail(); }
void host_unregister(uintptr_t) { fail(); }
uintptr_t stream_create() { fail(); }
void stream_destroy(uintptr_t) { fail(); }
void stream_synchronize(uintptr_t) { fail(); }
void stream_wait_event(uintptr_t, uintptr_t) { fail(); }
void copy_d2h_async(uintptr_t, uintptr_t, size_t, uintptr_t, size_t) { fail(); }
void copy_h2d_async(uintptr_t, uintptr_t, size_t, uintptr_t, size_t) { fail(); }
uintptr_t event_create(bool) { fail(); }
void event_destroy(uintptr_t) { fail(); }
void event_record(uintptr_t, uintptr_t) { fail(); }
bool event_query(uintptr_t) { fail(); }
void event_synchronize(uintptr_t) { fail(); }
float event_elapsed_ms(uintptr_t, uintptr_t) { fail(); }
std::vector<uint32_t> crc32c_device(uintptr_t, size_t, size_t, uintptr_t) { fail(); }
size_t crc32c_device_async(uintptr_t, size_t, size_t, uintptr_t, uintptr_t) { fail(); }

}  // namespace cuda
}  // namespace resilient
