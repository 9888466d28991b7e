"""TLS certificates for the tests of the service over TLS."""

from __future__ import annotations

import subprocess
from pathlib import Path


def self_signed(directory: Path, name: str, san: str = "IP:127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) and its key, made with the openssl CLI."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", f"/CN={name}", "-addext",
                    f"subjectAltName={san}"], check=True, capture_output=True, timeout=60)
    return cert, key
