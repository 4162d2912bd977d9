// A process-wide pool of worker threads for the copy engine.
//
// parallel_for(n, threads, fn) runs fn(i) for every i in [0, n) on up to `threads` threads (the caller
// is one of them) and returns when all are done. One job runs at a time; a caller that finds the pool
// busy runs its job alone on its own thread instead of waiting. After fork() the child gets a fresh
// pool (the parent's threads do not exist there).
#pragma once

#include <cstddef>
#include <functional>

namespace resilient {

size_t default_threads();
void parallel_for(size_t n, size_t threads, const std::function<void(size_t)>& fn);

}  // namespace resilient
