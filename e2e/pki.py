"""Certificates and keys for a throwaway local control plane, made with the openssl CLI.

One CA signs the apiserver's serving certificate and one client certificate per
identity (admin in ``system:masters``, the controller manager, the scheduler); a
second CA signs the front-proxy client certificate of the aggregation layer.
A separate key pair signs ServiceAccount tokens. EC P-256 keys keep generation
fast (tens of milliseconds); everything is valid for a year and never leaves the
cluster's own directory.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "365"


@dataclass(frozen=True)
class Pki:
    """Paths of everything the control-plane flags and kubeconfigs reference."""

    dir: Path

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def ca_cert(self) -> Path:
        return self.path("ca.crt")

    @property
    def ca_key(self) -> Path:
        return self.path("ca.key")

    @property
    def sa_key(self) -> Path:
        return self.path("sa.key")

    @property
    def sa_pub(self) -> Path:
        return self.path("sa.pub")

    def cert(self, name: str) -> Path:
        return self.path(f"{name}.crt")

    def key(self, name: str) -> Path:
        return self.path(f"{name}.key")


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def _ec_key(path: Path) -> None:
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(path), cwd=path.parent)
    path.chmod(0o600)


def _sign(pki: Pki, name: str, subject: str, extensions: str, ca: str = "ca") -> None:
    """Create ``name.key`` and a ``ca``-signed ``name.crt`` with the given X.509v3 extensions."""
    key, csr, ext = pki.key(name), pki.path(f"{name}.csr"), pki.path(f"{name}.ext")
    _ec_key(key)
    ext.write_text(extensions)
    _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr), cwd=pki.dir)
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(pki.cert(ca)), "-CAkey", str(pki.key(ca)),
        "-CAcreateserial", "-days", DAYS, "-sha256", "-extfile", str(ext), "-out", str(pki.cert(name)),
        cwd=pki.dir,
    )
    csr.unlink()
    ext.unlink()


CLIENT_EXT = "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"

# name -> certificate subject; O= is the group the apiserver sees.
CLIENT_IDENTITIES = {
    "admin": "/O=system:masters/CN=kvfleet-admin",
    "controller-manager": "/CN=system:kube-controller-manager",
    "scheduler": "/CN=system:kube-scheduler",
}


def create_pki(directory: Path) -> Pki:
    """Generate the CA, apiserver serving cert, client certs and SA signing keys in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory)
    for ca, cn in (("ca", "kvfleet-local-ca"), ("front-proxy-ca", "kvfleet-front-proxy-ca")):
        _ec_key(pki.key(ca))
        _openssl(
            "req", "-x509", "-new", "-key", str(pki.key(ca)), "-subj", f"/CN={cn}", "-days", DAYS,
            "-sha256", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", "-out", str(pki.cert(ca)),
            cwd=directory,
        )
    sans = ",".join([
        "IP:127.0.0.1", "IP:10.96.0.1", "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default",
        "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local",
    ])
    _sign(pki, "apiserver", "/CN=kube-apiserver",
          "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
          f"subjectAltName={sans}\n")
    for name, subject in CLIENT_IDENTITIES.items():
        _sign(pki, name, subject, CLIENT_EXT)
    # The aggregation layer: the apiserver authenticates to extension apiservers with this.
    _sign(pki, "front-proxy-client", "/CN=front-proxy-client", CLIENT_EXT, ca="front-proxy-ca")
    _ec_key(pki.sa_key)
    _openssl("ec", "-in", str(pki.sa_key), "-pubout", "-out", str(pki.sa_pub), cwd=directory)
    return pki
