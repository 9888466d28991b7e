"""Kafka security options of `liqmon run`: what every client gets from them, the checks made
before connecting, and the SASL password, which never shows."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
import structlog

from monitor import cli
from monitor.service.broker import free_port
from monitor.service.runner import Monitor
from monitor.service.security import KafkaSecurity, Secret
from monitor.service.settings import ServiceSettings
from tests.support.cli import run_usage_error
from tests.support.kafka import fresh_settings, started_processes
from tests.support.paths import REPO
from tests.support.tls import self_signed

CONFIG = str(REPO / "examples" / "risk.toml")
PASSWORD = "pw-7f3a9c-never-shown"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    return self_signed(tmp_path_factory.mktemp("tls"), "127.0.0.1")


def sasl(**overrides: object) -> KafkaSecurity:
    fields: dict[str, object] = {"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                                 "sasl_username": "liqmon", "sasl_password": Secret(PASSWORD)}
    return KafkaSecurity(**{**fields, **overrides})  # type: ignore[arg-type]


def security_of(argv: list[str]) -> KafkaSecurity:
    """The security settings `liqmon run ARGV` would use (read from the environment too)."""
    return cli._kafka_security(cli.build_parser().parse_args(["run", *argv]))


# -- what the clients get ----------------------------------------------------------------------


def test_plaintext_clients_get_only_the_protocol() -> None:
    assert KafkaSecurity().client_kwargs() == {"security_protocol": "PLAINTEXT"}


def test_sasl_clients_get_mechanism_user_and_password() -> None:
    assert sasl().client_kwargs() == {
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "liqmon", "sasl_plain_password": PASSWORD}


def test_tls_clients_get_a_context_trusting_the_ca_file(certificate: tuple[Path, Path]) -> None:
    kwargs = KafkaSecurity("SSL", ssl_cafile=certificate[0]).client_kwargs()
    assert kwargs["security_protocol"] == "SSL"
    context = kwargs["ssl_context"]
    assert [ca["subject"] for ca in context.get_ca_certs()] == [((("commonName", "127.0.0.1"),),)]
    assert context.check_hostname is True


def test_sasl_ssl_clients_get_both_a_context_and_credentials(
        certificate: tuple[Path, Path]) -> None:
    kwargs = sasl(protocol="SASL_SSL", ssl_cafile=certificate[0]).client_kwargs()
    assert kwargs["ssl_context"] is not None
    assert kwargs["sasl_plain_password"] == PASSWORD


def test_no_ssl_check_hostname_reaches_the_context(certificate: tuple[Path, Path]) -> None:
    security = security_of(["--security-protocol", "SSL", "--ssl-cafile", str(certificate[0]),
                            "--no-ssl-check-hostname"])
    assert security.client_kwargs()["ssl_context"].check_hostname is False


def test_every_option_is_also_read_from_its_environment_variable(
        monkeypatch: pytest.MonkeyPatch, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    for name, value in {"SECURITY_PROTOCOL": "SASL_SSL", "SSL_CAFILE": str(cert),
                        "SSL_CERTFILE": str(cert), "SSL_KEYFILE": str(key),
                        "SSL_CHECK_HOSTNAME": "0", "SASL_MECHANISM": "PLAIN",
                        "SASL_USERNAME": "liqmon", "SASL_PASSWORD": PASSWORD}.items():
        monkeypatch.setenv(f"LIQMON_{name}", value)
    security = security_of([])
    assert security == KafkaSecurity(
        "SASL_SSL", ssl_cafile=cert, ssl_certfile=cert, ssl_keyfile=key,
        ssl_check_hostname=False, sasl_mechanism="PLAIN", sasl_username="liqmon",
        sasl_password=security.sasl_password)
    assert security.problems() == []
    assert security.client_kwargs()["sasl_plain_password"] == PASSWORD


def test_password_file_without_its_trailing_newline(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    security = security_of(["--sasl-password-file", str(secret)])
    assert security.sasl_password is not None
    assert security.sasl_password.reveal() == PASSWORD


# -- the password never shows ------------------------------------------------------------------


def test_password_is_not_in_the_repr_of_the_settings() -> None:
    settings = ServiceSettings(config_path=Path(CONFIG), security=sasl())
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings.security.sasl_password)


def test_password_on_the_command_line_is_refused_without_echoing_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--config", CONFIG, "--sasl-password", PASSWORD])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "LIQMON_SASL_PASSWORD" in err and "--sasl-password-file" in err
    assert PASSWORD not in err


@pytest.mark.parametrize("given", [
    ["--sasl-pass=" + PASSWORD],  # a prefix of two flags, which argparse would have named
    ["--sasl-passw=" + PASSWORD],
    ["--sasl-passwd=" + PASSWORD],  # a misspelling
    ["--sasl-passwd", PASSWORD],
    ["--sasl-pw=" + PASSWORD],  # a misspelling that does not say `pass`
    ["--sasl-p", PASSWORD],
])
def test_a_password_given_to_a_flag_liqmon_does_not_have_is_not_echoed(
        given: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--config", CONFIG, *given])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert given[0].partition("=")[0] in err and "(not repeated)" in err
    assert PASSWORD not in err


@pytest.mark.asyncio(loop_scope="session")
async def test_password_is_not_in_logs_or_metrics_of_a_running_service() -> None:
    """The process, at debug level, retrying a broker that is not there, and its /metrics."""
    metrics_port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "monitor.cli", "run", "--config", CONFIG,
        "--bootstrap", f"127.0.0.1:{free_port()}", "--log-level", "debug",
        "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1",
        "--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "SCRAM-SHA-512",
        "--sasl-username", "liqmon",
        env={"PATH": "/usr/bin:/bin", "LIQMON_SASL_PASSWORD": PASSWORD},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started_processes.append(proc)
    assert proc.stderr is not None
    logged = b""
    while logged.count(b"kafka unreachable, retrying") < 2:  # connected, failed, retried
        line = await asyncio.wait_for(proc.stderr.readline(), timeout=60)
        assert line, f"liqmon run exited early: {logged.decode()}"
        logged += line
    metrics = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                       timeout=10).read())
    proc.terminate()
    rest, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert b"liqmon_ready 0.0" in metrics
    assert PASSWORD.encode() not in logged + (rest or b"") + metrics
    (starting,) = [entry for entry in map(orjson.loads, logged.splitlines())
                   if entry["event"] == "starting"]  # says that a password is set, not which
    assert (starting["options"]["sasl-username"], starting["options"]["sasl-password"]) == (
        "liqmon", "(set)")


# -- refused at run time ---------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_a_broker_without_sasl_is_named_as_refusing_the_mechanism(broker, risk) -> None:
    """The embedded broker takes no SASL: the mechanism reaches its handshake and is refused."""
    settings = fresh_settings(broker.bootstrap, security=sasl())
    monitor = Monitor(settings, risk)
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(monitor.run())
        deadline = time.monotonic() + 60  # a hang guard only
        while not any(e["event"] == "kafka refused the connection, retrying" for e in logs) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not monitor.ready.is_set()
        monitor.request_stop()
        await asyncio.wait_for(task, timeout=30)
    (refused,) = [e for e in logs if e["event"] == "kafka refused the connection, retrying"]
    assert refused["cause"] == (f"SASL: {broker.bootstrap} does not accept SCRAM-SHA-512: it "
                                "offers no SASL mechanism on this listener")
    assert PASSWORD not in repr(logs)


# -- checked at start: usage errors, exit status 2 ------------------------------------------------


def test_sasl_protocol_without_mechanism_user_or_password_is_a_usage_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    err = run_usage_error(["--security-protocol", "SASL_SSL"], capsys)
    assert "SASL_SSL needs --sasl-mechanism" in err
    assert "SASL_SSL needs --sasl-username" in err
    assert "SASL_SSL needs the SASL password (LIQMON_SASL_PASSWORD or --sasl-password-file)" in err


def test_sasl_settings_without_a_sasl_protocol_are_a_usage_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    err = run_usage_error(["--sasl-username", "liqmon"], capsys)
    assert "SASL settings given but --security-protocol is PLAINTEXT" in err


def test_tls_files_without_a_tls_protocol_are_a_usage_error(
        capsys: pytest.CaptureFixture[str], certificate: tuple[Path, Path]) -> None:
    err = run_usage_error(["--ssl-cafile", str(certificate[0])], capsys)
    assert "--ssl-cafile given but --security-protocol is PLAINTEXT" in err


def test_certfile_without_keyfile_is_a_usage_error(
        capsys: pytest.CaptureFixture[str], certificate: tuple[Path, Path]) -> None:
    err = run_usage_error(["--security-protocol", "SSL", "--ssl-certfile", str(certificate[0])],
                          capsys)
    assert "--ssl-certfile and --ssl-keyfile go together" in err


def test_a_missing_tls_file_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    err = run_usage_error(["--security-protocol", "SSL", "--ssl-cafile",
                           str(tmp_path / "ca.pem")], capsys)
    assert f"--ssl-cafile {tmp_path / 'ca.pem'}: no such file" in err


def test_a_tls_file_given_as_its_directory_is_a_usage_error_naming_the_directory(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = run_usage_error(["--security-protocol", "SSL", "--ssl-cafile", str(tmp_path)], capsys)
    assert f"--ssl-cafile {tmp_path}: a directory, not a file" in err


def test_a_tls_file_that_is_not_pem_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    err = run_usage_error(["--security-protocol", "SSL", "--ssl-cafile", str(ca)], capsys)
    assert f"cannot load the TLS files (--ssl-cafile {ca})" in err


def test_no_ssl_check_hostname_without_a_tls_protocol_is_a_usage_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    err = run_usage_error(["--no-ssl-check-hostname"], capsys)
    assert "--no-ssl-check-hostname given but --security-protocol is PLAINTEXT" in err


def test_an_unknown_protocol_from_the_environment_is_a_usage_error(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIQMON_SECURITY_PROTOCOL", "TLS")
    err = run_usage_error([], capsys)
    assert ("--security-protocol: invalid choice: 'TLS' (choose from PLAINTEXT, SSL, "
            "SASL_PLAINTEXT, SASL_SSL) (from LIQMON_SECURITY_PROTOCOL)") in err


def test_an_unknown_mechanism_from_the_environment_is_a_usage_error(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIQMON_SASL_MECHANISM", "OAUTHBEARER")
    monkeypatch.setenv("LIQMON_SASL_PASSWORD", PASSWORD)
    err = run_usage_error(["--security-protocol", "SASL_SSL", "--sasl-username", "u"], capsys)
    assert ("--sasl-mechanism: invalid choice: 'OAUTHBEARER' (choose from PLAIN, SCRAM-SHA-256, "
            "SCRAM-SHA-512) (from LIQMON_SASL_MECHANISM)") in err


def test_password_from_both_environment_and_file_is_a_usage_error(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD)
    monkeypatch.setenv("LIQMON_SASL_PASSWORD", PASSWORD)
    err = run_usage_error(["--sasl-password-file", str(secret)], capsys)
    assert "the SASL password is given twice" in err
    assert PASSWORD not in err


def test_a_missing_password_file_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    err = run_usage_error(["--sasl-password-file", str(tmp_path / "password")], capsys)
    assert f"cannot read --sasl-password-file {tmp_path / 'password'}" in err


def test_an_empty_password_file_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("\n")
    err = run_usage_error(["--sasl-password-file", str(secret)], capsys)
    assert f"--sasl-password-file {secret} is empty" in err


def test_a_password_file_that_is_not_text_is_a_usage_error_that_quotes_none_of_it(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_bytes(b"pw\xff\xfe-secret")
    err = run_usage_error(["--sasl-password-file", str(secret)], capsys)
    assert f"--sasl-password-file {secret} is not UTF-8 text" in err
    assert "secret" not in err.replace(str(secret), "")
