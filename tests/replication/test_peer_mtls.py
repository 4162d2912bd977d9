"""Mutual TLS on the peer control channel (over a real gRPC socket): an agent with a certificate of the
job's CA is served; one without a certificate, or with a certificate of another CA, never reaches the
handler; the HMAC signature is still required inside TLS; configuration from the environment."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from resilient._proto import peer_pb2 as pb
from resilient.errors import ConfigError
from resilient.replication.peer_service import (
    DEFAULT_TLS_NAME,
    PeerRefused,
    PeerTLS,
)
from tests.replication.test_peer_service import TOKEN, peer_server, ref


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_ca(name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca, node: str, san: str = DEFAULT_TLS_NAME) -> PeerTLS:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return PeerTLS(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key),
                   ca_cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def ca():
    return make_ca("job-ca")


@pytest.fixture
def tls_server(ca):
    with peer_server(tls=issue(ca, "b")) as (handler, address, client):
        yield handler, address, lambda tls, token=TOKEN: client(token=token, tls=tls)


def test_peer_with_a_certificate_of_the_job_ca_is_served(tls_server, ca):
    handler, address, client = tls_server
    assert client(issue(ca, "a")).offer(address, ref()).accepted
    assert handler.offers == [("a", 0, 3)]


def test_peer_without_a_client_certificate_is_refused(tls_server):
    handler, address, client = tls_server
    with pytest.raises(PeerRefused) as err:
        client(None).offer(address, ref())
    assert err.value.code == "UNAVAILABLE"
    assert handler.offers == []


def test_peer_with_a_certificate_of_another_ca_is_refused(tls_server, ca):
    handler, address, client = tls_server
    other = issue(make_ca("another-ca"), "a")
    # trusts the job CA (so it would accept the server) but presents a certificate the server rejects
    with pytest.raises(PeerRefused):
        client(PeerTLS(other.cert, other.key, issue(ca, "x").ca)).offer(address, ref())
    assert handler.offers == []


def test_inside_tls_the_token_signature_is_still_required(tls_server, ca):
    handler, address, client = tls_server
    with pytest.raises(PeerRefused) as err:
        client(issue(ca, "a"), token=b"wrong-token").offer(address, ref())
    assert err.value.code == "UNAUTHENTICATED"
    assert handler.offers == []


def test_tls_settings_from_the_environment(tmp_path, monkeypatch, ca):
    tls = issue(ca, "a")
    for name, blob in (("cert", tls.cert), ("key", tls.key), ("ca", tls.ca)):
        (tmp_path / f"{name}.pem").write_bytes(blob)
    assert PeerTLS.from_env() is None
    monkeypatch.setenv("RESILIENT_PEER_TLS_CERT", str(tmp_path / "cert.pem"))
    with pytest.raises(ConfigError, match="together"):
        PeerTLS.from_env()
    monkeypatch.setenv("RESILIENT_PEER_TLS_KEY", str(tmp_path / "key.pem"))
    monkeypatch.setenv("RESILIENT_PEER_TLS_CA", str(tmp_path / "ca.pem"))
    assert PeerTLS.from_env() == tls
    monkeypatch.setenv("RESILIENT_PEER_TLS_CA", str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="Cannot read"):
        PeerTLS.from_env()
    with pytest.raises(ConfigError, match="not PEM"):
        PeerTLS(b"x", tls.key, tls.ca)


def test_status_over_tls(tls_server, ca):
    _handler, address, client = tls_server
    assert client(issue(ca, "a")).status(address) == pb.StatusReply(node_id="b", generation=5, committed_step=-1)
