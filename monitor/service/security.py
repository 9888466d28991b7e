"""Kafka TLS and SASL: the settings behind `liqmon run`'s security options, checked at start,
and the keyword arguments every aiokafka client the service creates gets from them."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.service.options import option

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class Secret:
    """A password. Its repr and str never show it, so neither can a settings repr, a log line
    or a traceback that happens to include it; only the Kafka clients get reveal()."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


def _optional_path(text: str) -> Path | None:
    return Path(text) if text else None


def _optional_text(text: str) -> str | None:
    return text or None


@dataclass(frozen=True, slots=True)
class KafkaSecurity:
    """How the service's Kafka clients authenticate and encrypt; PLAINTEXT by default."""

    protocol: str = field(default="PLAINTEXT", metadata=option(
        "--security-protocol", f"how to reach Kafka: {', '.join(PROTOCOLS)}, default {{default}}",
        choices=PROTOCOLS))
    ssl_cafile: Path | None = field(default=None, metadata=option(  # None: the system's CAs
        "--ssl-cafile", "CA certificates (PEM) the brokers' certificates must chain to, "
        "default: the system's", metavar="PATH", to_field=_optional_path))
    ssl_certfile: Path | None = field(default=None, metadata=option(  # for mutual TLS
        "--ssl-certfile", "client certificate (PEM) for mutual TLS, with --ssl-keyfile",
        metavar="PATH", to_field=_optional_path))
    ssl_keyfile: Path | None = field(default=None, metadata=option(
        "--ssl-keyfile", "private key (PEM, unencrypted) of --ssl-certfile", metavar="PATH",
        to_field=_optional_path))
    ssl_check_hostname: bool = field(default=True, metadata=option(
        "--ssl-check-hostname", "check that a broker's certificate names the host connected "
        "to, default on", kind="toggle"))
    sasl_mechanism: str | None = field(default=None, metadata=option(
        "--sasl-mechanism", f"SASL mechanism: {', '.join(MECHANISMS)}", choices=MECHANISMS,
        to_field=_optional_text))
    sasl_username: str | None = field(default=None, metadata=option(
        "--sasl-username", "SASL user name", to_field=_optional_text))
    # never a flag of its own: a command line is readable by every user of the machine
    sasl_password: Secret | None = field(default=None, metadata=option(
        "--sasl-password-file", "file holding the SASL password (or set env {secret_env}; "
        "never a command-line value)", metavar="PATH", secret="SASL password",
        to_field=Secret))

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    def problems(self) -> list[str]:
        """One message per inconsistent or missing setting; empty when the clients can be
        built. Checked at start: a mistake here would otherwise surface as a broker that
        never answers."""
        if self.protocol not in PROTOCOLS:
            return [f"--security-protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}"]
        problems = []
        files = {"--ssl-cafile": self.ssl_cafile, "--ssl-certfile": self.ssl_certfile,
                 "--ssl-keyfile": self.ssl_keyfile}
        given = [option for option, path in files.items() if path is not None]
        if not self.ssl_check_hostname:
            given.append("--no-ssl-check-hostname")
        if given and not self.tls:
            problems.append(f"{', '.join(given)} given but --security-protocol is "
                            f"{self.protocol}: TLS options need SSL or SASL_SSL")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            problems.append("--ssl-certfile and --ssl-keyfile go together (mutual TLS needs "
                            "the client certificate and its key)")
        problems += [_not_a_file(option, path) for option, path in files.items()
                     if path is not None and not path.is_file()]
        sasl = {"--sasl-mechanism": self.sasl_mechanism, "--sasl-username": self.sasl_username,
                "the SASL password (LIQMON_SASL_PASSWORD or --sasl-password-file)":
                    self.sasl_password}
        if self.sasl:
            problems += [f"--security-protocol {self.protocol} needs {what}"
                         for what, value in sasl.items() if not value]
        elif any(sasl.values()):
            problems.append(f"SASL settings given but --security-protocol is {self.protocol}: "
                            "they need SASL_PLAINTEXT or SASL_SSL")
        if self.sasl_mechanism is not None and self.sasl_mechanism not in MECHANISMS:
            problems.append(f"--sasl-mechanism {self.sasl_mechanism!r} is not one of "
                            f"{', '.join(MECHANISMS)}")
        if not problems and self.tls:
            try:
                self.ssl_context()
            except (ssl.SSLError, OSError) as exc:  # not PEM, or a key that is not the cert's
                named = [f"{option} {path}" for option, path in files.items() if path]
                problems.append(f"cannot load the TLS files ({', '.join(named)}): {exc}")
        return problems

    def ssl_context(self) -> ssl.SSLContext:
        # aiokafka is imported here, not at the top: settings are built for every command
        # and importing aiokafka costs each of them 65 ms
        from aiokafka.helpers import create_ssl_context

        context: ssl.SSLContext = create_ssl_context(
            cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile)
        context.check_hostname = self.ssl_check_hostname
        return context

    def client_kwargs(self) -> dict[str, Any]:
        """What every aiokafka client (admin, producer, consumer) takes for these settings."""
        kwargs: dict[str, Any] = {"security_protocol": self.protocol}
        if self.tls:
            kwargs["ssl_context"] = self.ssl_context()
        if self.sasl:
            assert self.sasl_password is not None  # problems() says so before any client
            kwargs.update(sasl_mechanism=self.sasl_mechanism,
                          sasl_plain_username=self.sasl_username,
                          sasl_plain_password=self.sasl_password.reveal())
        return kwargs


