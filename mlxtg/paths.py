"""Where state lives: everything under `$MLXTG_HOME` (default: the platform's user data dir)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from platformdirs import user_data_dir

_IPC_MAX = 100  # sockaddr_un paths are limited to ~104-108 bytes


def home() -> Path:
    env = os.environ.get("MLXTG_HOME")
    path = Path(env).expanduser() if env else Path(user_data_dir("mlxtg", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_dir() -> Path:
    path = home() / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def logs_dir() -> Path:
    path = home() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    path = home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def ipc_endpoint(name: str) -> str:
    """An `ipc://` endpoint for this home; falls back to a short path in the temp dir
    (keyed by the home) when the home's path is too long for a Unix socket."""
    path = run_dir() / f"{name}.sock"
    if len(str(path)) > _IPC_MAX:
        digest = hashlib.sha1(str(home()).encode()).hexdigest()[:12]
        short = Path(tempfile.gettempdir()) / f"mlxtg-{digest}"
        short.mkdir(parents=True, exist_ok=True)
        path = short / f"{name}.sock"
    return f"ipc://{path}"


def server_file() -> Path:
    return run_dir() / "server.json"


def write_server_info(info: dict[str, Any]) -> None:
    target = server_file()
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(target)


def read_server_info() -> dict[str, Any] | None:
    try:
        data = json.loads(server_file().read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
