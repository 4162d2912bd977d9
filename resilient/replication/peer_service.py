"""Agent <-> agent control over gRPC: request signing, the servicer, and the client.

Shard bytes never travel here (they go over the native bulk transport); these calls arrange transfers
(Offer, Pull), drop stale copies (Drop) and report (ListHoldings, Status).

Authentication: every request carries a ``PeerAuth`` whose ``mac`` is HMAC-SHA256, keyed by the per-job
token, over the method name and the request serialized (deterministically) with ``mac`` empty. The
servicer refuses, without touching the handler: a bad or missing MAC (UNAUTHENTICATED), another job or a
timestamp outside the allowed skew (UNAUTHENTICATED), a sender that is not a member of the receiver's
current generation or whose generation is older (FAILED_PRECONDITION), a generation the receiver has not
reached yet (UNAVAILABLE, the client retries briefly), and invalid fields (INVALID_ARGUMENT). Messages
larger than ``max_message_bytes`` are refused by gRPC itself (RESOURCE_EXHAUSTED) and undecodable bytes
fail deserialization; neither reaches the handler, and the agent keeps serving.

Optional mutual TLS (``PeerTLS``, from ``RESILIENT_PEER_TLS_CERT``/``_KEY``/``_CA``): the channel is
encrypted and both ends must present a certificate signed by the job's CA; the HMAC signature stays.
"""

from __future__ import annotations

import abc
import hashlib
import hmac
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Callable

import grpc

from resilient import env
from resilient.errors import ConfigError, EtcdError, ReplicationError, StoreError, StoreSpaceError, TransportError
from resilient.logs import get_logger
from resilient._proto import peer_pb2 as pb
from resilient._proto import peer_pb2_grpc as pb_grpc

log = get_logger(__name__)

MAX_CLOCK_SKEW_S = 300.0
MAX_SHARD_BYTES = 1 << 40
MAX_RANK = 1 << 20
DEFAULT_TLS_NAME = "resilient-peer"  # the name every agent's certificate carries (agents are dialled by IP)


class PeerRefused(ReplicationError):
    """A peer refused a control request; ``code`` is the gRPC status code name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Sender:
    node_id: str
    generation: int


class PeerAuthority:
    """Signs outgoing requests and checks incoming ones for one job with its token."""

    def __init__(self, job: str, node_id: str, token: bytes) -> None:
        if not token:
            raise ReplicationError("The per-job token is empty; peers cannot authenticate each other. Pass a secret.")
        self.job = job
        self.node_id = node_id
        self._token = bytes(token)

    def _mac(self, method: str, request) -> bytes:
        copy = type(request)()
        copy.CopyFrom(request)
        copy.auth.mac = b""
        body = copy.SerializeToString(deterministic=True)
        return hmac.new(self._token, method.encode() + b"\x00" + body, hashlib.sha256).digest()

    def sign(self, method: str, request, generation: int):
        request.auth.job = self.job
        request.auth.generation = int(generation)
        request.auth.node_id = self.node_id
        request.auth.issued_unix_ms = int(time.time() * 1000)
        request.auth.mac = self._mac(method, request)
        return request

    def check(self, method: str, request, current_generation: int | None, members: frozenset[str], now: float) -> Sender:
        """The authenticated sender, or PeerRefused naming why not (pure apart from the HMAC)."""
        a = request.auth
        if not a.mac or not hmac.compare_digest(a.mac, self._mac(method, request)):
            raise PeerRefused("UNAUTHENTICATED", f"{method} from {a.node_id!r}: bad or missing MAC (wrong job token?).")
        if a.job != self.job:
            raise PeerRefused("UNAUTHENTICATED", f"{method} from {a.node_id!r} is for job {a.job!r}, not {self.job!r}.")
        if abs(now * 1000 - a.issued_unix_ms) > MAX_CLOCK_SKEW_S * 1000:
            raise PeerRefused("UNAUTHENTICATED", f"{method} from {a.node_id!r} was issued too long ago (replayed?).")
        if current_generation is None or a.generation > current_generation:
            raise PeerRefused(
                "UNAVAILABLE", f"{method} from {a.node_id!r} is for generation {a.generation}; this node is at {current_generation}."
            )
        if a.generation < current_generation:
            raise PeerRefused(
                "FAILED_PRECONDITION",
                f"{method} from {a.node_id!r} carries stale generation {a.generation} (current {current_generation}).",
            )
        if a.node_id not in members:
            raise PeerRefused("FAILED_PRECONDITION", f"{method} from {a.node_id!r}: not a member of generation {current_generation}.")
        return Sender(a.node_id, int(a.generation))


def check_shard(ref) -> None:
    if ref.nbytes > MAX_SHARD_BYTES or ref.rank >= MAX_RANK or ref.world_size == 0 or ref.rank >= ref.world_size:
        raise PeerRefused(
            "INVALID_ARGUMENT",
            f"shard rank={ref.rank} world_size={ref.world_size} nbytes={ref.nbytes} is out of range.",
        )


class PeerHandler(abc.ABC):
    """What the servicer asks of the agent's shard manager (called only for authenticated requests)."""

    @abc.abstractmethod
    def peer_view(self) -> tuple[int | None, frozenset[str]]:
        """(current generation, node ids of its members)."""

    @abc.abstractmethod
    def handle_offer(self, sender: Sender, ref) -> tuple[bool, str]: ...

    @abc.abstractmethod
    def handle_pull(self, sender: Sender, ref, bulk_addr: str, byte_range: tuple[int, int] | None = None) -> pb.PullReply: ...

    @abc.abstractmethod
    def handle_drop(self, sender: Sender, ranks: list[int], below_step: int) -> int: ...

    @abc.abstractmethod
    def handle_holdings(self) -> list[pb.Holding]: ...

    @abc.abstractmethod
    def handle_status(self) -> pb.StatusReply: ...


