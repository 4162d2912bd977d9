"""One shard's file in the safetensors format, written as a stream and read without extra copies.

A shard file is a plain safetensors file (8-byte little-endian header length, JSON header padded with
spaces to a multiple of 8, then the tensors' bytes back to back), so ``safetensors.safe_open`` and
``safetensors.torch.load_file`` read it. Tensors are laid out by decreasing element size, then by name,
so every tensor starts at an offset aligned to its element size.

Non-tensor state (the snapshot's ``meta`` bytes: pickled RNG states, sampler position, user values) is
kept in the header's ``__metadata__`` as base64 under ``resilient.meta``, beside ``resilient.step``,
``resilient.generation`` and ``resilient.rank``. The whole file, metadata included, is covered by the
file's crc32 in the manifest.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass

import torch

from resilient.errors import CheckpointCorruptError, StateError

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
}
TORCH_DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPES.items()}

META_KEY = "resilient.meta"
_MAX_HEADER = 100 << 20  # safetensors' own limit


@dataclass(frozen=True)
class Planned:
    """A tensor placed in the file: its bytes (a view of the tensor's memory) and byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    data: memoryview


def tensor_bytes(name: str, tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor`` in row-major order, as a view of CPU memory (copies only if needed)."""
    if not isinstance(tensor, torch.Tensor):
        raise StateError(f"State entry {name!r} is a {type(tensor).__name__}, not a torch.Tensor; put non-tensor "
                         f"values in the snapshot's meta bytes.")
    if tensor.dtype not in DTYPES:
        raise StateError(f"Tensor {name!r} has dtype {tensor.dtype}, which a checkpoint cannot store; "
                         f"supported dtypes are {sorted(str(d) for d in DTYPES)}.")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list[Planned]]:
    """The header bytes (length prefix included) and the tensors in file order with their ranges."""
    items = []
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise StateError(f"Tensor name {name!r} cannot be stored; names must be non-empty strings "
                             f"other than '__metadata__'.")
        data = tensor_bytes(name, tensor)
        items.append((name, tensor, data))
    items.sort(key=lambda item: (-item[1].element_size(), item[0]))
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    planned: list[Planned] = []
    offset = 0
    for name, tensor, data in items:
        begin, end = offset, offset + data.nbytes
        dtype = DTYPES[tensor.dtype]
        shape = tuple(int(d) for d in tensor.shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
        planned.append(Planned(name, dtype, shape, begin, end, data))
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return struct.pack("<Q", len(text)) + text, planned


def encode_meta(meta: bytes) -> str:
    return base64.b64encode(bytes(meta)).decode("ascii")


def decode_meta(metadata: dict[str, str], *, where: str) -> bytes:
    try:
        return base64.b64decode(metadata.get(META_KEY, ""), validate=True)
    except (ValueError, TypeError) as exc:
        raise CheckpointCorruptError(f"Shard file {where} has undecodable non-tensor state ({exc}).") from exc


@dataclass(frozen=True)
class Parsed:
    """A shard file's header: its metadata, tensors (name -> (dtype, shape, begin, end)), data start."""

    metadata: dict[str, str]
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]]
    data_start: int


def parse(buf: bytes | bytearray | memoryview, *, where: str) -> Parsed:
    """Parse and check a shard file's header; ``CheckpointCorruptError`` if it is malformed."""
    size = len(buf)
    if size < 8:
        raise CheckpointCorruptError(f"Shard file {where} is {size} bytes long, too short for a header.")
    (hlen,) = struct.unpack_from("<Q", buf, 0)
    if hlen > _MAX_HEADER or 8 + hlen > size:
        raise CheckpointCorruptError(f"Shard file {where} declares a {hlen}-byte header in a {size}-byte file.")
    try:
        header = json.loads(bytes(buf[8:8 + hlen]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointCorruptError(f"Shard file {where} has a header that is not valid JSON ({exc}).") from exc
    if not isinstance(header, dict):
        raise CheckpointCorruptError(f"Shard file {where} has a header that is not a JSON object.")
    data_start = 8 + hlen
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointCorruptError(f"Shard file {where}: tensor {name!r} has a malformed entry ({exc}).") from exc
        if dtype not in TORCH_DTYPES:
            raise CheckpointCorruptError(f"Shard file {where}: tensor {name!r} has unknown dtype {dtype!r}.")
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
        if begin < 0 or end < begin or data_start + end > size or end - begin != numel * itemsize:
            raise CheckpointCorruptError(
                f"Shard file {where}: tensor {name!r} ({dtype}{list(shape)}) has byte range [{begin}, {end}) that "
                f"does not fit its shape or the {size - data_start}-byte data section."
            )
        tensors[name] = (dtype, shape, begin, end)
    return Parsed(metadata={str(k): str(v) for k, v in metadata.items()}, tensors=tensors, data_start=data_start)


def tensor_from(buf: bytearray, parsed: Parsed, name: str) -> torch.Tensor:
    """A tensor viewing ``buf`` (no copy); ``buf`` must stay alive, which the tensor ensures."""
    dtype, shape, begin, end = parsed.tensors[name]
    torch_dtype = TORCH_DTYPES[dtype]
    if end == begin:
        return torch.empty(shape, dtype=torch_dtype)
    flat = torch.frombuffer(buf, dtype=torch.uint8, count=end - begin, offset=parsed.data_start + begin)
    return flat.view(torch_dtype).view(shape)
