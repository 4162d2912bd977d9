"""Bulk transport: send a sealed slot to a peer over TCP, received straight into the peer's segment.

Protocol (one slot per connection)::

    receiver -> sender   b"RSLB", u32 version, 32-byte nonce
    sender -> receiver   b"RSLB", u32 version, u32 n, header JSON (n bytes), HMAC-SHA256(token, nonce+header)
    receiver -> sender   status (u8 0 = go on, 1 = refused), u32 n, message
    sender -> receiver   index blob, then the slot's data bytes (large writes from the mapping, or sendfile)
    receiver -> sender   status, u32 n, message (JSON of the sealed slot, or the reason it was refused)

The receiver authenticates with the per-job token before anything else, asks ``resolve(header)`` for
the local segment (None or a StoreError means an unknown peer), receives the data straight into that
segment's inactive slot while computing per-chunk CRC32C, and seals only when every chunk matches.
Memory is bounded: no buffer beyond the index blob and the segment itself. Every failure (short read,
bad token, unknown peer, bad checksum, peer gone mid-transfer) is a ``TransportError`` naming the peer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from resilient.errors import ResilientError, StoreError, TransportError
from resilient.logs import get_logger
from resilient.store._loader import backend
from resilient.store.layout import SlotIndex, chunk_count
from resilient.store.segment import Segment, SlotInfo

MAGIC = b"RSLB"
VERSION = 1
NONCE_BYTES = 32
MAC_BYTES = 32
MAX_HEADER_BYTES = 64 << 10
_PRELUDE = struct.Struct("<4sII")
_HELLO = struct.Struct(f"<4sI{NONCE_BYTES}s")
_STATUS = struct.Struct("<BI")
_log = get_logger(__name__)


@dataclass(frozen=True)
class SlotHeader:
    """What a sender announces about the slot it offers."""

    job: str
    rank: int
    segment: str
    step: int
    generation: int
    nbytes: int
    index_nbytes: int
    sender: str
    lo: int = 0  # a striped transfer carries only the data bytes [lo, hi) of the slot
    hi: int = -1  # -1: up to the end (the whole slot)

    @property
    def end(self) -> int:
        return self.nbytes if self.hi < 0 else self.hi

    @property
    def striped(self) -> bool:
        return self.lo != 0 or self.end != self.nbytes

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "SlotHeader":
        doc = json.loads(raw)
        fields = cls.__dataclass_fields__
        head = cls(**{k: doc[k] for k in fields if k not in ("lo", "hi")},
                   **{k: int(doc[k]) for k in ("lo", "hi") if k in doc})
        if not (isinstance(head.nbytes, int) and 0 <= head.lo <= head.end <= head.nbytes):
            raise ValueError(f"byte range [{head.lo}, {head.end}) is not within the slot's {head.nbytes} bytes")
        return head


def _mac(token: bytes, nonce: bytes, header: bytes) -> bytes:
    return hmac.new(token, nonce + header, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int, peer: str, what: str) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            r = sock.recv_into(view[got:])
        except TimeoutError as exc:
            raise TransportError(f"Peer {peer} sent nothing for too long while sending {what} ({got} of {n} bytes).") from exc
        except OSError as exc:
            raise TransportError(f"Connection to {peer} failed while receiving {what} ({got} of {n} bytes): {exc}.") from exc
        if r == 0:
            raise TransportError(f"Peer {peer} closed the connection after {got} of {n} bytes of {what} (short read).")
        got += r
    return bytes(buf)


def _send_status(sock: socket.socket, ok: bool, message: str) -> None:
    body = message.encode()
    sock.sendall(_STATUS.pack(0 if ok else 1, len(body)) + body)


def _recv_status(sock: socket.socket, peer: str, stage: str) -> tuple[bool, str]:
    status, n = _STATUS.unpack(_recv_exact(sock, _STATUS.size, peer, f"the {stage} reply"))
    if n > MAX_HEADER_BYTES:
        raise TransportError(f"Peer {peer} sent a {n}-byte {stage} reply; it does not speak this protocol.")
    return status == 0, _recv_exact(sock, n, peer, f"the {stage} reply").decode(errors="replace")


def offer(address: tuple[str, int], token: bytes, header: SlotHeader, *, timeout: float,
          on_connect: Callable[[socket.socket], None] | None = None) -> socket.socket:
    """Connect, authenticate and announce ``header``; returns the socket once the peer says go on.

    The caller then sends ``header.index_nbytes`` bytes of index and ``header.nbytes`` of data and reads
    the final status (``send_slot`` does all of it; this step is separate for tools and tests).
    ``on_connect``: see ``send_slot``.
    """
    peer = f"{address[0]}:{address[1]}"
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as exc:
        raise TransportError(f"Cannot connect to peer {peer}: {exc}.") from exc
    try:
        if on_connect is not None:
            on_connect(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        magic, version, nonce = _HELLO.unpack(_recv_exact(sock, _HELLO.size, peer, "the greeting"))
        if magic != MAGIC or version != VERSION:
            raise TransportError(f"Peer {peer} is not a resilient bulk receiver of version {VERSION} (got {magic!r} v{version}).")
        raw = header.encode()
        sock.sendall(_PRELUDE.pack(MAGIC, VERSION, len(raw)) + raw + _mac(token, nonce, raw))
        ok, message = _recv_status(sock, peer, "admission")
        if not ok:
            raise TransportError(f"Peer {peer} refused slot of {header.job}/rank {header.rank} step {header.step}: {message}")
        return sock
    except BaseException:
        sock.close()
        raise


def send_slot(
    segment: Segment, slot: int, address: tuple[str, int], token: bytes, *, timeout: float, sendfile: bool = False,
    pace: Callable[[int], None] | None = None, byte_range: tuple[int, int] | None = None,
    pace_bytes: int = 1 << 20, on_connect: Callable[[socket.socket], None] | None = None,
) -> int:
    """Send sealed ``slot`` of ``segment`` to the receiver at ``address``; returns bytes sent.

    Data goes out with large send() calls straight from the segment mapping (faster than sendfile from
    tmpfs on loopback, where the page-by-page splice costs more than the copy it saves); ``sendfile=True``
    uses sendfile from the segment file instead (saves a copy on real NICs).

    ``pace(n)``: called before each piece of ``pace_bytes`` goes out, blocking until those bytes may be sent
    (a rate limiter's reservation), so a big slot is paced inside the transfer instead of bursting.
    ``byte_range=(lo, hi)``: send only those data bytes (one stripe of a slot pulled from several holders
    at once; the receiver assembles the stripes and verifies every chunk).

    ``on_connect(sock)``: called with the socket as soon as it is connected; shutting it down from another
    thread aborts the transfer (TransportError), e.g. when the transfer's generation is over and the peer
    may be paused or cut off for much longer than anyone should wait.
    """
    be = backend()
    peer = f"{address[0]}:{address[1]}"
    seq = segment.slot_seq(slot)
    if seq == 0:
        raise TransportError(f"Slot {slot} of segment {segment.name!r} is not sealed; nothing to send to {peer}.")
    info = segment.slots()[slot]
    blob = segment._index_blob(slot)
    lo, hi = byte_range if byte_range is not None else (0, info.nbytes)
    if not 0 <= lo <= hi <= info.nbytes:
        raise TransportError(f"Byte range [{lo}, {hi}) lies outside the {info.nbytes} bytes of slot {slot} of "
                             f"segment {segment.name!r}.")
    header = SlotHeader(segment.job, segment.rank, segment.name, info.step, info.generation, info.nbytes,
                        len(blob), f"{socket.gethostname()}:{os.getpid()}",
                        *((lo, hi) if (lo, hi) != (0, info.nbytes) else ()))
    sock = offer(address, token, header, timeout=timeout, on_connect=on_connect)
    try:
        try:
            sock.sendall(blob)
            step = max(1, pace_bytes) if pace is not None else max(1, hi - lo)
            for off in range(lo, hi, step):
                n = min(step, hi - off)
                if pace is not None:
                    pace(n)
                if sendfile:
                    be.send_file_range(sock.fileno(), segment.fileno, segment.slot_file_offset(slot) + off, n, timeout)
                else:
                    be.send_addr(sock.fileno(), segment.slot_address(slot) + off, n, timeout)
        except OSError as exc:
            raise TransportError(
                f"Peer {peer} went away while receiving step {info.step} of {segment.job}/rank {segment.rank}: {exc}."
            ) from exc
        if segment.slot_seq(slot) != seq:
            raise TransportError(
                f"Slot {slot} of segment {segment.name!r} was overwritten while it was being sent to {peer}; send the latest slot again."
            )
        ok, message = _recv_status(sock, peer, "final")
        if not ok:
            raise TransportError(f"Peer {peer} rejected step {info.step} of {segment.job}/rank {segment.rank}: {message}")
        return len(blob) + hi - lo
    finally:
        sock.close()


class BulkReceiver:
    """Accepts slots from peers and writes them straight into local segments.

    ``resolve(header)`` returns the segment to receive into (or None for an unknown peer).
    ``on_received(header, slot_info)`` and ``on_error(error)`` are called from receiver threads;
    ``errors`` keeps every failure for inspection.
    """

    def __init__(
        self,
        host: str,
        port: int,
        token: bytes,
        resolve: Callable[[SlotHeader], Segment | None],
        *,
        timeout: float = 30.0,
        on_received: Callable[[SlotHeader, SlotInfo], None] | None = None,
        on_error: Callable[[TransportError], None] | None = None,
        max_connections: int = 16,
    ) -> None:
        if not token:
            raise TransportError("BulkReceiver needs a non-empty job token.")
        self._token = bytes(token)
        self._resolve = resolve
        self._timeout = timeout
        self._on_received = on_received
        self._on_error = on_error
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._stripes: dict[tuple[str, int, int], _Stripes] = {}  # slots being assembled from striped transfers
        self.errors: list[TransportError] = []
        self.received: list[tuple[SlotHeader, SlotInfo]] = []
        try:
            self._listener = socket.create_server((host, port), reuse_port=False)
        except OSError as exc:
            raise TransportError(f"Cannot listen on {host}:{port} for shard transfers: {exc}.") from exc
        self._listener.setblocking(False)
        self._stop = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, name="resilient-bulk-accept", daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                if not sel.select(timeout=0.1):
                    continue
                try:
                    conn, addr = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    if self._stop.is_set():
                        return
                    raise
                if not self._slots.acquire(blocking=False):
                    conn.close()
                    self._record(TransportError(f"Refused a transfer from {addr[0]}:{addr[1]}: too many at once."))
                    continue
                t = threading.Thread(target=self._serve, args=(conn, addr), name="resilient-bulk-recv", daemon=True)
                with self._lock:
                    self._threads.add(t)
                t.start()
        finally:
            sel.close()

    def _record(self, err: TransportError) -> None:
        _log.warning("%s", err)
        with self._lock:
            self.errors.append(err)
        if self._on_error is not None:
            self._on_error(err)

    def _serve(self, conn: socket.socket, addr) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        try:
            conn.settimeout(self._timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            header, info = self._receive(conn, peer)
            if info is not None:  # None: one stripe of a slot still being assembled
                with self._lock:
                    self.received.append((header, info))
                if self._on_received is not None:
                    self._on_received(header, info)
        except TransportError as err:
            self._record(err)
        except OSError as exc:
            err = TransportError(f"Transfer from {peer} failed: {exc}.")
            err.__cause__ = exc
            self._record(err)
        finally:
            conn.close()
            self._slots.release()
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _refuse(self, conn: socket.socket, peer: str, message: str) -> TransportError:
        try:
            _send_status(conn, False, message)
        except OSError as exc:
            _log.debug("could not tell %s why it was refused: %s", peer, exc)
        return TransportError(f"Refused a transfer from {peer}: {message}")

    def _receive(self, conn: socket.socket, peer: str) -> tuple[SlotHeader, SlotInfo | None]:
        nonce = os.urandom(NONCE_BYTES)
        conn.sendall(_HELLO.pack(MAGIC, VERSION, nonce))
        magic, version, n = _PRELUDE.unpack(_recv_exact(conn, _PRELUDE.size, peer, "the request"))
        if magic != MAGIC or version != VERSION:
            raise self._refuse(conn, peer, f"it does not speak resilient bulk protocol v{VERSION} (got {magic!r} v{version}).")
        if n > MAX_HEADER_BYTES:
            raise self._refuse(conn, peer, f"its header of {n} bytes exceeds {MAX_HEADER_BYTES}.")
        raw = _recv_exact(conn, n, peer, "the header")
        mac = _recv_exact(conn, MAC_BYTES, peer, "the token proof")
        if not hmac.compare_digest(mac, _mac(self._token, nonce, raw)):
            raise self._refuse(conn, peer, "bad token (it does not hold this job's token).")
        try:
            header = SlotHeader.decode(raw)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise self._refuse(conn, peer, f"malformed header: {exc}.") from exc
        try:
            segment = self._resolve(header)
        except StoreError as exc:
            raise self._refuse(conn, peer, f"unknown peer: no segment for {header.job}/rank {header.rank}: {exc}") from exc
        except ResilientError as exc:  # it cannot take it now (etcd failed): that snapshot is skipped, the next one sent
            raise self._refuse(conn, peer, f"cannot receive step {header.step} of rank {header.rank} now: {exc}") from exc
        if segment is None:
            raise self._refuse(conn, peer, f"unknown peer: no segment here for {header.job}/rank {header.rank}.")
        if header.nbytes > segment.capacity or header.index_nbytes > segment.index_capacity:
            raise self._refuse(
                conn, peer,
                f"slot of {header.nbytes} bytes (index {header.index_nbytes}) does not fit segment "
                f"{segment.name!r} ({segment.capacity} bytes, index {segment.index_capacity}).",
            )
        _send_status(conn, True, "go on")
        blob = _recv_exact(conn, header.index_nbytes, peer, "the tensor index")
        try:
            index = SlotIndex.decode(blob)
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            raise self._refuse(conn, peer, f"unreadable tensor index: {exc}.") from exc
        if index.nbytes != header.nbytes or any(off + n > header.nbytes for _, off, n in index.regions()):
            raise self._refuse(conn, peer, "the tensor index does not match the announced slot size.")
        if header.striped:
            return header, self._receive_stripe(conn, peer, header, segment, index, blob)
        with self._lock:  # a whole transfer replaces any assembly of stripes into this segment
            for key in [k for k in self._stripes if k[0] == segment.name]:
                del self._stripes[key]
        slot = segment._prepare_receive()
        regions = [(off, n) for _, off, n in sorted(index.regions(), key=lambda r: r[1])]
        order = sorted(range(len(index.regions())), key=lambda i: index.regions()[i][1])
        try:
            got, crcs = backend().recv_checksum(conn.fileno(), segment.slot_address(slot), header.nbytes,
                                                regions, index.chunk, self._timeout)
        except OSError as exc:
            raise TransportError(
                f"Peer {peer} went away while sending step {header.step} of {header.job}/rank {header.rank}: {exc}."
            ) from exc
        if got < header.nbytes:
            raise TransportError(
                f"Peer {peer} closed the connection after {got} of {header.nbytes} bytes of step {header.step} "
                f"of {header.job}/rank {header.rank} (short read); the previous snapshot is kept."
            )
        flat = _reorder(crcs, index, order)
        bad = next((i for i, (a, b) in enumerate(zip(flat, index.crcs)) if a != b), None)
        if bad is not None:
            name, chunk, lo, hi = index.locate(bad)
            raise self._refuse(
                conn, peer,
                f"bad checksum in step {header.step} of {header.job}/rank {header.rank}: tensor {name!r} chunk "
                f"{chunk} (bytes {lo}..{hi}) expected {index.crcs[bad]:#010x}, got {flat[bad]:#010x}.",
            )
        info = segment._commit_receive(slot, header.step, header.generation, index, blob)
        _send_status(conn, True, json.dumps({"slot": info.slot, "step": info.step}))
        return header, info

    def _receive_stripe(self, conn: socket.socket, peer: str, header: SlotHeader, segment: Segment,
                        index: SlotIndex, blob: bytes) -> SlotInfo | None:
        """Receive the bytes ``[lo, hi)`` of a slot pulled in stripes from several holders at once, straight
        into the slot being assembled. Chunks wholly inside the stripe are checked as they arrive; the few
        chunks that straddle two stripes are checked once every stripe is in. The slot is sealed (and its
        ``SlotInfo`` returned) by the stripe that completes it; None for the others."""
        what = f"step {header.step} of {header.job}/rank {header.rank}"
        key = (segment.name, header.step, header.generation)
        with self._lock:
            st = self._stripes.get(key)
            if st is not None and (st.blob != blob or st.segment is not segment or not st.intact()
                                   or time.monotonic() - st.started > 2 * self._timeout):
                st = None  # another index, a recreated or rewritten segment, or an abandoned assembly: start over
            if st is None:
                st = _Stripes(segment, segment._prepare_receive(), blob, index)
                self._stripes[key] = st
        lo, hi = header.lo, header.end
        inside = [c for c in st.chunks if lo <= c[1] and c[2] <= hi and c[1] < c[2]]
        try:
            got, crcs = backend().recv_checksum(conn.fileno(), segment.slot_address(st.slot) + lo, hi - lo,
                                                [(s - lo, e - s) for _, s, e in inside], index.chunk, self._timeout)
        except OSError as exc:
            raise TransportError(f"Peer {peer} went away while sending bytes {lo}..{hi} of {what}: {exc}.") from exc
        if got < hi - lo:
            raise TransportError(f"Peer {peer} closed the connection after {got} of {hi - lo} bytes of the stripe "
                                 f"{lo}..{hi} of {what} (short read).")
        bad = next(((i, c) for (i, _s, _e), c in zip(inside, crcs) if index.crcs[i] != c), None)
        if bad is not None:
            name, chunk, a, b = index.locate(bad[0])
            raise self._refuse(conn, peer, f"bad checksum in the stripe {lo}..{hi} of {what}: tensor {name!r} chunk "
                                           f"{chunk} (bytes {a}..{b}) expected {index.crcs[bad[0]]:#010x}, got {bad[1]:#010x}.")
        with self._lock:
            if self._stripes.get(key) is not st:
                raise self._refuse(conn, peer, f"the assembly of {what} was replaced while its stripe {lo}..{hi} came in.")
            st.ranges.append((lo, hi))
            st.verified.update(i for i, _s, _e in inside)
            complete = st.complete(header.nbytes)
            if complete:
                del self._stripes[key]
        if not complete:
            _send_status(conn, True, json.dumps({"stripe": [lo, hi], "complete": False}))
            return None
        if not st.intact():
            raise self._refuse(conn, peer, f"the slot assembling {what} was written by someone else meanwhile.")
        rest = [c for c in st.chunks if c[0] not in st.verified]
        base = segment.slot_address(st.slot)
        sums = backend().checksum_batch([base + s for _, s, _ in rest], [e - s for _, s, e in rest], index.chunk) if rest else []
        wrong = next((i for (i, _s, _e), c in zip(rest, sums) if index.crcs[i] != c), None)
        if wrong is not None:
            name, chunk, a, b = index.locate(wrong)
            raise self._refuse(conn, peer, f"bad checksum where two stripes of {what} meet: tensor {name!r} chunk {chunk} "
                                           f"(bytes {a}..{b}); the slot is not sealed.")
        info = segment._commit_receive(st.slot, header.step, header.generation, index, blob)
        _send_status(conn, True, json.dumps({"slot": info.slot, "step": info.step, "complete": True}))
        return info

    def close(self) -> None:
        """Stop accepting and wait for transfers in flight (each bounded by the timeout)."""
        self._stop.set()
        self._acceptor.join()
        self._listener.close()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(self._timeout + 1)

    def __enter__(self) -> "BulkReceiver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Stripes:
    """A slot being assembled from striped transfers: its chunks as (flat index, start, end) in offset
    order, the byte ranges received and the chunks verified so far."""

    def __init__(self, segment: Segment, slot: int, blob: bytes, index: SlotIndex) -> None:
        self.segment, self.slot, self.blob = segment, slot, blob
        self.started = time.monotonic()
        self.ranges: list[tuple[int, int]] = []
        self.verified: set[int] = set()
        chunks, flat = [], 0
        for _name, off, n in index.regions():
            for k in range(chunk_count(n, index.chunk)):
                chunks.append((flat, off + k * index.chunk, off + min(n, (k + 1) * index.chunk)))
                flat += 1
        self.chunks = sorted(chunks, key=lambda c: c[1])

    def intact(self) -> bool:
        """The slot is still the unsealed one this assembly prepared (nobody sealed into it since)."""
        return self.segment.slot_seq(self.slot) == 0

    def complete(self, nbytes: int) -> bool:
        end = 0
        for lo, hi in sorted(self.ranges):
            if lo > end:
                return False
            end = max(end, hi)
        return end >= nbytes


def _reorder(crcs: list[int], index: SlotIndex, order: list[int]) -> list[int]:
    """CRCs computed in offset order -> the index's region order."""
    from resilient.store.layout import chunk_count

    regions = index.regions()
    by_region: dict[int, list[int]] = {}
    pos = 0
    for i in order:
        k = chunk_count(regions[i][2], index.chunk)
        by_region[i] = list(crcs[pos : pos + k])
        pos += k
    return [c for i in range(len(regions)) for c in by_region[i]]
