"""CUDA tensors in and out of a segment: the mapping registered once, copies on a dedicated stream.

With a CUDA-enabled native module, D2H copies go straight into the registered (page-locked) segment
mapping on a side stream that first waits for the caller's current stream, and the GPU computes the
per-chunk CRC32C where the data lives (the same values the host computes). Without one (CPU-only
build, pure-Python twin), tensors are staged through torch's own copies and checksummed on the host.
``write_async`` queues the same copies and CRC kernels without waiting and returns a ``CudaTicket``.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import torch

from resilient.errors import StoreError
from resilient.logs import get_logger

_log = get_logger(__name__)
_COPY_CHUNK = 64 << 20


class CudaPath:
    """Per-segment CUDA copy path (registration is lazy and undone by ``close``)."""

    def __init__(self, be: ModuleType, base: int, size: int) -> None:
        self._be = be
        self._base = base
        self._size = size
        self._registered = False
        self._streams: dict[tuple[int, str], torch.cuda.Stream] = {}
        self.native = bool(be.cuda_available())

    def _ensure_registered(self) -> None:
        if not self._registered:
            try:
                self._be.register(self._base, self._size)
            except RuntimeError as exc:
                raise StoreError(f"Cannot register the segment mapping ({self._size} bytes) with CUDA: {exc}.") from exc
            self._registered = True

    def _stream(self, device: torch.device, role: str = "copy") -> torch.cuda.Stream:
        """The dedicated stream for ``role`` on ``device``, ordered after the caller's current stream."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._streams.get((index, role))
        if stream is None:
            stream = self._streams[(index, role)] = torch.cuda.Stream(device=index)
        stream.wait_stream(torch.cuda.current_stream(index))
        return stream

    def write(self, items: list[tuple[int, torch.Tensor]], chunk: int) -> list[list[int]]:
        """D2H each (dst address, CUDA tensor); returns each tensor's chunk CRCs."""
        if not self.native:
            return [self._staged_write(dst, t, chunk) for dst, t in items]
        self._ensure_registered()
        copies: list[torch.cuda.Stream] = []
        out = []
        for dst, t in items:  # copies queue on one stream while checksums run on another
            n = t.numel() * t.element_size()
            self._be.cuda_set_device(t.device.index)
            stream = self._stream(t.device)
            self._be.copy_d2h_async(dst, t.data_ptr(), n, stream.cuda_stream, _COPY_CHUNK)
            copies.append(stream)
        for dst, t in items:
            n = t.numel() * t.element_size()
            self._be.cuda_set_device(t.device.index)
            checksum = self._stream(t.device, "checksum")
            out.append(list(self._be.crc32c_device(t.data_ptr(), n, chunk, checksum.cuda_stream)))
        for stream in copies:
            stream.synchronize()
        return out

    @property
    def can_overlap(self) -> bool:
        """Whether ``write_async`` can leave the copy running (native CUDA with the queued CRC kernel)."""
        return self.native and hasattr(self._be, "crc32c_device_async")

    def write_async(self, items: list[tuple[int, torch.Tensor]], chunk: int) -> "CudaTicket":
        """Queue the D2H copy and the GPU CRCs of each (dst address, CUDA tensor) without waiting.

        Both side streams first wait for an event recorded on the caller's current stream, so the copy sees
        every kernel queued before this call; the caller must not change the tensors until the ticket is
        done. Each tensor is marked as used by the side streams, so the caching allocator never reuses its
        memory before the copy finished even if the caller drops it."""
        if not self.can_overlap:
            raise StoreError("write_async needs a CUDA-enabled resilient._native with crc32c_device_async.")
        self._ensure_registered()
        counts = [-(-(t.numel() * t.element_size()) // chunk) for _, t in items]
        crcs = torch.empty(max(sum(counts), 1), dtype=torch.int32, pin_memory=True)
        used: dict[int, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}
        for _, t in items:
            index = t.device.index if t.device.index is not None else torch.cuda.current_device()
            if index not in used:
                used[index] = (self._stream(t.device), self._stream(t.device, "checksum"))
        for dst, t in items:  # copies on one stream (copy engine), CRC kernels on the other (SMs)
            n = t.numel() * t.element_size()
            self._be.cuda_set_device(t.device.index)
            copy, _ = used[t.device.index]
            self._be.copy_d2h_async(dst, t.data_ptr(), n, copy.cuda_stream, _COPY_CHUNK)
        pos = 0
        for (dst, t), k in zip(items, counts):
            n = t.numel() * t.element_size()
            self._be.cuda_set_device(t.device.index)
            _, checksum = used[t.device.index]
            self._be.crc32c_device_async(t.data_ptr(), n, chunk, checksum.cuda_stream, crcs.data_ptr() + 4 * pos)
            pos += k
        done = []
        for index, (copy, checksum) in used.items():
            for stream in (copy, checksum):
                event = torch.cuda.Event()
                event.record(stream)
                done.append((index, event))
        for _, t in items:
            copy, checksum = used[t.device.index]
            t.record_stream(copy)
            t.record_stream(checksum)
        return CudaTicket(done, crcs, counts, [t for _, t in items])

    def read(self, items: list[tuple[torch.Tensor, int]], chunk: int) -> list[list[int]]:
        """H2D into each (CUDA tensor, src address); returns CRCs of what landed on the GPU."""
        if not self.native:
            return [self._staged_read(t, src, chunk) for t, src in items]
        self._ensure_registered()
        out = []
        for t, src in items:
            n = t.numel() * t.element_size()
            self._be.cuda_set_device(t.device.index)
            stream = self._stream(t.device)
            self._be.copy_h2d_async(t.data_ptr(), src, n, stream.cuda_stream, _COPY_CHUNK)
            out.append(list(self._be.crc32c_device(t.data_ptr(), n, chunk, stream.cuda_stream)))
            torch.cuda.current_stream(t.device).wait_stream(stream)
        return out

    def _staged_write(self, dst: int, t: torch.Tensor, chunk: int) -> list[int]:
        host = t.detach().to("cpu")
        n = host.numel() * host.element_size()
        return list(self._be.copy_checksum_batch([dst], [host.data_ptr()], [n], chunk))

    def _staged_read(self, t: torch.Tensor, src: int, chunk: int) -> list[int]:
        host = torch.empty(t.shape, dtype=t.dtype)
        n = host.numel() * host.element_size()
        crcs = list(self._be.copy_checksum_batch([host.data_ptr()], [src], [n], chunk))
        t.copy_(host)
        return crcs

    def close(self) -> None:
        for stream in self._streams.values():
            stream.synchronize()
        if self._registered:
            try:
                self._be.unregister(self._base)
            except RuntimeError as exc:
                _log.warning("cudaHostUnregister of a segment mapping failed: %s", exc)
            self._registered = False


class CudaTicket:
    """Copies and CRC kernels of one ``CudaPath.write_async`` in flight: ``done`` polls, ``wait`` blocks."""

    def __init__(self, events: list[tuple[int, torch.cuda.Event]], crcs: torch.Tensor, counts: list[int],
                 tensors: list[torch.Tensor]) -> None:
        self._events = events
        self._crcs = crcs
        self._counts = counts
        self._tensors = tensors  # kept alive until the copies finished
        self._result: list[list[int]] | None = None

    def done(self) -> bool:
        return self._result is not None or all(event.query() for _, event in self._events)

    def stream_wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Order later work of ``stream`` (default: each device's current stream) after the copies and CRC
        kernels, on the GPU: the caller's thread does not block."""
        for index, event in self._events:
            (stream if stream is not None else torch.cuda.current_stream(index)).wait_event(event)

    def wait(self) -> list[list[int]]:
        """Block until every copy and CRC landed; returns each tensor's chunk CRCs (as ``write`` does)."""
        if self._result is None:
            try:
                for _, event in self._events:
                    event.synchronize()
            except RuntimeError as exc:
                raise StoreError(f"An asynchronous device-to-host snapshot copy failed: {exc}.") from exc
            flat = self._crcs.numpy().view(np.uint32).tolist()
            out, pos = [], 0
            for k in self._counts:
                out.append(flat[pos : pos + k])
                pos += k
            self._result = out
            self._tensors = []
            self._events = []
        return self._result
