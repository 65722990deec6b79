"""`mlxtg service`: rendering the launchd plist / systemd unit, and install/uninstall/status.

The service manager is never the real one: every CLI test puts fake `systemctl` /
`launchctl` scripts (or none) alone on PATH, and $MLXTG_SERVICE_DIR / $MLXTG_HOME point
into tmp_path, so the tests behave the same on Linux and macOS, in a container or not.
"""

from __future__ import annotations

import os
import plistlib
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mlxtg.cli import service
from mlxtg.cli.service import (
    KEYS_ENV,
    LABEL,
    UNIT_NAME,
    render_env_file,
    render_launchd_plist,
    render_systemd_unit,
    service_app,
    systemd_quote,
)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KEY = "sk-test_Key.1~+/="


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _unit_settings(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every setting, in order (keys may repeat)."""
    out, section = [], ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key, value))
    return out


def _one(settings: list[tuple[str, str, str]], key: str) -> str:
    values = [v for _, k, v in settings if k == key]
    assert len(values) == 1, (key, values)
    return values[0]


# --------------------------------------------------------------------------- templates


def test_top_level_deploy_folder_is_the_package_data() -> None:
    if not DEPLOY.exists():
        pytest.skip("no deploy/ folder (not a source checkout)")
    assert (DEPLOY / "systemd" / "mlxtg.service.in").read_text() == service.SYSTEMD_TEMPLATE
    assert (DEPLOY / "launchd" / "com.mlxtg.server.plist.in").read_text() == service.LAUNCHD_TEMPLATE


# --------------------------------------------------------------------------- launchd


def test_render_launchd_plist() -> None:
    argv = ["/opt/my env/bin/mlxtg", "up", "--config", "/a & b/<models>.yaml", "--port", "8080"]
    env = {"MLXTG_HOME": "/h & <o>/m", "PATH": "/opt/my env/bin:/usr/bin:/bin"}
    log = Path("/h & <o>/m/logs/service.log")
    text = render_launchd_plist(
        argv, environment=env, log_file=log, working_directory=Path("/h & <o>/m")
    )
    plist = plistlib.loads(text.encode())
    assert plist["Label"] == LABEL
    assert plist["ProgramArguments"] == argv
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # restart on failure only
    assert plist["RunAtLoad"] is True
    assert plist["ProcessType"] in ("Interactive", "Standard")
    assert isinstance(plist["ThrottleInterval"], int) and plist["ThrottleInterval"] > 0
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == str(log)
    assert plist["EnvironmentVariables"] == env  # no keys, no MLXTG_API_KEYS
    assert plist["WorkingDirectory"] == "/h & <o>/m"


def test_launchd_plist_carries_the_keys_in_its_environment() -> None:
    text = render_launchd_plist(
        ["/bin/mlxtg", "up"],
        environment={"MLXTG_HOME": "/h"},
        log_file=Path("/h/logs/service.log"),
        working_directory=Path("/h"),
        api_keys=[KEY, "k2"],
    )
    plist = plistlib.loads(text.encode())
    assert plist["EnvironmentVariables"][KEYS_ENV] == f"{KEY},k2"
    assert KEY not in plist["ProgramArguments"]


def test_launchd_plist_passes_plutil_when_present(tmp_path: Path) -> None:
    plutil = shutil.which("plutil")
    if plutil is None:
        pytest.skip("plutil not found (macOS only)")
    path = tmp_path / "p.plist"
    path.write_text(
        render_launchd_plist(
            ["/bin/mlxtg", "up"],
            environment={"MLXTG_HOME": "/h"},
            log_file=Path("/h/l.log"),
            working_directory=Path("/h"),
        )
    )
    subprocess.run([plutil, "-lint", str(path)], check=True, capture_output=True)


# --------------------------------------------------------------------------- systemd


def _render_unit(exe: str = "/usr/bin/mlxtg", env_file: Path | None = None) -> str:
    return render_systemd_unit(
        [exe, "up", "--config", "/m o/d%s $x.yaml", "--port", "8080"],
        environment={"MLXTG_HOME": "/var/h o/m%e", "PYTHONUNBUFFERED": "1"},
        log_file=Path("/var/h o/m%e/logs/service.log"),
        env_file=env_file,
    )


def test_render_systemd_unit() -> None:
    settings = _unit_settings(_render_unit())
    assert _one(settings, "Type") == "simple"
    assert _one(settings, "Restart") == "on-failure"
    assert _one(settings, "RestartSec") == "5"
    assert _one(settings, "KillSignal") == "SIGTERM"
    assert _one(settings, "TimeoutStopSec") == "45"  # the default 30 s drain + 15 s
    assert _one(settings, "WantedBy") == "default.target"
    assert ("Install", "WantedBy", "default.target") in settings
    # `%` is doubled everywhere (specifiers), `$` in the arguments (variables)
    exec_start = _one(settings, "ExecStart")
    assert shlex.split(exec_start) == [
        "/usr/bin/mlxtg",
        "up",
        "--config",
        "/m o/d%%s $$x.yaml",
        "--port",
        "8080",
    ]
    envs = [v for _, k, v in settings if k == "Environment"]
    assert '"MLXTG_HOME=/var/h o/m%%e"' in envs
    assert _one(settings, "StandardOutput") == "append:/var/h o/m%%e/logs/service.log"
    assert not [k for _, k, _ in settings if k == "EnvironmentFile"]


def test_systemd_unit_reads_keys_from_the_env_file() -> None:
    text = _render_unit(env_file=Path("/var/h/service.env"))
    assert _one(_unit_settings(text), "EnvironmentFile") == "/var/h/service.env"
    assert render_env_file([KEY, "k2"]) == f"{KEYS_ENV}='{KEY},k2'\n"
    with pytest.raises(ValueError):
        render_env_file(["a,b"])


@pytest.mark.parametrize(
    ("arg", "quoted"),
    [
        ("plain", "plain"),
        ("a b", '"a b"'),
        ("50%", "50%%"),
        ("$HOME", "$$HOME"),
        ('x"y', '"x\\"y"'),
        ("a\\b", '"a\\\\b"'),
        (";", '";"'),
        ("", '""'),
    ],
)
def test_systemd_quote(arg: str, quoted: str) -> None:
    assert systemd_quote(arg) == quoted


def test_systemd_unit_rejects_what_systemd_cannot_run() -> None:
    with pytest.raises(ValueError):
        _render_unit(exe="relative/mlxtg")
    with pytest.raises(ValueError):
        _render_unit(exe='/a"b/mlxtg')
    with pytest.raises(ValueError):
        systemd_quote("two\nlines")


def _verify_command(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """`systemd-analyze verify --user` when it works here (it needs a runtime dir, not a
    running user manager), else the system-mode `verify`."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    probe = tmp_path / "probe" / "probe.service"
    probe.parent.mkdir()
    probe.write_text("[Service]\nExecStart=/bin/sh -c true\n")
    cmd = ["systemd-analyze", "verify", "--user"]
    if subprocess.run([*cmd, str(probe)], env=env, capture_output=True).returncode != 0:
        cmd = ["systemd-analyze", "verify"]
    return cmd, env


@pytest.mark.parametrize("with_keys", [False, True])
def test_systemd_analyze_verify(tmp_path: Path, with_keys: bool) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not found (apt-get install systemd to run this check)")
    # verify checks that the executable exists, so it proves the path was parsed exactly
    exe = tmp_path / "my env 50% $HOME" / "mlxtg"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    home = tmp_path / "home %h"
    env_file = home / "service.env" if with_keys else None
    unit = tmp_path / "units" / UNIT_NAME
    unit.parent.mkdir()
    unit.write_text(
        render_systemd_unit(
            [str(exe), "up", "--config", str(home / "it's $X.yaml"), "--max-batch", "8"],
            environment={"MLXTG_HOME": str(home), "PYTHONUNBUFFERED": "1"},
            log_file=home / "logs" / "service.log",
            env_file=env_file,
        )
    )
    cmd, env = _verify_command(tmp_path)
    result = subprocess.run([*cmd, str(unit)], env=env, capture_output=True, text=True)
    ours = [line for line in result.stderr.splitlines() if UNIT_NAME in line]
    assert result.returncode == 0, result.stderr
    assert not ours, ours  # e.g. "Unknown key ..., ignoring" would be a silent bug


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run `service_app` with the unit dir, home and PATH inside tmp_path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("MLXTG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(service.DIR_ENV, str(tmp_path / "units"))
    for name in service.PASSTHROUGH_ENV:
        monkeypatch.delenv(name, raising=False)

    class Cli:
        home = tmp_path / "home"
        units = tmp_path / "units"
        calls = tmp_path / "calls.log"

        def __call__(self, kind: str, *args: str) -> Any:
            monkeypatch.setenv(service.MANAGER_ENV, kind)
            return CliRunner().invoke(service_app, list(args))

        def fake(self, tool: str, code: int = 0, fail_on: str = "", stdout: str = "") -> None:
            """A `tool` on PATH that logs its arguments and exits `code` (or 1 when its
            arguments contain `fail_on`)."""
            script = bin_dir / tool
            lines = ["#!/bin/sh", f'echo "{tool} $*" >> "{self.calls}"']
            if fail_on:
                lines.append(f'case "$*" in *"{fail_on}"*) echo "{tool}: no" >&2; exit 1;; esac')
            if stdout:
                lines.append(f'echo "{stdout}"')
            lines.append(f"exit {code}")
            script.write_text("\n".join(lines) + "\n")
            script.chmod(0o755)

        def called(self) -> list[str]:
            return self.calls.read_text().splitlines() if self.calls.exists() else []

        def file(self, kind: str) -> Path:
            return self.units / (f"{LABEL}.plist" if kind == "launchd" else UNIT_NAME)

    return Cli()


KINDS = ["systemd", "launchd"]


@pytest.mark.parametrize("kind", KINDS)
def test_install_dry_run_writes_nothing(cli, tmp_path: Path, kind: str) -> None:
    cli.fake("systemctl")
    cli.fake("launchctl")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli(kind, "install", "--dry-run", "--port", "8080", "--api-key", KEY)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no home, no unit dir
    assert cli.called() == []
    assert KEY not in result.output  # masked
    assert str(cli.file(kind)) in result.output
    assert "--port 8080" in result.output or "<string>8080</string>" in result.output
    tool = "systemctl --user" if kind == "systemd" else "launchctl bootstrap"
    assert tool in result.output


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keys", [[], [KEY, "second"]])
def test_install_writes_the_file_and_survives_a_failing_manager(
    cli, kind: str, keys: list[str]
) -> None:
    cli.fake("systemctl", code=1)
    cli.fake("launchctl", code=1)
    args = [a for k in keys for a in ("--api-key", k)]
    result = cli(kind, "install", "--host", "127.0.0.1", "--port", "8080", *args)
    assert result.exit_code == 0, result.output
    assert "note:" in result.output and "to start it run:" in result.output
    path = cli.file(kind)
    text = path.read_text()
    env_file = cli.home / service.ENV_FILE_NAME
    if kind == "launchd":
        plist = plistlib.loads(path.read_bytes())
        argv = plist["ProgramArguments"]
        assert _mode(path) == (0o600 if keys else 0o644)
        assert plist["EnvironmentVariables"].get(KEYS_ENV) == (",".join(keys) or None)
        assert plist["EnvironmentVariables"]["MLXTG_HOME"] == str(cli.home)
        assert not env_file.exists()
    else:
        argv = shlex.split(_one(_unit_settings(text), "ExecStart"))
        assert _mode(path) == 0o644
        assert KEY not in text
        if keys:
            assert _mode(env_file) == 0o600
            assert env_file.read_text() == render_env_file(keys)
            assert _one(_unit_settings(text), "EnvironmentFile") == str(env_file)
        else:
            assert not env_file.exists()
    assert Path(argv[0]).is_absolute()
    assert argv[1:] == ["up", "--host", "127.0.0.1", "--port", "8080"]
    assert (cli.home / "logs").is_dir()


@pytest.mark.parametrize("kind", KINDS)
def test_install_without_a_service_manager(cli, kind: str) -> None:
    result = cli(kind, "install")
    assert result.exit_code == 0, result.output
    assert cli.file(kind).exists()
    assert re.search(r"(systemctl|launchctl) not found", result.output)


def test_install_runs_systemctl(cli) -> None:
    cli.fake("systemctl")
    result = cli("systemd", "install")
    assert result.exit_code == 0, result.output
    assert cli.called() == [
        "systemctl --user daemon-reload",
        f"systemctl --user enable {UNIT_NAME}",
        f"systemctl --user restart {UNIT_NAME}",
    ]
    cli.calls.unlink()
    assert cli("systemd", "install", "--no-start").exit_code == 0
    assert cli.called() == [
        "systemctl --user daemon-reload",
        f"systemctl --user enable {UNIT_NAME}",
    ]


def test_install_runs_launchctl_with_a_fallback(cli) -> None:
    cli.fake("launchctl", fail_on="bootstrap")
    result = cli("launchd", "install")
    assert result.exit_code == 0, result.output
    uid, plist = os.getuid(), cli.file("launchd")
    assert cli.called() == [
        f"launchctl bootout gui/{uid}/{LABEL}",
        f"launchctl enable gui/{uid}/{LABEL}",
        f"launchctl bootstrap gui/{uid} {plist}",
        f"launchctl load -w {plist}",
    ]
    assert "note:" not in result.output


def test_install_relative_config_is_made_absolute(cli, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "models.yaml").write_text("- model_id_or_path: some-org/some-model\n")
    monkeypatch.chdir(tmp_path)
    result = cli("launchd", "install", "--config", "models.yaml")
    assert result.exit_code == 0, result.output
    argv = plistlib.loads(cli.file("launchd").read_bytes())["ProgramArguments"]
    assert argv[1:] == ["up", "--config", str(tmp_path / "models.yaml")]


def test_install_passes_flags_after_double_dash(cli) -> None:
    result = cli("launchd", "install", "--port", "9000", "--", "--max-batch", "64")
    assert result.exit_code == 0, result.output
    argv = plistlib.loads(cli.file("launchd").read_bytes())["ProgramArguments"]
    assert argv[1:] == ["up", "--port", "9000", "--max-batch", "64"]


@pytest.mark.parametrize(
    "args",
    [
        ["--", "--no-such-flag"],  # `mlxtg up` would exit 2 on every start
        ["--", "--max-batch", "many"],
        ["stray"],
        ["--", "--api-key", KEY],  # would put the key in argv
        ["--", "--port", "1"],  # install has its own --port
        ["--api-key", "has space"],
        ["--api-key", "a,b"],
        ["--config", "/no/such/models.yaml"],
        ["--port", "70000"],
    ],
)
def test_install_rejects_bad_input_and_writes_nothing(cli, args: list[str]) -> None:
    result = cli("systemd", "install", *args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output
    assert not cli.units.exists() and not cli.home.exists()


def test_reinstall_without_keys_drops_the_old_keys(cli) -> None:
    assert cli("systemd", "install", "--api-key", KEY).exit_code == 0
    env_file = cli.home / service.ENV_FILE_NAME
    assert env_file.exists()
    result = cli("systemd", "install")
    assert result.exit_code == 0, result.output
    assert not env_file.exists()
    assert "EnvironmentFile" not in cli.file("systemd").read_text()


@pytest.mark.parametrize("kind", KINDS)
def test_uninstall_removes_the_files(cli, kind: str) -> None:
    assert cli(kind, "install", "--api-key", KEY).exit_code == 0
    cli.fake("systemctl")
    cli.fake("launchctl")
    result = cli(kind, "uninstall")
    assert result.exit_code == 0, result.output
    assert not cli.file(kind).exists()
    assert not (cli.home / service.ENV_FILE_NAME).exists()
    stop = (
        f"systemctl --user disable --now {UNIT_NAME}"
        if kind == "systemd"
        else f"launchctl bootout gui/{os.getuid()}/{LABEL}"
    )
    assert cli.called()[0] == stop
    again = cli(kind, "uninstall")
    assert again.exit_code == 0 and "not installed" in again.output


def test_uninstall_with_a_failing_manager_still_removes_the_file(cli) -> None:
    assert cli("systemd", "install").exit_code == 0
    cli.fake("systemctl", code=1)
    result = cli("systemd", "uninstall")
    assert result.exit_code == 0, result.output
    assert not cli.file("systemd").exists()
    assert "stop it by hand" in result.output


def test_uninstall_dry_run_changes_nothing(cli) -> None:
    assert cli("systemd", "install").exit_code == 0
    cli.fake("systemctl")
    result = cli("systemd", "uninstall", "--dry-run")
    assert result.exit_code == 0, result.output
    assert cli.file("systemd").exists() and cli.called() == []
    assert f"systemctl --user disable --now {UNIT_NAME}" in result.output


@pytest.mark.parametrize("kind", KINDS)
def test_status(cli, kind: str) -> None:
    result = cli(kind, "status")
    assert result.exit_code == 0, result.output
    assert "not installed" in result.output
    assert "not found" in result.output  # no systemctl/launchctl on PATH
    assert cli(kind, "install", "--port", "8080").exit_code == 0
    cli.fake("systemctl", stdout="active")
    cli.fake("launchctl", stdout="    state = running")
    result = cli(kind, "status")
    assert result.exit_code == 0, result.output
    assert "(installed)" in result.output
    assert "up --port 8080" in result.output
    assert ("active, active" if kind == "systemd" else "running") in result.output


def test_the_stop_timeout_gives_the_drain_its_time() -> None:
    from mlxtg.cli.service import stop_timeout

    assert stop_timeout(30.0, []) == 45
    assert stop_timeout(30.0, ["--max-batch", "8", "--drain-timeout", "120"]) == 135
    assert stop_timeout(30.0, ["--drain-timeout=5"]) == 20
    text = render_systemd_unit(
        ["/usr/bin/mlxtg", "up"], environment={}, log_file=Path("/tmp/x.log"), stop_timeout_s=135
    )
    assert "TimeoutStopSec=135" in text
    plist = render_launchd_plist(
        ["/usr/bin/mlxtg", "up"],
        environment={},
        log_file=Path("/tmp/x.log"),
        working_directory=Path("/tmp"),
        stop_timeout_s=135,
    )
    assert "<key>ExitTimeOut</key>\n    <integer>135</integer>" in plist
