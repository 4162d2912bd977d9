"""Peer control service over a real gRPC socket: signed requests pass; a bad token, another job, a stale
generation, a non-member, out-of-range fields, undecodable and oversized messages are refused, and the
server keeps serving afterwards."""

from __future__ import annotations

import contextlib

import grpc
import pytest

from resilient._proto import peer_pb2 as pb
from resilient.replication.peer_service import (
    PeerAuthority,
    PeerClient,
    PeerHandler,
    PeerRefused,
    PeerServicer,
    PeerTLS,
    start_server,
)

TOKEN = b"s3cret-token"


class Handler(PeerHandler):
    def __init__(self):
        self.generation = 5
        self.members = frozenset({"a", "b"})
        self.offers = []

    def peer_view(self):
        return self.generation, self.members

    def handle_offer(self, sender, ref):
        self.offers.append((sender.node_id, ref.rank, ref.step))
        return True, ""

    def handle_pull(self, sender, ref, bulk_addr):
        return pb.PullReply(ok=True, nbytes=ref.nbytes)

    def handle_drop(self, sender, ranks, below_step):
        return len(ranks)

    def handle_holdings(self):
        return [pb.Holding(shard=pb.ShardRef(rank=1, step=2, world_size=2), segment="seg", owner=True)]

    def handle_status(self):
        return pb.StatusReply(node_id="b", generation=self.generation, committed_step=-1)


@pytest.fixture
def served():
    with peer_server() as serving:
        yield serving


@contextlib.contextmanager
def peer_server(tls: PeerTLS | None = None):
    """Node b's peer service of job "job" on a real port (with ``tls``: mutual TLS), its handler, and a
    factory of clients for it; the clients and the server are closed afterwards."""
    handler = Handler()
    server, address = start_server(PeerServicer(handler, PeerAuthority("job", "b", TOKEN)), "127.0.0.1:0", 64 * 1024,
                                   tls=tls)
    clients = []

    def client(node="a", token=TOKEN, job="job", gen=None, tls=None):
        c = PeerClient(PeerAuthority(job, node, token), gen or (lambda: handler.generation), timeout=5.0,
                       max_message_bytes=1 << 20, tls=tls)
        clients.append(c)
        return c

    try:
        yield handler, address, client
    finally:
        for c in clients:
            c.close()
        server.stop(None)


def ref(rank=0, step=3, nbytes=10, ws=2):
    return pb.ShardRef(rank=rank, step=step, shard_generation=5, nbytes=nbytes, world_size=ws)


def test_signed_member_is_served(served):
    handler, address, client = served
    assert client().offer(address, ref()).accepted
    assert handler.offers == [("a", 0, 3)]
    assert client().status(address).node_id == "b"
    assert client().list_holdings(address).holdings[0].segment == "seg"
    assert client().drop(address, [0, 1], 3).dropped == 2


def test_bad_token_refused(served):
    handler, address, client = served
    with pytest.raises(PeerRefused) as exc:
        client(token=b"wrong").offer(address, ref())
    assert exc.value.code == "UNAUTHENTICATED"
    assert handler.offers == []


def test_other_job_refused(served):
    _, address, client = served
    with pytest.raises(PeerRefused) as exc:
        client(job="other").status(address)
    assert exc.value.code == "UNAUTHENTICATED"


def test_stale_generation_refused(served):
    handler, address, client = served
    with pytest.raises(PeerRefused) as exc:
        client(gen=lambda: 4).offer(address, ref())
    assert exc.value.code == "FAILED_PRECONDITION"
    assert "stale generation 4" in str(exc.value)
    assert handler.offers == []


def test_future_generation_is_unavailable_after_retry(served):
    _, address, client = served
    with pytest.raises(PeerRefused) as exc:
        client(gen=lambda: 6).status(address)
    assert exc.value.code == "UNAVAILABLE"


def test_non_member_refused(served):
    handler, address, client = served
    with pytest.raises(PeerRefused) as exc:
        client(node="intruder").offer(address, ref())
    assert exc.value.code == "FAILED_PRECONDITION"
    assert handler.offers == []


def test_out_of_range_shard_refused(served):
    handler, address, client = served
    with pytest.raises(PeerRefused) as exc:
        client().offer(address, ref(rank=7, ws=2))
    assert exc.value.code == "INVALID_ARGUMENT"


def test_malformed_and_oversized_messages_rejected_server_survives(served):
    handler, address, client = served
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 1 << 22)])
    raw = channel.unary_unary("/resilient.v1.PeerService/Offer", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as exc:
        raw(b"\xff\xff\xff\xff\x0f garbage", timeout=5)
    assert exc.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNKNOWN)
    with pytest.raises(grpc.RpcError) as exc:
        raw(b"\x0a" + b"\x80\x80\x80\x02" + b"x" * (1 << 21), timeout=5)  # 2 MiB > 64 KiB limit
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    channel.close()
    assert handler.offers == []
    assert client().status(address).generation == 5  # still serving
