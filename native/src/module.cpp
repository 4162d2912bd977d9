// Python bindings of resilient._native: thin wrappers that take raw addresses, sizes and handles,
// release the GIL for anything long, and map failures to Python exceptions (OSError with errno for the
// network, RuntimeError for CUDA, ValueError for bad arguments). The pure-Python twin
// resilient/store/_pynative.py mirrors every function here and is the reference in tests.
//
// Failpoints (failpoint.h, armed by $RESILIENT_FAILPOINTS): native.copy.after_data when
// copy_checksum_batch has copied (in a worker's snapshot: the data is in the slot, the seal record not yet
// written); native.seal.before_flip / native.seal.after_flip around a non-zero store_u64_release (the
// flip that seals a slot: a worker's snapshot or a received replica); the transport's points are in
// net.cpp. A firing is reported through resilient.events.emit("failpoint.fired", native=True); raise and
// enospc surface as resilient.errors.FailpointError and OSError(ENOSPC).
#include <errno.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>
#include <vector>

#include "copy_engine.h"
#include "crc32c.h"
#include "cuda_ops.h"
#include "failpoint.h"
#include "net.h"
#include "pool.h"

namespace py = pybind11;
using namespace resilient;

namespace {

constexpr int kVersion = 1;

std::vector<Region> make_regions(const std::vector<uint64_t>& dsts, const std::vector<uint64_t>& srcs,
                                 const std::vector<uint64_t>& sizes) {
  if (srcs.size() != sizes.size() || (!dsts.empty() && dsts.size() != sizes.size()))
    throw py::value_error("dsts, srcs and sizes must have the same length");
  std::vector<Region> regions(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] && !srcs[i]) throw py::value_error("null source address for region " + std::to_string(i));
    regions[i] = {dsts.empty() ? nullptr : reinterpret_cast<uint8_t*>(dsts[i]),
                  reinterpret_cast<const uint8_t*>(srcs[i]), static_cast<size_t>(sizes[i])};
    if (!dsts.empty() && sizes[i] && !dsts[i])
      throw py::value_error("null destination address for region " + std::to_string(i));
  }
  return regions;
}

void check_chunk(uint64_t chunk) {
  if (chunk == 0) throw py::value_error("chunk must be a positive number of bytes");
}

[[noreturn]] void raise_os(const NetError& e) {
  py::object err = py::module_::import("builtins").attr("OSError")(e.err, e.what());
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
  throw py::error_already_set();
}

py::buffer_info readable(const py::buffer& b) { return b.request(); }

