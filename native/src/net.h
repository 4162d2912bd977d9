// Bulk byte movement over an already connected TCP socket (the Python side does the handshake).
//
// Every call works on blocking or non-blocking sockets: it polls with an idle timeout (no progress for
// timeout_s seconds -> ETIMEDOUT) and throws NetError(errno) on failure. recv_checksum receives straight
// into the destination memory and computes the per-chunk CRC32C of the listed regions as bytes arrive.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace resilient {

struct NetError : std::runtime_error {
  int err;
  NetError(int e, const std::string& what) : std::runtime_error(what), err(e) {}
};

int64_t send_file_range(int sock, int file_fd, int64_t offset, int64_t n, double timeout_s);
int64_t send_buffer(int sock, const uint8_t* p, int64_t n, double timeout_s);
// Returns bytes received (< n when the peer closed early). `crcs` gets one entry per chunk of every
// (offset, size) region, in order; chunks not fully received hold the checksum of what arrived.
int64_t recv_checksum(int sock, uint8_t* base, int64_t n,
                      const std::vector<std::pair<uint64_t, uint64_t>>& regions, size_t chunk,
                      double timeout_s, std::vector<uint32_t>* crcs);

}  // namespace resilient
