"""Throwaway certificates for a local secured broker (tests, demos), made with the openssl CLI.

A CA, a server certificate for 127.0.0.1/localhost signed by it (also as a PKCS12 keystore,
which the broker reads) and a client certificate for mTLS. Never for production: the keys are
unencrypted PEM files next to the certificates, valid for 30 days.
"""
from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from streamagent.errors import BrokerError


@dataclass(frozen=True)
class LocalCerts:
    dir: Path
    keystore_password: str

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def server_keystore(self) -> Path:
        return self.dir / "server.p12"

    @property
    def client_cert(self) -> Path:
        return self.dir / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.dir / "client.key"


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if not exe:
        raise BrokerError("'openssl' was not found on PATH; it makes the local broker's "
                          "certificates (Debian: apt-get install openssl)")
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BrokerError(f"openssl {args[0]} failed:\n{proc.stdout}{proc.stderr}")


def _signed(d: Path, name: str, cn: str, ext: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    (d / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "30", "-sha256",
             "-extfile", f"{name}.ext", cwd=d)


def make_local_certs(d: Path) -> LocalCerts:
    """Make (or reuse, if ``d`` has them) a CA, a server keystore and a client certificate."""
    d.mkdir(parents=True, exist_ok=True)
    pw_file = d / "keystore.password"
    if pw_file.exists() and (d / "server.p12").exists() and (d / "client.pem").exists():
        return LocalCerts(d, pw_file.read_text().strip())
    password = secrets.token_hex(16)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "30", "-sha256", "-subj", "/CN=streamagent local test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _signed(d, "server", "localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "extendedKeyUsage=serverAuth,clientAuth\n")  # clientAuth: the broker's own links
    _openssl("pkcs12", "-export", "-in", "server.pem", "-inkey", "server.key",
             "-certfile", "ca.pem", "-name", "kafka", "-out", "server.p12",
             "-passout", f"pass:{password}", cwd=d)
    _signed(d, "client", "streamagent-client", "extendedKeyUsage=clientAuth\n")
    for f in d.glob("*.key"):
        f.chmod(0o600)
    pw_file.write_text(password)
    pw_file.chmod(0o600)
    return LocalCerts(d, password)
