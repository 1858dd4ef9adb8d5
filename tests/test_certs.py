"""``fairsplit certs``: what each party gets, permissions, SANs, and that the files are usable."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from fairsplit.deploy.certs import generate
from fairsplit.deploy.cli import app


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_superlink_tls_files(tmp_path):
    paths = generate(tmp_path / "dev", sans=["superlink", "10.0.0.7"], only="superlink")
    assert {p.name for p in (tmp_path / "dev").iterdir()} == {"ca.pem", "ca.key", "superlink.pem", "superlink.key"}
    assert _mode(tmp_path / "dev") == 0o700
    assert _mode(paths["key"]) == _mode(paths["ca_key"]) == 0o600
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                            ipaddress.ip_address("10.0.0.7")}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_supernode_key_pair_is_what_flower_node_auth_loads(tmp_path):
    paths = generate(tmp_path / "aud", only="supernode")
    assert {p.name for p in (tmp_path / "aud").iterdir()} == {"auditor_supernode", "auditor_supernode.pub"}
    assert _mode(paths["supernode_key"]) == 0o600
    key = load_ssh_private_key(paths["supernode_key"].read_bytes(), None)
    pub = load_ssh_public_key(paths["supernode_pub"].read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
    assert key.public_key().public_numbers() == pub.public_numbers()


def test_bad_only_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--only"):
        generate(tmp_path, only="everything")  # type: ignore[arg-type]


def test_cli_certs_and_tls_by_default(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["certs", "--out", str(tmp_path / "c"), "--san", "devhost"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c" / "superlink.pem").exists() and (tmp_path / "c" / "auditor_supernode").exists()
    # the developer without credentials and without an explicit --insecure: refused, says why
    cfg = tmp_path / "dev.toml"
    cfg.write_text("")
    res = runner.invoke(app, ["developer", "--config", str(cfg)])
    assert res.exit_code == 2 and "--certs" in res.output
    res = runner.invoke(app, ["auditor", "--config", str(cfg)])
    assert res.exit_code == 2 and "--root-certificates" in res.output
