"""Real etcd for tests, without pytest: ``running_etcd()`` and ``running_cluster()`` / ``EtcdCluster3``.

Any test folder can do::

    from resilient.testing.etcd import running_etcd

    with running_etcd() as etcd:          # an EmbeddedEtcd with fast raft timings, no fsync
        kv = EtcdKV.connect(etcd.settings)  # etcd.endpoints, etcd.settings (EtcdSettings)

Every server is stopped, reaped and its data directory removed when the ``with`` block ends.
``write_test_certificates`` makes a throwaway CA and server/client certificates for TLS tests.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from resilient.etcd.server import FAST, EmbeddedCluster, EmbeddedEtcd, EtcdServerConfig

__all__ = [
    "FAST",
    "EtcdCluster3",
    "EmbeddedCluster",
    "EmbeddedEtcd",
    "CertificateFiles",
    "running_cluster",
    "running_etcd",
    "wait_until",
    "write_test_certificates",
]

T = TypeVar("T")


@contextlib.contextmanager
def running_etcd(config: EtcdServerConfig | None = None) -> Iterator[EmbeddedEtcd]:
    """One healthy etcd member on free loopback ports (``FAST`` timings unless ``config`` is given)."""
    server = EmbeddedEtcd(config or FAST)
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def running_cluster(n: int = 3, config: EtcdServerConfig | None = None) -> Iterator[EmbeddedCluster]:
    """An ``n``-member etcd cluster on loopback, healthy with a leader."""
    cluster = EmbeddedCluster(n, config or FAST)
    try:
        yield cluster
    finally:
        cluster.close()


def EtcdCluster3(config: EtcdServerConfig | None = None) -> contextlib.AbstractContextManager[EmbeddedCluster]:  # noqa: N802
    """``with EtcdCluster3() as cluster:`` — a 3-member cluster (``cluster.leader()``, ``kill(i)``,
    ``restart(i)``, ``endpoints``, ``settings``)."""
    return running_cluster(3, config)


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns a truthy value (returned) or raise AssertionError naming ``what``
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last value: {value!r})")
        time.sleep(interval)


@dataclass(frozen=True)
class CertificateFiles:
    """Throwaway PEM files: a CA, a server certificate for 127.0.0.1/localhost, and a client certificate."""

    ca_cert: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def write_test_certificates(directory: str | Path, client_cn: str = "resilient-client") -> CertificateFiles:
    """Generate a throwaway CA and server/client certificates (EC P-256, valid one day) into ``directory``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, filename: str) -> str:
        path = directory / filename
        path.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        path.chmod(0o600)
        return str(path)

    def write_cert(cert: x509.Certificate, filename: str) -> str:
        path = directory / filename
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("resilient-test-ca"))
        .issuer_name(name("resilient-test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )

    def issue(cn: str, usage: x509.ObjectIdentifier, san: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = issue("etcd-server", ExtendedKeyUsageOID.SERVER_AUTH, san=True)
    client, client_key = issue(client_cn, ExtendedKeyUsageOID.CLIENT_AUTH, san=False)
    return CertificateFiles(
        ca_cert=write_cert(ca, "ca.pem"),
        server_cert=write_cert(server, "server.pem"),
        server_key=write_key(server_key, "server-key.pem"),
        client_cert=write_cert(client, "client.pem"),
        client_key=write_key(client_key, "client-key.pem"),
    )
