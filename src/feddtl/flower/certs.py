"""A development PKI for trying the Deployment Engine: a CA, a SuperLink TLS certificate, SuperNode keys.

For local trials and tests only (keys unencrypted, a self-made CA). Production deployments use
their organisation's CA and keep node private keys on the nodes.

Files written into the folder:
- ``ca.crt`` / ``ca.key``: the CA (SuperNodes and ``flwr`` trust ``ca.crt``);
- ``server.crt`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for the given
  IP addresses and DNS names (subjectAltName);
- ``node<K>`` / ``node<K>.pub``: SuperNode K's authentication key pair (ECDSA P-384, OpenSSH format,
  as ``ssh-keygen -t ecdsa -b 384`` writes it); register the ``.pub`` with ``flwr supernode register``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


def _write(path: Path, data: bytes, private: bool) -> None:
    # O_EXCL: never overwrite a key; private keys are created 0600 from the start.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() for c in host):
                raise ValueError(f"--host {host!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


LOCAL_HOSTS = ["127.0.0.1", "localhost"]
"""Always in the certificate: the SuperLink's own SuperExec reaches it on 127.0.0.1, even when it
listens on 0.0.0.0 for SuperNodes on other machines."""


def write_dev_pki(folder: Path, nodes: int = 2, hosts: list[str] | None = None) -> dict[str, Path]:
    """Write the CA, the SuperLink certificate (for 127.0.0.1, localhost and ``hosts``) and ``nodes``
    SuperNode key pairs."""
    if nodes < 0:
        raise ValueError(f"--nodes must be >= 0, got {nodes}")
    extra = [h for h in (hosts or []) if h not in LOCAL_HOSTS]
    hosts = list(dict.fromkeys(extra + LOCAL_HOSTS))
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=VALID_DAYS)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "feddtl development CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=True, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    paths = {
        "ca.crt": folder / "ca.crt",
        "ca.key": folder / "ca.key",
        "server.crt": folder / "server.crt",
        "server.key": folder / "server.key",
    }
    existing = [str(p) for p in paths.values() if p.exists()]
    existing += [str(folder / f"node{k}{s}") for k in range(nodes) for s in ("", ".pub") if (folder / f"node{k}{s}").exists()]
    if existing:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)}; use an empty folder")
    _write(paths["ca.crt"], ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths["ca.key"], _pem_key(ca_key), private=True)
    _write(paths["server.crt"], server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths["server.key"], _pem_key(server_key), private=True)
    for k in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        paths[f"node{k}"] = folder / f"node{k}"
        paths[f"node{k}.pub"] = folder / f"node{k}.pub"
        _write(paths[f"node{k}"], private, private=True)
        _write(paths[f"node{k}.pub"], public + f" feddtl-node{k}\n".encode(), private=False)
    return paths
