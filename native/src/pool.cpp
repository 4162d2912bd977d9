#include "pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace resilient {
namespace {

class Pool {
 public:
  explicit Pool(size_t workers) {
    for (size_t i = 0; i < workers; ++i) threads_.emplace_back([this, i] { loop(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  size_t workers() const { return threads_.size(); }

  // Returns false when another job is running (the caller then runs alone).
  bool run(size_t n, size_t helpers, const std::function<void(size_t)>& fn) {
    std::unique_lock<std::mutex> job_lock(job_mu_, std::try_to_lock);
    if (!job_lock.owns_lock()) return false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      n_ = n;
      next_.store(0);
      helpers_ = helpers;
      active_ = 0;
      joined_ = 0;
      ++generation_;
    }
    cv_.notify_all();
    work();
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] { return active_ == 0 && joined_ == joined_target(); });
    fn_ = nullptr;
    return true;
  }

 private:
  size_t joined_target() const { return std::min(helpers_, threads_.size()); }

  void work() {
    for (;;) {
      size_t i = next_.fetch_add(1);
      if (i >= n_) return;
      (*fn_)(i);
    }
  }

  void loop(size_t id) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (id >= helpers_) continue;
      ++active_;
      ++joined_;
      lock.unlock();
      work();
      lock.lock();
      --active_;
      done_cv_.notify_all();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex job_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable done_cv_;
  const std::function<void(size_t)>* fn_ = nullptr;
  size_t n_ = 0;
  std::atomic<size_t> next_{0};
  size_t helpers_ = 0;
  size_t active_ = 0;
  size_t joined_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

std::mutex g_pool_mu;
Pool* g_pool = nullptr;  // leaked on purpose: joining threads at exit races interpreter teardown

void after_fork_child() { g_pool = nullptr; }  // the parent's threads are gone in the child

Pool* pool() {
  static const int registered = pthread_atfork(nullptr, nullptr, after_fork_child);
  (void)registered;
  std::lock_guard<std::mutex> lock(g_pool_mu);
  if (!g_pool) g_pool = new Pool(default_threads() - 1);
  return g_pool;
}

}  // namespace

size_t default_threads() {
  if (const char* v = std::getenv("RESILIENT_COPY_THREADS")) {
    long n = std::strtol(v, nullptr, 10);
    if (n > 0) return static_cast<size_t>(std::min(n, 64L));
  }
  size_t hw = std::thread::hardware_concurrency();
  return std::max<size_t>(1, std::min<size_t>(hw ? hw : 1, 8));
}

void parallel_for(size_t n, size_t threads, const std::function<void(size_t)>& fn) {
  if (threads == 0) threads = default_threads();
  threads = std::min(threads, n);
  if (threads <= 1) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  Pool* p = pool();
  if (p->workers() == 0 || !p->run(n, threads - 1, fn)) {
    for (size_t i = 0; i < n; ++i) fn(i);
  }
}

}  // namespace resilient