class PeerServicer(pb_grpc.PeerServiceServicer):
    def __init__(self, handler: PeerHandler, authority: PeerAuthority, clock: Callable[[], float] = time.time) -> None:
        self.handler = handler
        self.authority = authority
        self.clock = clock

    def _auth(self, method: str, request, context) -> Sender:
        gen, members = self.handler.peer_view()
        try:
            sender = self.authority.check(method, request, gen, members, self.clock())
            if "shard" in request.DESCRIPTOR.fields_by_name:
                check_shard(request.shard)
            return sender
        except PeerRefused as exc:
            log.warning("refused peer request: %s", exc)
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
            raise  # unreachable: abort raises

    def _guard(self, context, fn):
        try:
            return fn()
        except PeerRefused as exc:
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        except StoreSpaceError as exc:
            log.warning("peer request refused: no room for the shard here: %s", exc)
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.authority.node_id} has no shared memory left for this shard ({exc}); it refuses the copy. "
                "Give that host a larger RESILIENT_SHM_DIR tmpfs or lower --replicas.",
            )
        except ReplicationError as exc:
            log.warning("peer request failed: %s", exc)
            context.abort(grpc.StatusCode.INTERNAL, str(exc))
        except (TransportError, StoreError, EtcdError) as exc:
            # the caller gets a status it can act on (try another holder) instead of an opaque UNKNOWN
            log.warning("peer request failed (%s): %s", type(exc).__name__, exc)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.authority.node_id} failed it: {type(exc).__name__}: {exc}")

    def Offer(self, request, context):
        sender = self._auth("Offer", request, context)
        accepted, reason = self._guard(context, lambda: self.handler.handle_offer(sender, request.shard))
        return pb.OfferReply(accepted=accepted, reason=reason)

    def Pull(self, request, context):
        sender = self._auth("Pull", request, context)
        if request.range_hi < request.range_lo or request.range_hi > request.shard.nbytes:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"byte range [{request.range_lo}, {request.range_hi}) is "
                                                            f"not within the shard's {request.shard.nbytes} bytes")
        byte_range = (request.range_lo, request.range_hi) if request.range_hi else None
        if byte_range is None:
            return self._guard(context, lambda: self.handler.handle_pull(sender, request.shard, request.bulk_addr))
        return self._guard(context, lambda: self.handler.handle_pull(sender, request.shard, request.bulk_addr, byte_range))

    def Drop(self, request, context):
        sender = self._auth("Drop", request, context)
        n = self._guard(context, lambda: self.handler.handle_drop(sender, list(request.ranks), int(request.below_step)))
        return pb.DropReply(dropped=n)

    def ListHoldings(self, request, context):
        self._auth("ListHoldings", request, context)
        return pb.ListHoldingsReply(holdings=self._guard(context, self.handler.handle_holdings))

    def Status(self, request, context):
        self._auth("Status", request, context)
        return self._guard(context, self.handler.handle_status)


@dataclass(frozen=True)
class PeerTLS:
    """Mutual TLS for the peer control channel (optional; the HMAC signature stays on every request).

    Every agent presents ``cert`` (PEM, with ``key``) and accepts only peers whose certificate is signed by
    ``ca``; clients check the server's certificate against ``ca`` and the name ``server_name`` (agents are
    dialled by IP address, so one name shared by all agents' certificates, in their subjectAltName)."""

    cert: bytes
    key: bytes
    ca: bytes
    server_name: str = DEFAULT_TLS_NAME

    def __post_init__(self) -> None:
        for what, pem in (("certificate", self.cert), ("key", self.key), ("CA certificate", self.ca)):
            if b"-----BEGIN" not in pem:
                raise ConfigError(f"The peer TLS {what} is not PEM (no '-----BEGIN' line); give PEM files.")
        if not self.server_name:
            raise ConfigError("The peer TLS server name must not be empty.")

    @classmethod
    def from_env(cls) -> "PeerTLS | None":
        """From ``RESILIENT_PEER_TLS_CERT``/``_KEY``/``_CA`` (file paths; all three or none) and
        ``RESILIENT_PEER_TLS_NAME``; None when none is set."""
        paths = {name: env.get(name) for name in (env.PEER_TLS_CERT, env.PEER_TLS_KEY, env.PEER_TLS_CA)}
        if not any(paths.values()):
            return None
        missing = [name for name, path in paths.items() if not path]
        if missing:
            raise ConfigError(f"Peer mTLS needs {env.PEER_TLS_CERT}, {env.PEER_TLS_KEY} and {env.PEER_TLS_CA} "
                              f"together; {missing} are not set.")
        blobs = []
        for name, path in paths.items():
            try:
                with open(path, "rb") as fh:
                    blobs.append(fh.read())
            except OSError as exc:
                raise ConfigError(f"Cannot read {name}={path!r}: {exc}.") from exc
        return cls(*blobs, server_name=env.get(env.PEER_TLS_NAME) or DEFAULT_TLS_NAME)


