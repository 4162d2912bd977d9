"""CUDA tensors in and out of a segment: the mapping registered once, copies on a dedicated stream.

With a CUDA-enabled native module, D2H copies go straight into the registered (page-locked) segment
mapping on a side stream that first waits for the caller's current stream, and the GPU computes the
per-chunk CRC32C where the data lives (the same values the host computes). Without one (CPU-only
build, pure-Python twin), tensors are staged through torch's own copies and checksummed on the host.
"""

from __future__ import annotations

from types import ModuleType

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