// Failpoint reporter: the Python event stream, so the event carries the process's identity.
void report_failpoint(const char* name, const char* action) {
  if (!Py_IsInitialized()) {
    fp::write_event_line(name, action);
    return;
  }
  py::gil_scoped_acquire gil;
  try {
    py::module_::import("resilient.events")
        .attr("emit")("failpoint.fired", py::arg("name") = name, py::arg("action") = action,
                      py::arg("native") = true);
  } catch (py::error_already_set& e) {
    e.discard_as_unraisable("resilient._native failpoint reporter");
    fp::write_event_line(name, action);
  }
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "resilient native shard store engine (CRC32C copy engine, bulk TCP, CUDA copies)";
  m.attr("VERSION") = kVersion;

  fp::set_reporter(&report_failpoint);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const fp::FailpointFired& e) {
      if (e.err) {
        py::object err = py::module_::import("builtins").attr("OSError")(e.err, e.what());
        PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
      } else {
        py::object cls = py::module_::import("resilient.errors").attr("FailpointError");
        PyErr_SetString(cls.ptr(), e.what());
      }
    }
  });
  m.def("failpoint_hit", [](const std::string& name) {
        py::gil_scoped_release nogil;
        fp::hit(name.c_str());
      }, py::arg("name"), "Mark the native failpoint `name` (fires its action when armed).");
  m.def("failpoint_names", &fp::names, "The names of the failpoints this module marks.");
  m.def("failpoints_armed", &fp::armed_spec, "The armed native failpoints as name=action text.");

  m.def("crc32c", [](const py::buffer& data, uint32_t seed) {
        py::buffer_info info = readable(data);
        size_t n = static_cast<size_t>(info.size * info.itemsize);
        const void* p = info.ptr;
        py::gil_scoped_release nogil;
        return crc32c(seed, p, n);
      }, py::arg("data"), py::arg("seed") = 0);
  m.def("crc32c_addr", [](uint64_t addr, uint64_t n, uint32_t seed) {
        py::gil_scoped_release nogil;
        return crc32c(seed, reinterpret_cast<const void*>(addr), n);
      }, py::arg("addr"), py::arg("n"), py::arg("seed") = 0);
  m.def("crc32c_combine", &crc32c_combine, py::arg("crc_a"), py::arg("crc_b"), py::arg("len_b"));
  m.def("crc32c_hw_available", &crc32c_hw_available);
  m.def("crc32c_force_software", &crc32c_force_software, py::arg("on"));
  m.def("default_threads", &default_threads);

  // stop_word / stop_above: see StopWhen (copy_engine.h); returns None when the copy was stopped.
  m.def("copy_checksum_batch",
        [](const std::vector<uint64_t>& dsts, const std::vector<uint64_t>& srcs,
           const std::vector<uint64_t>& sizes, uint64_t chunk, size_t threads, uint64_t stop_word,
           int64_t stop_above) -> py::object {
          check_chunk(chunk);
          if (stop_word & 7) throw py::value_error("stop_word must be 8-byte aligned");
          auto regions = make_regions(dsts, srcs, sizes);
          StopWhen stop{reinterpret_cast<const int64_t*>(stop_word), stop_above};
          bool stopped = false;
          std::vector<uint32_t> crcs;
          {
            py::gil_scoped_release nogil;
            crcs = run_regions(regions, chunk, threads, true, true, stop, &stopped);
            if (!stopped) fp::hit("native.copy.after_data");
          }
          if (stopped) return py::none();
          return py::cast(crcs);
        },
        py::arg("dsts"), py::arg("srcs"), py::arg("sizes"), py::arg("chunk"), py::arg("threads") = 0,
        py::arg("stop_word") = 0, py::arg("stop_above") = 0);
  m.def("checksum_batch",
        [](const std::vector<uint64_t>& addrs, const std::vector<uint64_t>& sizes, uint64_t chunk,
           size_t threads) {
          check_chunk(chunk);
          auto regions = make_regions({}, addrs, sizes);
          py::gil_scoped_release nogil;
          return run_regions(regions, chunk, threads, false, true);
        },
        py::arg("addrs"), py::arg("sizes"), py::arg("chunk"), py::arg("threads") = 0);
  m.def("copy_batch",
        [](const std::vector<uint64_t>& dsts, const std::vector<uint64_t>& srcs,
           const std::vector<uint64_t>& sizes, size_t threads) {
          auto regions = make_regions(dsts, srcs, sizes);
          py::gil_scoped_release nogil;
          run_regions(regions, 4u << 20, threads, true, false);
        },
        py::arg("dsts"), py::arg("srcs"), py::arg("sizes"), py::arg("threads") = 0);

  m.def("store_u64_release", [](uint64_t addr, uint64_t value) {
        if (addr & 7) throw py::value_error("address must be 8-byte aligned");
        if (value != 0 && fp::any_armed()) {
          py::gil_scoped_release nogil;
          fp::hit("native.seal.before_flip");
          __atomic_store_n(reinterpret_cast<uint64_t*>(addr), value, __ATOMIC_SEQ_CST);
          fp::hit("native.seal.after_flip");
          return;
        }
        __atomic_store_n(reinterpret_cast<uint64_t*>(addr), value, __ATOMIC_SEQ_CST);
      }, py::arg("addr"), py::arg("value"));
  m.def("load_u64_acquire", [](uint64_t addr) {
        if (addr & 7) throw py::value_error("address must be 8-byte aligned");
        return __atomic_load_n(reinterpret_cast<const uint64_t*>(addr), __ATOMIC_SEQ_CST);
      }, py::arg("addr"));

  m.def("send_file_range", [](int sock, int file_fd, int64_t offset, int64_t n, double timeout_s) {
        try {
          py::gil_scoped_release nogil;
          return send_file_range(sock, file_fd, offset, n, timeout_s);
        } catch (const NetError& e) {
          raise_os(e);
        }
      }, py::arg("sock_fd"), py::arg("file_fd"), py::arg("offset"), py::arg("n"), py::arg("timeout_s"));
  m.def("send_addr", [](int sock, uint64_t addr, int64_t n, double timeout_s) {
        try {
          py::gil_scoped_release nogil;
          return send_buffer(sock, reinterpret_cast<const uint8_t*>(addr), n, timeout_s);
        } catch (const NetError& e) {
          raise_os(e);
        }
      }, py::arg("sock_fd"), py::arg("addr"), py::arg("n"), py::arg("timeout_s"));
  m.def("recv_checksum",
        [](int sock, uint64_t addr, int64_t n, const std::vector<std::pair<uint64_t, uint64_t>>& regions,
           uint64_t chunk, double timeout_s) {
          check_chunk(chunk);
          std::vector<uint32_t> crcs;
          int64_t got = 0;
          try {
            py::gil_scoped_release nogil;
            got = recv_checksum(sock, reinterpret_cast<uint8_t*>(addr), n, regions, chunk, timeout_s, &crcs);
          } catch (const NetError& e) {
            raise_os(e);
          }
          return py::make_tuple(got, crcs);
        },
        py::arg("sock_fd"), py::arg("addr"), py::arg("n"), py::arg("regions"), py::arg("chunk"),
        py::arg("timeout_s"));
  m.def("blast_send", [](int sock, uint64_t addr, int64_t n, double timeout_s) {
        try {
          py::gil_scoped_release nogil;
          return send_buffer(sock, reinterpret_cast<const uint8_t*>(addr), n, timeout_s);
        } catch (const NetError& e) {
          raise_os(e);
        }
      }, py::arg("sock_fd"), py::arg("addr"), py::arg("n"), py::arg("timeout_s"),
      "Plain send() loop of n bytes from addr: the raw TCP ceiling for benchmarks.");
  m.def("blast_recv", [](int sock, uint64_t addr, int64_t n, double timeout_s) {
        std::vector<uint32_t> none;
        try {
          py::gil_scoped_release nogil;
          return recv_checksum(sock, reinterpret_cast<uint8_t*>(addr), n, {}, 1, timeout_s, &none);
        } catch (const NetError& e) {
          raise_os(e);
        }
      }, py::arg("sock_fd"), py::arg("addr"), py::arg("n"), py::arg("timeout_s"),
      "Plain recv() loop of n bytes into addr; returns bytes received.");

  // CUDA (always present; raise RuntimeError "no CUDA device: ..." without a usable device).
  m.def("cuda_compiled", &cuda::compiled);
  m.def("cuda_available", []() { return cuda::available(nullptr); });
  m.def("cuda_status", []() {
    std::string why;
    return cuda::available(&why) ? std::string("ok") : why;
  });
  m.def("cuda_device_count", &cuda::device_count);
  m.def("cuda_set_device", &cuda::set_device, py::arg("device"));
  m.def("register", [](uint64_t ptr, uint64_t n) {
        py::gil_scoped_release nogil;
        cuda::host_register(ptr, n);
      }, py::arg("ptr"), py::arg("n"));
  m.def("unregister", [](uint64_t ptr) {
        py::gil_scoped_release nogil;
        cuda::host_unregister(ptr);
      }, py::arg("ptr"));
  m.def("stream_create", &cuda::stream_create);
  m.def("stream_destroy", &cuda::stream_destroy, py::arg("stream"));
  m.def("stream_synchronize", [](uint64_t s) {
        py::gil_scoped_release nogil;
        cuda::stream_synchronize(s);
      }, py::arg("stream"));
  m.def("stream_wait_event", &cuda::stream_wait_event, py::arg("stream"), py::arg("event"));
  m.def("copy_d2h_async", &cuda::copy_d2h_async, py::arg("dst"), py::arg("src"), py::arg("n"),
        py::arg("stream"), py::arg("chunk") = 64ull << 20);
  m.def("copy_h2d_async", &cuda::copy_h2d_async, py::arg("dst"), py::arg("src"), py::arg("n"),
        py::arg("stream"), py::arg("chunk") = 64ull << 20);
  m.def("event_create", &cuda::event_create, py::arg("timing") = false);
  m.def("event_destroy", &cuda::event_destroy, py::arg("event"));
  m.def("event_record", &cuda::event_record, py::arg("event"), py::arg("stream"));
  m.def("event_query", &cuda::event_query, py::arg("event"));
  m.def("event_synchronize", [](uint64_t e) {
        py::gil_scoped_release nogil;
        cuda::event_synchronize(e);
      }, py::arg("event"));
  m.def("event_elapsed_ms", &cuda::event_elapsed_ms, py::arg("start"), py::arg("end"));
  m.def("crc32c_device", [](uint64_t ptr, uint64_t n, uint64_t chunk, uint64_t stream) {
        check_chunk(chunk);
        py::gil_scoped_release nogil;
        return cuda::crc32c_device(ptr, n, chunk, stream);
      }, py::arg("ptr"), py::arg("n"), py::arg("chunk"), py::arg("stream") = 0);
  m.def("crc32c_device_async", [](uint64_t ptr, uint64_t n, uint64_t chunk, uint64_t stream, uint64_t out) {
        check_chunk(chunk);
        py::gil_scoped_release nogil;
        return cuda::crc32c_device_async(ptr, n, chunk, stream, out);
      }, py::arg("ptr"), py::arg("n"), py::arg("chunk"), py::arg("stream"), py::arg("out"),
      "Per-chunk CRC32C of device memory queued on stream; the uint32 results land at out (pinned).");
}
