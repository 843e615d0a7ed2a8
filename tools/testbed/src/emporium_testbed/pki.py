"""The small PKI a local control plane needs: a CA, the API server's serving certificate, client
certificates, and the service-account signing key pair."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write_key(path: Path, key) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(
        now + dt.timedelta(days=365)
    )


class LocalPKI:
    """Files in directory: ca.crt/key, apiserver.crt/key, admin.crt/key, <name>.crt/key, sa.key/pub."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    def path(self, name: str) -> Path:
        return self.dir / name

    def ensure(self) -> LocalPKI:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.path("ca.crt").exists():
            self._make_ca()
        if not self.path("apiserver.crt").exists():
            self.issue(
                "apiserver",
                "kube-apiserver",
                server=True,
                dns=[
                    "localhost",
                    "kubernetes",
                    "kubernetes.default",
                    "kubernetes.default.svc",
                    "kubernetes.default.svc.cluster.local",
                ],
                ips=["127.0.0.1", "::1", "10.96.0.1"],
            )
        if not self.path("admin.crt").exists():
            self.issue("admin", "emporium-admin", org="system:masters")
        if not self.path("kube-controller-manager.crt").exists():
            self.issue("kube-controller-manager", "system:kube-controller-manager")
        if not self.path("sa.key").exists():
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _write_key(self.path("sa.key"), key)
            self.path("sa.pub").write_bytes(
                key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        return self

    def _make_ca(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name("emporium-local-ca"))
            .issuer_name(_name("emporium-local-ca"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        )
        cert = _validity(builder).sign(key, hashes.SHA256())
        _write_key(self.path("ca.key"), key)
        _write_cert(self.path("ca.crt"), cert)

    def issue(
        self,
        name: str,
        cn: str,
        *,
        org: str | None = None,
        server: bool = False,
        dns: list[str] | None = None,
        ips: list[str] | None = None,
    ) -> tuple[Path, Path]:
        ca_key = serialization.load_pem_private_key(self.path("ca.key").read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(self.path("ca.crt").read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn, org))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        )
        if dns or ips:
            sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns or []]
            sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips or []]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = _validity(builder).sign(ca_key, hashes.SHA256())
        _write_key(self.path(f"{name}.key"), key)
        _write_cert(self.path(f"{name}.crt"), cert)
        return self.path(f"{name}.crt"), self.path(f"{name}.key")
