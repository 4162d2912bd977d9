"""How EtcdKV classifies gRPC failures: what is retried, what may be retried for a transaction, and what
is an authentication problem (pure logic, no server)."""

from __future__ import annotations

import grpc
import pytest

from resilient.etcd import client


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


REFUSED = FakeRpcError(
    grpc.StatusCode.UNAVAILABLE,
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused",
)
CUT_OFF = FakeRpcError(  # a partitioned network: gRPC's TCP connect step gave up
    grpc.StatusCode.UNAVAILABLE,
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.244.94.1:46481: tcp handshaker shutdown",
)
LEADER_CHANGED = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "etcdserver: leader changed")
TIMED_OUT = FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
BAD_PASSWORD = FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: authentication failed, invalid user ID or password")
STALE_TOKEN = FakeRpcError(grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token")
NO_CERT = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Tls handshake failed (TSI_PROTOCOL_FAILURE): BAD_CERTIFICATE")
TOO_MANY = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: too many requests")
NO_SPACE = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded")


@pytest.mark.parametrize("exc", [REFUSED, CUT_OFF, LEADER_CHANGED, TIMED_OUT, STALE_TOKEN, TOO_MANY])
def test_transient_errors_are_retried(exc: FakeRpcError) -> None:
    assert client._is_transient(exc)


def test_a_tcp_connect_that_gave_up_is_not_a_tls_failure() -> None:
    # "tcp handshaker" is gRPC's TCP connect step: a cut-off network, not a certificate problem
    assert not client._is_auth_failure(CUT_OFF)


@pytest.mark.parametrize("exc", [BAD_PASSWORD, NO_CERT, NO_SPACE])
def test_permanent_errors_are_not_retried(exc: FakeRpcError) -> None:
    assert not client._is_transient(exc)


@pytest.mark.parametrize("exc", [BAD_PASSWORD, NO_CERT])
def test_auth_and_tls_failures_are_auth_errors(exc: FakeRpcError) -> None:
    assert client._is_auth_failure(exc)


def test_stale_token_is_refreshed_not_an_auth_error() -> None:
    assert not client._is_auth_failure(STALE_TOKEN) and client._is_stale_token(STALE_TOKEN)


def test_only_requests_that_never_reached_a_server_count_as_not_sent() -> None:
    assert client._never_sent(REFUSED) and client._never_sent(TOO_MANY)
    assert not client._never_sent(LEADER_CHANGED) and not client._never_sent(TIMED_OUT)


@pytest.mark.parametrize(
    ("prefix", "end"), [(b"/a/", b"/a0"), (b"a\xff", b"b"), (b"\xff\xff", b"\0"), (b"", b"\0")]
)
def test_prefix_range_end(prefix: bytes, end: bytes) -> None:
    assert client.prefix_range_end(prefix) == end
