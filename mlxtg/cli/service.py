"""`mlxtg service`: run `mlxtg up` in the background under the user's service manager.

launchd on macOS (a user agent in ~/Library/LaunchAgents), a systemd *user* unit on Linux
(~/.config/systemd/user). The file is rendered from the templates in mlxtg/deploy/ (package
data; `deploy/` at the top of a checkout points there) by plain @NAME@ substitution.

API keys never go on a command line or into a world-readable file: `mlxtg up` reads them from
$MLXTG_API_KEYS (comma-separated). systemd gets that from an EnvironmentFile under
$MLXTG_HOME (mode 0600); launchd from the plist's EnvironmentVariables, and the plist is then
written with mode 0600.

For tests: $MLXTG_SERVICE_DIR replaces the directory the unit/plist goes to, and
$MLXTG_SERVICE_MANAGER (launchd|systemd) replaces the choice made from `sys.platform`.
"""

from __future__ import annotations

import contextlib
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from xml.sax.saxutils import escape

import typer
from platformdirs import user_data_dir

from .options import ConfigOpt, HostOpt, ModelOpt, PortOpt

LABEL = "com.mlxtg.server"
UNIT_NAME = "mlxtg.service"
KEYS_ENV = "MLXTG_API_KEYS"
ENV_FILE_NAME = "service.env"
LOG_FILE_NAME = "service.log"
DIR_ENV = "MLXTG_SERVICE_DIR"
MANAGER_ENV = "MLXTG_SERVICE_MANAGER"
# Set at install time, these are copied into the service (launchd starts with a bare env).
PASSTHROUGH_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "MLXTG_LOG_LEVEL")
# `install` sets these itself; after `--` they would clash (or, for keys, leak into argv).
OWN_FLAGS = frozenset({"--config", "-c", "--model", "-m", "--host", "--port", "--api-key"})
_KEY_RE = re.compile(r"[A-Za-z0-9._~+/=-]+")  # RFC 6750 token68: every valid Bearer token
_PLACEHOLDER_RE = re.compile(r"@([A-Z_]+)@")
_MASK = "********"
_TIMEOUT_S = 90  # stopping the old instance may take TimeoutStopSec/ExitTimeOut (45 s)

# The templates are package data (mlxtg/deploy, also reachable as deploy/ in a checkout).
DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy"
SYSTEMD_TEMPLATE = (DEPLOY_DIR / "systemd" / "mlxtg.service.in").read_text()
LAUNCHD_TEMPLATE = (DEPLOY_DIR / "launchd" / "com.mlxtg.server.plist.in").read_text()


# --------------------------------------------------------------------------- rendering


def _fill(template: str, values: Mapping[str, str]) -> str:
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template)


def _one_line(value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"control character in {value!r}")
    return value


