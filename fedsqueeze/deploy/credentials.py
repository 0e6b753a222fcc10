"""TLS and SuperNode credentials for a Flower 1.42 deployment, made with `cryptography`.

    DIR/ca.crt  ca.key                   the certificate authority (ca.key: keep it off the server)
    DIR/server.pem  server.key           the SuperLink's certificate (SANs: the given hosts) and key
    DIR/node1  node1.pub  ... nodeN      SuperNode key pairs: EC P-384, OpenSSH format (as
                                         `ssh-keygen -t ecdsa -b 384`); `flwr supernode register
                                         nodeK.pub` and `flower-supernode --auth-supernode-private-key nodeK`

Private keys are written with mode 0600. Nothing is overwritten unless `force` is set: a
second call fails before writing anything.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("localhost", "127.0.0.1")
#: certificate lifetimes in days
CA_DAYS = 3650
SERVER_DAYS = 825


class CredentialsError(ValueError):
    """Credentials cannot be written as asked (existing files without force, bad host name, bad count)."""


@dataclass(frozen=True)
class Credentials:
    """Paths of what `make_credentials` wrote."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # private keys; the public key of each is the same path + ".pub"

    def public_key(self, index: int) -> Path:
        return self.node_keys[index].with_name(self.node_keys[index].name + ".pub")


def planned(directory: str | os.PathLike[str], nodes: int) -> Credentials:
    d = Path(directory)
    return Credentials(
        directory=d,
        ca_cert=d / "ca.crt",
        ca_key=d / "ca.key",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        node_keys=tuple(d / f"node{i}" for i in range(1, nodes + 1)),
    )


def make_credentials(
    directory: str | os.PathLike[str],
    nodes: int,
    sans: Sequence[str] = DEFAULT_SANS,
    force: bool = False,
) -> Credentials:
    """Write a CA, a server certificate for `sans` and `nodes` SuperNode key pairs into `directory`."""
    if nodes < 0:
        raise CredentialsError(f"--nodes must be >= 0, got {nodes}")
    names = [_san(s) for s in (sans or DEFAULT_SANS)]
    creds = planned(directory, nodes)
    files = [creds.ca_cert, creds.ca_key, creds.server_cert, creds.server_key]
    for i in range(nodes):
        files += [creds.node_keys[i], creds.public_key(i)]
    existing = [str(p) for p in files if p.exists()]
    if existing and not force:
        raise CredentialsError(f"refusing to overwrite {', '.join(existing)} (use --force to replace them)")
    creds.directory.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsqueeze CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    first = names[0]
    cn = first.value if isinstance(first, x509.DNSName) else str(first.value)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write(creds.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(creds.ca_key, _pem_key(ca_key), private=True)
    _write(creds.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(creds.server_key, _pem_key(server_key), private=True)
    for i in range(nodes):
        write_node_key(creds.node_keys[i], comment=f"fedsqueeze-node{i + 1}", force=True)
    return creds


def write_node_key(path: str | os.PathLike[str], comment: str = "", force: bool = False) -> Path:
    """One SuperNode key pair: `path` (OpenSSH private key, 0600) and `path.pub` (ecdsa-sha2-nistp384 line)."""
    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    if not force and (path.exists() or pub.exists()):
        raise CredentialsError(f"refusing to overwrite {path} (use --force to replace it)")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(path, private, private=True)
    _write(pub, public + (b" " + comment.encode() if comment else b"") + b"\n", private=False)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(value: str) -> x509.GeneralName:
    value = value.strip()
    if not value:
        raise CredentialsError("an empty --san value")
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    label = value.rstrip(".")
    if not all(part and len(part) <= 63 and part.replace("-", "").isalnum() for part in label.split(".")):
        raise CredentialsError(f"--san {value!r} is neither an IP address nor a host name")
    return x509.DNSName(label)


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write atomically; a private key never exists on disk with a mode wider than 0600."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    mode = 0o600 if private else 0o644
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
