#include "net.h"

#include <errno.h>
#include <poll.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "copy_engine.h"
#include "crc32c.h"
#include "failpoint.h"

namespace resilient {
namespace {

void wait_ready(int sock, short events, double timeout_s, const char* what) {
  int ms = timeout_s <= 0 ? -1 : static_cast<int>(timeout_s * 1000.0 + 0.5);
  for (;;) {
    pollfd p{sock, events, 0};
    int r = ::poll(&p, 1, ms);
    if (r > 0) {
      if ((p.revents & POLLNVAL)) throw NetError(EBADF, std::string(what) + ": socket is not open");
      return;  // readable/writable or error: the next call reports the error
    }
    if (r == 0)
      throw NetError(ETIMEDOUT, std::string(what) + ": no progress for " + std::to_string(timeout_s) +
                                    " s (peer unresponsive)");
    if (errno != EINTR) throw NetError(errno, std::string(what) + ": poll failed");
  }
}

constexpr int64_t kMaxIo = 1ll << 30;

// A failpoint half-way through a transfer of n bytes: while it is armed, I/O stops at n/2 once so that
// the point fires with exactly half of the bytes moved. Unarmed, cap() returns its argument unchanged.
class MidPoint {
 public:
  MidPoint(const char* name, int64_t n) : name_(name), half_(n / 2), on_(n > 1 && fp::armed(name)) {}
  int64_t cap(int64_t done, int64_t want) const { return on_ && done < half_ ? std::min(want, half_ - done) : want; }
  void passed(int64_t done) {
    if (on_ && done >= half_) {
      on_ = false;
      fp::hit(name_);
    }
  }

 private:
  const char* name_;
  int64_t half_;
  bool on_;
};

}  // namespace

int64_t send_file_range(int sock, int file_fd, int64_t offset, int64_t n, double timeout_s) {
  int64_t sent = 0;
  off_t off = static_cast<off_t>(offset);
  fp::hit("native.send.after_header");
  MidPoint mid("native.send.mid_stream", n);
  while (sent < n) {
    wait_ready(sock, POLLOUT, timeout_s, "sendfile");
    ssize_t r = ::sendfile(sock, file_fd, &off, static_cast<size_t>(mid.cap(sent, std::min(n - sent, kMaxIo))));
    if (r > 0) {
      sent += r;
      mid.passed(sent);
      continue;
    }
    if (r == 0) throw NetError(EIO, "sendfile: source file ended before the range was sent");
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      wait_ready(sock, POLLOUT, timeout_s, "sendfile");
      continue;
    }
    throw NetError(errno, "sendfile failed after " + std::to_string(sent) + " of " +
                              std::to_string(n) + " bytes");
  }
  return sent;
}

int64_t send_buffer(int sock, const uint8_t* p, int64_t n, double timeout_s) {
  int64_t sent = 0;
  fp::hit("native.send.after_header");
  MidPoint mid("native.send.mid_stream", n);
  while (sent < n) {
    wait_ready(sock, POLLOUT, timeout_s, "send");
    ssize_t r = ::send(sock, p + sent, static_cast<size_t>(mid.cap(sent, std::min(n - sent, kMaxIo))),
                       MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r > 0) {
      sent += r;
      mid.passed(sent);
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      wait_ready(sock, POLLOUT, timeout_s, "send");
      continue;
    }
    throw NetError(r < 0 ? errno : EIO, "send failed after " + std::to_string(sent) + " of " +
                                            std::to_string(n) + " bytes");
  }
  return sent;
}

int64_t recv_checksum(int sock, uint8_t* base, int64_t n,
                      const std::vector<std::pair<uint64_t, uint64_t>>& regions, size_t chunk,
                      double timeout_s, std::vector<uint32_t>* crcs) {
  if (chunk == 0) throw NetError(EINVAL, "chunk size must be positive");
  struct Chunk {
    uint64_t start, end;
  };
  std::vector<Chunk> chunks;
  for (const auto& r : regions) {
    if (r.first + r.second > static_cast<uint64_t>(n))
      throw NetError(EINVAL, "region lies outside the receive range");
    for (uint64_t off = 0; off < r.second; off += chunk)
      chunks.push_back({r.first + off, r.first + std::min<uint64_t>(r.second, off + chunk)});
  }
  crcs->assign(chunks.size(), 0);
  size_t ci = 0;
  int64_t got = 0;
  MidPoint mid("native.recv.mid_stream", n);
  while (got < n) {
    wait_ready(sock, POLLIN, timeout_s, "recv");  // also bounds blocking sockets by the idle timeout
    ssize_t r = ::recv(sock, base + got, static_cast<size_t>(mid.cap(got, std::min(n - got, kMaxIo))), MSG_DONTWAIT);
    if (r == 0) break;  // peer closed
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        wait_ready(sock, POLLIN, timeout_s, "recv");
        continue;
      }
      throw NetError(errno, "recv failed after " + std::to_string(got) + " of " + std::to_string(n) +
                                " bytes");
    }
    const uint64_t a = static_cast<uint64_t>(got), b = a + static_cast<uint64_t>(r);
    while (ci < chunks.size() && chunks[ci].start < b) {
      uint64_t s = std::max(chunks[ci].start, a), e = std::min(chunks[ci].end, b);
      if (s < e) (*crcs)[ci] = crc32c((*crcs)[ci], base + s, e - s);
      if (chunks[ci].end <= b)
        ++ci;
      else
        break;
    }
    got += r;
    mid.passed(got);
  }
  if (got == n && n > 0) fp::hit("native.recv.before_ack");  // all in; the caller verifies, seals, acks
  return got;
}

}  // namespace resilient
