"""`drl smoke` against the real services, and its failure path."""

from __future__ import annotations

import socket

import pytest

from aggregator.cli import main


@pytest.mark.integration
def test_smoke_passes_against_real_services(
    kafka_bootstrap: str, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["smoke", "--kafka-bootstrap", kafka_bootstrap, "--redis-url", redis_url])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "consumed it with kafka-python" in out
    assert "EVALSHA" in out
    assert "drl smoke: OK" in out


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_smoke_fails_clearly_when_kafka_is_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    port = _closed_port()
    rc = main(
        [
            "smoke",
            "--kafka-bootstrap",
            f"127.0.0.1:{port}",
            "--redis-url",
            f"redis://127.0.0.1:{port}/0",
            "--timeout",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "drl smoke: FAILED: kafka" in err