def systemd_quote(arg: str, *, dollar: bool = True) -> str:
    """One word of a systemd command line or assignment: `%` and (in ExecStart=) `$`
    doubled, and double quotes (with C escapes) when it holds blanks, quotes or `\\`."""
    s = _one_line(arg).replace("%", "%%")
    if dollar:
        s = s.replace("$", "$$")
    if s and not re.search(r"[\s\"'\\;]", s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _systemd_path(path: Path) -> str:
    """A path setting (taken verbatim up to the end of the line; only specifiers expand)."""
    if not path.is_absolute():
        raise ValueError(f"{path} is not absolute")
    return _one_line(str(path)).replace("%", "%%")


def render_systemd_unit(
    argv: Sequence[str],
    *,
    environment: Mapping[str, str],
    log_file: Path,
    env_file: Path | None = None,
    stop_timeout_s: int = 45,
) -> str:
    """The systemd user unit running `argv` (absolute executable first)."""
    if not argv or not Path(argv[0]).is_absolute():
        raise ValueError("the command must start with an absolute executable path")
    if any(c in argv[0] for c in "\"'\\"):
        raise ValueError(f"systemd cannot run {argv[0]!r}: its path holds quotes or backslashes")
    env_lines = [
        f"Environment={systemd_quote(f'{k}={v}', dollar=False)}" for k, v in environment.items()
    ]
    if env_file is not None:
        env_lines.append(f"EnvironmentFile={_systemd_path(env_file)}")
    return _fill(
        SYSTEMD_TEMPLATE,
        {
            # `$` is only special in the arguments, not in the executable's path
            "EXEC_START": " ".join(systemd_quote(a, dollar=i > 0) for i, a in enumerate(argv)),
            "ENVIRONMENT": "\n".join(env_lines),
            "LOG_FILE": _systemd_path(log_file),
            "STOP_TIMEOUT": str(int(stop_timeout_s)),
        },
    )


def render_env_file(api_keys: Sequence[str]) -> str:
    """The EnvironmentFile (and shell-sourceable) line that hands the keys to `mlxtg up`."""
    for key in api_keys:
        if not key or any(c in key for c in ",'\\") or key != key.strip():
            raise ValueError("an API key cannot be empty or hold commas, quotes or blanks")
        _one_line(key)
    return f"{KEYS_ENV}='{','.join(api_keys)}'\n"


def _xml(value: str) -> str:
    return escape(_one_line(value))


def render_launchd_plist(
    argv: Sequence[str],
    *,
    environment: Mapping[str, str],
    log_file: Path,
    working_directory: Path,
    api_keys: Sequence[str] = (),
    stop_timeout_s: int = 45,
) -> str:
    """The launchd agent plist running `argv`; keys go into its EnvironmentVariables
    (so write it with mode 0600 when there are any)."""
    if not argv or not Path(argv[0]).is_absolute():
        raise ValueError("the command must start with an absolute executable path")
    env = dict(environment)
    if api_keys:
        env[KEYS_ENV] = ",".join(api_keys)
    indent = " " * 8
    return _fill(
        LAUNCHD_TEMPLATE,
        {
            "PROGRAM_ARGUMENTS": "\n".join(f"{indent}<string>{_xml(a)}</string>" for a in argv),
            "ENVIRONMENT": "\n".join(
                f"{indent}<key>{_xml(k)}</key>\n{indent}<string>{_xml(v)}</string>"
                for k, v in env.items()
            ),
            "WORKING_DIRECTORY": _xml(str(working_directory)),
            "LOG_FILE": _xml(str(log_file)),
            "STOP_TIMEOUT": str(int(stop_timeout_s)),
        },
    )


def default_path_env(executable: str) -> str:
    """PATH for launchd (whose default is /usr/bin:/bin:/usr/sbin:/sbin)."""
    dirs = [str(Path(executable).parent), str(Path(sys.executable).parent)]
    dirs += ["/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"]
    return ":".join(dict.fromkeys(dirs))


# --------------------------------------------------------------------------- where things go


def manager() -> str:
    forced = os.environ.get(MANAGER_ENV)
    if forced:
        if forced not in ("launchd", "systemd"):
            raise ValueError(f"${MANAGER_ENV} must be 'launchd' or 'systemd', not {forced!r}")
        return forced
    return "launchd" if sys.platform == "darwin" else "systemd"


def service_file(kind: str) -> Path:
    """~/Library/LaunchAgents/com.mlxtg.server.plist or ~/.config/systemd/user/mlxtg.service."""
    name = f"{LABEL}.plist" if kind == "launchd" else UNIT_NAME
    override = os.environ.get(DIR_ENV)
    if override:
        return Path(override).expanduser().absolute() / name
    if kind == "launchd":
        return Path.home() / "Library" / "LaunchAgents" / name
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    config = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".config"
    return config / "systemd" / "user" / name


def _home() -> Path:
    # paths.home() without its mkdir, so that --dry-run writes nothing.
    env = os.environ.get("MLXTG_HOME")
    path = Path(env).expanduser() if env else Path(user_data_dir("mlxtg", appauthor=False))
    return path.absolute()


def mlxtg_command() -> list[str]:
    """This installation's `mlxtg`, as an absolute path (or `python -m mlxtg`)."""
    sibling = Path(sys.executable).parent / "mlxtg"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return [str(sibling.absolute())]
    found = shutil.which("mlxtg")
    if found:
        return [str(Path(found).absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "mlxtg"]


def _abspath(path: str | Path) -> str:
    return os.path.abspath(os.path.expanduser(path))


def up_arguments(
    config: Path | None,
    model: str | None,
    host: str | None,
    port: int | None,
    extra: Sequence[str] = (),
) -> list[str]:
    """`up` and its flags, with local paths made absolute (the service's cwd differs)."""
    args = ["up"]
    if config is not None:
        args += ["--config", _abspath(config)]
    if model:
        args += ["--model", _abspath(model) if Path(model).expanduser().exists() else model]
    if host:
        args += ["--host", host]
    if port is not None:
        args += ["--port", str(port)]
    return args + list(extra)


# --------------------------------------------------------------------------- service manager


@dataclass(frozen=True)
class Step:
    argv: list[str]
    fallback: list[str] | None = None  # tried when argv fails
    may_fail: bool = False  # e.g. stopping an instance that is not loaded


def _launchd_target() -> tuple[str, str]:
    domain = f"gui/{os.getuid()}"
    return domain, f"{domain}/{LABEL}"


def _start_steps(kind: str, path: Path, start: bool) -> tuple[list[Step], str]:
    """The commands that (re)load and start the service, and the same as one line to
    run by hand."""
    if kind == "systemd":
        ctl = ["systemctl", "--user"]
        steps = [Step([*ctl, "daemon-reload"]), Step([*ctl, "enable", UNIT_NAME])]
        if start:  # restart, not start: a reinstall must pick up the new unit
            steps.append(Step([*ctl, "restart", UNIT_NAME]))
        return steps, f"systemctl --user daemon-reload && systemctl --user enable --now {UNIT_NAME}"
    domain, target = _launchd_target()
    manual = f"launchctl bootstrap {domain} {shlex.quote(str(path))}"
    if not start:
        return [], manual
    return [
        Step(["launchctl", "bootout", target], may_fail=True),
        Step(["launchctl", "enable", target], may_fail=True),
        Step(
            ["launchctl", "bootstrap", domain, str(path)],
            fallback=["launchctl", "load", "-w", str(path)],
        ),
    ], manual


def _stop_steps(kind: str, path: Path) -> tuple[list[Step], str]:
    if kind == "systemd":
        return [Step(["systemctl", "--user", "disable", "--now", UNIT_NAME])], (
            f"systemctl --user disable --now {UNIT_NAME}"
        )
    _, target = _launchd_target()
    return [
        Step(["launchctl", "bootout", target], fallback=["launchctl", "unload", "-w", str(path)])
    ], f"launchctl bootout {target}"


def _run(argv: Sequence[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr); 127 when the tool cannot be run at all."""
    try:
        p = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return 124, "", f"timed out after {_TIMEOUT_S} s"
    except OSError as exc:
        return 127, "", str(exc)
    return p.returncode, p.stdout, p.stderr


def _why(rc: int, out: str, err: str) -> str:
    lines = [line.strip() for line in (err or out).splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {rc}"


def _run_steps(steps: Sequence[Step]) -> str | None:
    """Run the steps in order; None when all went well, else why the first one failed."""
    for step in steps:
        if shutil.which(step.argv[0]) is None:
            return f"{step.argv[0]} not found"
        typer.echo(f"$ {shlex.join(step.argv)}")
        rc, out, err = _run(step.argv)
        if rc and step.fallback:
            typer.echo(f"$ {shlex.join(step.fallback)}")
            rc, out, err = _run(step.fallback)
        if rc and not step.may_fail:
            return f"`{shlex.join(step.argv)}` failed: {_why(rc, out, err)}"
    return None


def _write(path: Path, text: str, mode: int) -> None:
    """Write atomically, the file never existing with a wider mode than `mode`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _check_extra(extra: Sequence[str]) -> None:
    """Flags after `--` must be valid `mlxtg up` flags (else the service would crash-loop)."""
    for arg in extra:
        if arg.split("=", 1)[0] in OWN_FLAGS:
            raise _fail(f"give {arg.split('=', 1)[0]} to `mlxtg service install` itself", 2)
    if not extra:
        return
    from .main import app as main_app

    # Duck-typed: typer may use click itself or its own vendored copy of it.
    commands = getattr(typer.main.get_command(main_app), "commands", {})
    up = commands.get("up")
    if up is None:
        return
    try:
        up.make_context("up", list(extra), resilient_parsing=False)
    except Exception as exc:  # click's UsageError (NoSuchOption, BadParameter, ...)
        why = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise _fail(f"`mlxtg up` would reject {shlex.join(extra)}: {why}", 2) from None


# --------------------------------------------------------------------------- commands

service_app = typer.Typer(
    no_args_is_help=True,
    help="Run `mlxtg up` as a background service: launchd on macOS, systemd --user on Linux.",
)


def _kind() -> str:
    try:
        return manager()
    except ValueError as exc:
        raise _fail(str(exc), 2) from None


def stop_timeout(drain_timeout: float, extra: Sequence[str]) -> int:
    """How long the service manager waits after SIGTERM before SIGKILL: the drain
    (`--drain-timeout` after `--` wins over the config's) plus time to stop the workers."""
    for i, arg in enumerate(extra):
        value = None
        if arg == "--drain-timeout" and i + 1 < len(extra):
            value = extra[i + 1]
        elif arg.startswith("--drain-timeout="):
            value = arg.partition("=")[2]
        if value is not None:
            with contextlib.suppress(ValueError):  # `mlxtg up` itself reports a bad value
                drain_timeout = float(value)
    return int(drain_timeout) + 15


def _render_files(
    kind: str, path: Path, argv: list[str], keys: Sequence[str], stop_timeout_s: int = 45
) -> list[tuple[Path, str, int]]:
    """(path, text, mode) of every file the service needs."""
    home = _home()
    log_file = home / "logs" / LOG_FILE_NAME
    env = {"MLXTG_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.update({k: os.environ[k] for k in PASSTHROUGH_ENV if os.environ.get(k)})
    if kind == "launchd":
        env["PATH"] = default_path_env(argv[0])
        text = render_launchd_plist(
            argv,
            environment=env,
            log_file=log_file,
            working_directory=home,
            api_keys=keys,
            stop_timeout_s=stop_timeout_s,
        )
        return [(path, text, 0o600 if keys else 0o644)]
    env_file = home / ENV_FILE_NAME if keys else None
    unit = render_systemd_unit(
        argv,
        environment=env,
        log_file=log_file,
        env_file=env_file,
        stop_timeout_s=stop_timeout_s,
    )
    files = [(path, unit, 0o644)]
    if env_file is not None:
        files.append((env_file, render_env_file(keys), 0o600))
    return files


@service_app.command(context_settings={"allow_extra_args": True})
def install(
    ctx: typer.Context,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key", help="Require this Bearer key (repeatable; kept in a 0600 file)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the file and the commands; change nothing.")
    ] = False,
    no_start: Annotated[
        bool, typer.Option("--no-start", help="Write (and enable) the service, don't start it now.")
    ] = False,
) -> None:
    """Install `mlxtg up` as a service that starts at login and restarts when it fails.

    Flags after `--` go to `mlxtg up` as they are: `mlxtg service install -- --max-batch 64`.
    Run it again to change the flags; it replaces the service and restarts it.
    """
    kind = _kind()
    keys = list(api_key or [])
    for key in keys:
        if not _KEY_RE.fullmatch(key):
            raise _fail("an API key may only hold letters, digits and -._~+/= (a Bearer token)", 2)
    extra = list(ctx.args)
    _check_extra(extra)
    if config is not None and not config.expanduser().is_file():
        raise _fail(f"{config}: no such file", 2)

    from ..supervisor.config import ConfigError, build_settings

    cfg = Path(_abspath(config)) if config is not None else None
    try:
        settings = build_settings(cfg, model, {"host": host, "port": port})
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None

    argv = mlxtg_command() + up_arguments(config, model, host, port, extra)
    path = service_file(kind)
    try:
        files = _render_files(
            kind,
            path,
            argv,
            [_MASK] * len(keys) if dry_run else keys,
            stop_timeout(settings.drain_timeout, extra),
        )
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    stale = _home() / ENV_FILE_NAME
    stale_keys = not keys and stale.exists()
    steps, manual = _start_steps(kind, path, start=not no_start)

    if dry_run:
        typer.echo("# dry run: nothing is written or run" + (" (API keys masked)" if keys else ""))
        for file_path, text, mode in files:
            typer.echo(f"# {file_path} (mode {mode:04o}):")
            typer.echo(text, nl=False)
        if stale_keys:
            typer.echo(f"# would remove {stale} (no --api-key given)")
        typer.echo("# then run:")
        for step in steps:
            more = f"   # if that fails: {shlex.join(step.fallback)}" if step.fallback else ""
            typer.echo(f"{shlex.join(step.argv)}{more}")
        return

    try:
        (_home() / "logs").mkdir(parents=True, exist_ok=True)
        for file_path, text, mode in files:
            _write(file_path, text, mode)
            typer.echo(f"wrote {file_path}" + (f" (mode {mode:04o})" if mode == 0o600 else ""))
        if stale_keys:
            stale.unlink()
            typer.echo(f"removed {stale}: the old API keys (no --api-key given)")
    except OSError as exc:
        raise _fail(f"cannot write the service files: {exc}") from None

    if (
        not keys
        and not settings.api_keys
        and settings.host not in ("127.0.0.1", "::1", "localhost")
    ):
        typer.echo(
            f"warning: listening on {settings.host} without an API key: anyone who can reach "
            "it can use it (add --api-key)",
            err=True,
        )
    problem = _run_steps(steps)
    log_file = _home() / "logs" / LOG_FILE_NAME
    if problem:
        typer.echo(
            f"note: {problem}; the service file is written, to start it run: {manual}", err=True
        )
    elif no_start:
        when = "at your next login" if kind == "launchd" else "when your user session starts"
        typer.echo(f"installed, not started: it starts {when}, or now with: {manual}")
    else:
        typer.echo(f"mlxtg service started; logs: {log_file}; check: mlxtg service status")
        if kind == "systemd":
            _linger_hint()


def _linger_hint() -> None:
    """A user unit stops at logout unless the user lingers; say so once."""
    user = os.environ.get("USER")
    if not user or shutil.which("loginctl") is None:
        return
    rc, out, _ = _run(["loginctl", "show-user", user, "--property=Linger", "--value"])
    if rc == 0 and out.strip() == "no":
        typer.echo(
            f"note: it stops when you log out; to keep it running: loginctl enable-linger {user}"
        )


@service_app.command()
def uninstall(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the commands; change nothing.")
    ] = False,
) -> None:
    """Stop the service, disable it and remove its files."""
    kind = _kind()
    path = service_file(kind)
    env_file = _home() / ENV_FILE_NAME
    removable = [p for p in (path, env_file) if p.exists()]
    steps, manual = _stop_steps(kind, path)
    if not path.exists():
        typer.echo(f"not installed (no {path})")
        steps = []
    if dry_run:
        for step in steps:
            typer.echo(shlex.join(step.argv))
        for p in removable:
            typer.echo(f"rm {shlex.quote(str(p))}")
        if kind == "systemd" and steps:
            typer.echo("systemctl --user daemon-reload")
        return
    problem = _run_steps(steps)
    if problem:
        typer.echo(f"note: {problem}; if it is still running, stop it by hand: {manual}", err=True)
    try:
        for p in removable:
            p.unlink()
            typer.echo(f"removed {p}")
    except OSError as exc:
        raise _fail(f"cannot remove {exc.filename}: {exc.strerror}") from None
    if kind == "systemd" and steps and not problem:
        _run_steps([Step(["systemctl", "--user", "daemon-reload"], may_fail=True)])


def _installed_command(kind: str, path: Path) -> str | None:
    try:
        if kind == "launchd":
            args = plistlib.loads(path.read_bytes()).get("ProgramArguments")
            return shlex.join(args) if isinstance(args, list) else None
        for line in path.read_text().splitlines():
            if line.startswith("ExecStart="):
                return line.removeprefix("ExecStart=")
    except (OSError, ValueError, plistlib.InvalidFileException):
        return None
    return None


def _manager_state(kind: str) -> str:
    if kind == "systemd":
        if shutil.which("systemctl") is None:
            return "unknown (systemctl not found)"
        answers = []
        for verb in ("is-enabled", "is-active"):
            rc, out, err = _run(["systemctl", "--user", verb, UNIT_NAME])
            if not out.strip():
                return f"unknown ({_why(rc, out, err)})"
            answers.append(out.strip().splitlines()[0])
        return ", ".join(answers)
    if shutil.which("launchctl") is None:
        return "unknown (launchctl not found)"
    rc, out, err = _run(["launchctl", "print", _launchd_target()[1]])
    if rc:
        return "not loaded"
    found: dict[str, str] = {}
    for line in out.splitlines():
        name, sep, value = line.strip().partition(" = ")
        if sep and name in ("state", "pid", "last exit code") and name not in found:
            found[name] = value
    return ", ".join(f"{k} {v}" if k != "state" else v for k, v in found.items()) or "loaded"


@service_app.command()
def status() -> None:
    """Whether the service is installed, and what launchd/systemd says about it."""
    kind = _kind()
    path = service_file(kind)
    installed = path.exists()
    typer.echo(f"manager:  {'launchd (user agent)' if kind == 'launchd' else 'systemd --user'}")
    typer.echo(f"file:     {path} ({'installed' if installed else 'not installed'})")
    if installed:
        command = _installed_command(kind, path)
        if command:
            typer.echo(f"command:  {command}")
    typer.echo(f"logs:     {_home() / 'logs' / LOG_FILE_NAME}")
    typer.echo(f"service:  {_manager_state(kind)}")
