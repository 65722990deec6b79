"""Operator commands against a server that is not there, or that refuses: one line, exit 1."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from typer.testing import CliRunner

from mlxtg.cli.main import app


def one_error_line(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "command", [["status"], ["status", "--json"], ["evict", "--all"], ["load", "m"]]
)
def test_a_dead_port_is_one_line(command: list[str]):
    line = one_error_line([*command, "--port", str(free_port())])
    assert "cannot reach http://127.0.0.1:" in line and "mlxtg up" in line


def test_a_stale_server_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # What a SIGKILLed supervisor leaves behind: server.json naming a port nobody serves.
    monkeypatch.setenv("MLXTG_HOME", str(tmp_path))
    (tmp_path / "run").mkdir()
    url = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "run" / "server.json").write_text(json.dumps({"pid": 1, "url": url}))
    assert url in one_error_line(["status"])


def test_no_server_recorded_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLXTG_HOME", str(tmp_path))
    assert "no running server found" in one_error_line(["status"])


def test_an_error_answer_is_one_line(monkeypatch: pytest.MonkeyPatch):
    def refuse(method: str, url: str, **kwargs: object) -> httpx.Response:
        body = {"error": {"message": "Incorrect API key provided.", "type": "authentication_error"}}
        return httpx.Response(401, json=body)

    monkeypatch.setattr(httpx, "request", refuse)
    line = one_error_line(["status", "--port", "5999"])
    assert line.endswith("/admin/status: HTTP 401: Incorrect API key provided.")
