"""The local certificate authority that encrypted tunnels' certificates come from.

Created once per SHOAL_HOME (`<home>/ca/ca.crt`, key 0600; `shoal ca` prints the path) with
Debian's `openssl`; a client trusts tunnels by trusting that file. The server's leaf certificate
is re-issued when the names it must carry change.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
from pathlib import Path

TIMEOUT = 30


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=TIMEOUT)


def ensure_ca(ca_dir: Path) -> Path:
    """The CA certificate's path, creating the CA if this home has none."""
    ca_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(ca_dir, 0o700)
    crt, key = ca_dir / "ca.crt", ca_dir / "ca.key"
    if not (crt.exists() and key.exists()):
        tmp_key, tmp_crt = ca_dir / "ca.key.tmp", ca_dir / "ca.crt.tmp"
        old = os.umask(0o077)
        try:
            _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                     "-nodes", "-keyout", str(tmp_key), "-out", str(tmp_crt), "-days", "3650",
                     "-subj", f"/CN=shoal local CA ({socket.gethostname()})",
                     "-addext", "basicConstraints=critical,CA:TRUE",
                     "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        finally:
            os.umask(old)
        os.chmod(tmp_crt, 0o644)
        os.rename(tmp_key, key)
        os.rename(tmp_crt, crt)
    return crt


def ensure_leaf(ca_dir: Path, names: list[str]) -> tuple[Path, Path]:
    """(certificate, key) for the tunnels' listeners, valid for `names` (host names or IPs)."""
    ensure_ca(ca_dir)
    sans = []
    for n in dict.fromkeys(names):
        try:
            ipaddress.ip_address(n)
            sans.append(f"IP:{n}")
        except ValueError:
            sans.append(f"DNS:{n}")
    want = ",".join(sans)
    crt, key, stamp = ca_dir / "tunnel.crt", ca_dir / "tunnel.key", ca_dir / "tunnel.names"
    if crt.exists() and key.exists() and stamp.exists() and stamp.read_text() == want:
        return crt, key
    csr, ext = ca_dir / "tunnel.csr", ca_dir / "tunnel.ext"
    ext.write_text(f"subjectAltName={want}\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
    old = os.umask(0o077)
    try:
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", str(key), "-out", str(csr), "-subj", "/CN=shoal tunnel")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_dir / "ca.crt"),
                 "-CAkey", str(ca_dir / "ca.key"), "-CAcreateserial", "-out", str(crt),
                 "-days", "825", "-extfile", str(ext))
    finally:
        os.umask(old)
    csr.unlink(missing_ok=True)
    stamp.write_text(want)
    return crt, key
