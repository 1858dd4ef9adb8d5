"""Keys and certificates for a fairsplit deployment, generated with ``cryptography``.

Two kinds of credentials, owned by different parties:

* the **developer's** TLS material for the SuperLink: a private CA (``ca.pem``, ``ca.key``) and the
  SuperLink's server certificate (``superlink.pem``, ``superlink.key``) with subject alternative
  names for every host name and address the auditor may dial (``localhost``, ``127.0.0.1`` and
  each ``--san``). The auditor receives only ``ca.pem``.
* the **auditor's** SuperNode authentication key pair (``auditor_supernode`` private key and
  ``auditor_supernode.pub``, OpenSSH format, ECDSA on NIST P-384 as Flower's node
  authentication expects). The developer receives only the ``.pub`` and registers it with
  ``flwr supernode register``; the private key never leaves the auditor.

Private keys are written with mode 0600 and the output folder with 0700, atomically (a reader
never sees a half-written key).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from pathlib import Path
from typing import Iterable, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fairsplit.protocol.fileio import atomic_write_bytes

__all__ = [
    "CA_CERT",
    "SERVER_CERT",
    "SERVER_KEY",
    "SUPERNODE_KEY",
    "SUPERNODE_PUB",
    "generate",
    "generate_superlink_tls",
    "generate_supernode_keys",
]

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink.pem", "superlink.key"
SUPERNODE_KEY, SUPERNODE_PUB = "auditor_supernode", "auditor_supernode.pub"

DEFAULT_SANS = ("localhost", "127.0.0.1")
VALID_DAYS = 365


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(n.strip() for n in names if n.strip()):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _out_dir(out: Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    return out


def generate_superlink_tls(out: Path, sans: Iterable[str] = ()) -> dict[str, Path]:
    """Write a private CA and the SuperLink's server certificate into ``out``.

    Args:
        out: folder (created, mode 0700).
        sans: extra subject alternative names (DNS names or IP addresses) besides
            ``localhost`` and ``127.0.0.1``, e.g. the compose service name ``superlink`` or the
            developer machine's public host name.

    Returns:
        ``{"ca": ca.pem, "ca_key": ca.key, "cert": superlink.pem, "key": superlink.key}``.

    Raises:
        OSError: ``out`` cannot be written.
    """
    out = _out_dir(out)
    now = _dt.datetime.now(_dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fairsplit developer CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - _dt.timedelta(minutes=5))
          .not_valid_after(now + _dt.timedelta(days=VALID_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fairsplit SuperLink")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=VALID_DAYS))
            .add_extension(_san([*DEFAULT_SANS, *sans]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    paths = {"ca": out / CA_CERT, "ca_key": out / CA_KEY, "cert": out / SERVER_CERT, "key": out / SERVER_KEY}
    atomic_write_bytes(paths["ca_key"], _pem_key(ca_key), 0o600)
    atomic_write_bytes(paths["key"], _pem_key(key), 0o600)
    atomic_write_bytes(paths["ca"], ca.public_bytes(serialization.Encoding.PEM), 0o644)
    atomic_write_bytes(paths["cert"], cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


def generate_supernode_keys(out: Path, name: str = SUPERNODE_KEY) -> dict[str, Path]:
    """Write the auditor's SuperNode authentication key pair (OpenSSH, ECDSA P-384) into ``out``.

    Returns:
        ``{"key": <name>, "pub": <name>.pub}``; the private key has mode 0600.

    Raises:
        OSError: ``out`` cannot be written.
    """
    out = _out_dir(out)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)
    paths = {"key": out / name, "pub": out / f"{name}.pub"}
    atomic_write_bytes(paths["key"], priv, 0o600)
    atomic_write_bytes(paths["pub"], pub + b" fairsplit-auditor\n", 0o644)
    return paths


def generate(out: Path, sans: Iterable[str] = (),
             only: Literal["all", "superlink", "supernode"] = "all") -> dict[str, Path]:
    """``fairsplit certs``: the SuperLink's TLS material and/or the auditor's node key pair.

    Raises:
        ValueError: ``only`` is not one of ``all``, ``superlink``, ``supernode``.
    """
    if only not in ("all", "superlink", "supernode"):
        raise ValueError(f"--only must be all, superlink or supernode, got {only!r}")
    paths: dict[str, Path] = {}
    if only in ("all", "superlink"):
        paths.update(generate_superlink_tls(out, sans))
    if only in ("all", "supernode"):
        paths.update({f"supernode_{k}": v for k, v in generate_supernode_keys(out).items()})
    return paths