PLAINTEXT = KafkaSecurity()  # no TLS, no SASL: the embedded broker's


async def refusal(bootstrap: str, security: KafkaSecurity, request_timeout_ms: int) -> str | None:
    """Why the brokers refuse this client — a certificate it does not trust, a failed TLS
    handshake, rejected credentials — or None when none answers at all or one accepts it.

    aiokafka turns any failed bootstrap into "Unable to bootstrap" and keeps the cause for its
    own log; one connection of our own, with the same settings, gets the cause back.
    """
    from aiokafka.conn import collect_hosts, create_conn
    from aiokafka.errors import (
        AuthenticationFailedError,
        KafkaError,
        SaslAuthenticationFailed,
        UnsupportedSaslMechanismError,
    )

    if security.protocol == "PLAINTEXT":
        return None  # nothing to refuse: no certificate, no credentials
    kwargs = security.client_kwargs()
    for host, port, _ in collect_hosts(bootstrap, randomize=False):
        try:
            conn = await create_conn(host, port, client_id="liqmon-diagnosis",
                                     request_timeout_ms=request_timeout_ms, **kwargs)
        except ssl.SSLCertVerificationError as exc:
            return (f"TLS: the certificate of {host}:{port} is not trusted "
                    f"({exc.verify_message}); check --ssl-cafile and the broker's name")
        except ssl.SSLError as exc:
            return (f"TLS handshake with {host}:{port} failed ({exc.reason or exc}); is it a "
                    "TLS listener, and does it accept this client's certificate?")
        except (SaslAuthenticationFailed, AuthenticationFailedError) as exc:
            return (f"SASL {security.sasl_mechanism} authentication of user "
                    f"{security.sasl_username!r} rejected by {host}:{port}: {exc}")
        except UnsupportedSaslMechanismError as exc:
            # raised with the mechanisms the broker offers, or with only an error code when
            # its listener takes no SASL at all
            offered = exc.args[0] if exc.args and isinstance(exc.args[0], str) else \
                "it offers no SASL mechanism on this listener"
            return (f"SASL: {host}:{port} does not accept {security.sasl_mechanism}: "
                    f"{offered}")
        except TimeoutError:
            if "SSL" in security.protocol and await _accepts(host, port, request_timeout_ms):
                # the embedded broker's plaintext listener waits for a Kafka request: to a
                # TLS hello it says nothing, which would otherwise read as a network fault
                return (f"TLS handshake with {host}:{port} got no answer within "
                        f"{request_timeout_ms} ms, though it accepts connections: is it a "
                        "TLS listener? (a plaintext one never answers a TLS hello)")
            continue
        except (OSError, KafkaError):
            continue  # this one does not answer: unreachable, not refusing
        conn.close()
        return None
    return None


async def _accepts(host: str, port: int, timeout_ms: int) -> bool:
    """Does ``host:port`` accept a TCP connection within ``timeout_ms``?"""
    try:
        async with asyncio.timeout(timeout_ms / 1000):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


def _not_a_file(option: str, path: Path) -> str:
    """Why a TLS file's path cannot be read as one (a mounted secret's directory is the usual
    mistake: the PEM file is inside it)."""
    if path.is_dir():
        return f"{option} {path}: a directory, not a file (give the PEM file inside it)"
    return f"{option} {path}: no such file"