def start_server(servicer: PeerServicer, address: str, max_message_bytes: int, workers: int = 4,
                 tls: PeerTLS | None = None) -> tuple[grpc.Server, str]:
    """Serve on ``address`` ("host:port", port 0 picks one); returns the server and the bound address.
    With ``tls`` the port speaks TLS and requires a client certificate signed by ``tls.ca``."""
    opts = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="peer-rpc"), options=opts)
    pb_grpc.add_PeerServiceServicer_to_server(servicer, server)
    host, _, _ = address.rpartition(":")
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        creds = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True)
        port = server.add_secure_port(address, creds)
    if port == 0:
        raise ReplicationError(f"Cannot listen for peer control on {address}: the port is taken or the host is wrong.")
    server.start()
    return server, f"{host}:{port}"


class PeerClient:
    """Signed calls to other agents; one channel per peer address, reused."""

    def __init__(self, authority: PeerAuthority, generation: Callable[[], int], timeout: float, max_message_bytes: int,
                 tls: PeerTLS | None = None) -> None:
        self.authority = authority
        self.tls = tls
        self.generation = generation
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def _stub(self, address: str) -> pb_grpc.PeerServiceStub:
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                options = [
                    ("grpc.max_receive_message_length", self.max_message_bytes),
                    ("grpc.max_send_message_length", self.max_message_bytes),
                ]
                if self.tls is None:
                    ch = grpc.insecure_channel(address, options=options)
                else:
                    creds = grpc.ssl_channel_credentials(root_certificates=self.tls.ca, private_key=self.tls.key,
                                                         certificate_chain=self.tls.cert)
                    ch = grpc.secure_channel(address, creds,
                                             options=options + [("grpc.ssl_target_name_override", self.tls.server_name)])
                self._channels[address] = ch
            return pb_grpc.PeerServiceStub(ch)

    def _call(self, address: str, method: str, request, timeout: float | None = None, retry_unavailable_s: float = 2.0,
              on_call: Callable[[grpc.Future], None] | None = None):
        """One signed call, retried while the peer is UNAVAILABLE for ``retry_unavailable_s``. ``on_call`` gets
        each attempt's call as it starts (its ``cancel()`` ends the wait: PeerRefused ``CANCELLED``)."""
        deadline = time.monotonic() + retry_unavailable_s
        while True:
            self.authority.sign(method, request, self.generation())
            try:
                call = getattr(self._stub(address), method).future(request, timeout=timeout or self.timeout)
                if on_call is not None:
                    on_call(call)
                return call.result()
            except grpc.FutureCancelledError as exc:
                raise PeerRefused("CANCELLED", f"{method} to {address} was cancelled") from exc
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise PeerRefused(code.name, f"{method} to {address} failed: {code.name}: {exc.details()}") from exc

    def offer(self, address: str, ref: pb.ShardRef,
              on_call: Callable[[grpc.Future], None] | None = None) -> pb.OfferReply:
        return self._call(address, "Offer", pb.OfferRequest(shard=ref), on_call=on_call)

    def pull(self, address: str, ref: pb.ShardRef, bulk_addr: str, timeout: float,
             byte_range: tuple[int, int] | None = None) -> pb.PullReply:
        lo, hi = byte_range if byte_range is not None else (0, 0)
        return self._call(address, "Pull", pb.PullRequest(shard=ref, bulk_addr=bulk_addr, range_lo=lo, range_hi=hi),
                          timeout=timeout)

    def drop(self, address: str, ranks: list[int], below_step: int) -> pb.DropReply:
        return self._call(address, "Drop", pb.DropRequest(ranks=ranks, below_step=below_step))

    def list_holdings(self, address: str) -> pb.ListHoldingsReply:
        return self._call(address, "ListHoldings", pb.ListHoldingsRequest())

    def status(self, address: str) -> pb.StatusReply:
        return self._call(address, "Status", pb.StatusRequest())

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
