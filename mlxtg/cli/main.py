"""The `mlxtg` command line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import __version__, paths
from .client import ServerClient, ServerNotFound
from .options import ConfigOpt, HostOpt, ModelOpt
from .options import PortOpt as ListenPortOpt
from .service import service_app

log = logging.getLogger("mlxtg")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="mlxtg: a local OpenAI-compatible LLM server on MLX.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlxtg {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Serve MLX models behind one OpenAI-compatible endpoint."""


@app.command()
def up(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    host: HostOpt = None,
    port: ListenPortOpt = None,
    api_key: Annotated[
        list[str] | None, typer.Option("--api-key", help="Require this Bearer key (repeatable).")
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="Sequences decoded together per model [32].")
    ] = None,
    max_queued: Annotated[
        int | None, typer.Option(help="Requests waiting per model before 429 [128].")
    ] = None,
    max_resident_models: Annotated[
        int | None, typer.Option(help="Models kept loaded at once [1].")
    ] = None,
    gateways: Annotated[
        int | None, typer.Option(help="Gateway processes sharing the port [1].")
    ] = None,
    cache_ram_gb: Annotated[
        float | None, typer.Option(help="RAM prefix-cache budget per model [2].")
    ] = None,
    cache_disk_gb: Annotated[
        float | None, typer.Option(help="Disk prompt-cache budget per model [10]; 0 disables.")
    ] = None,
    cache_slots: Annotated[
        int | None, typer.Option(help="Conversations kept on disk per model [50].")
    ] = None,
    cache_min_tokens: Annotated[
        int | None, typer.Option(help="Shorter cached prefixes are not reused [16].")
    ] = None,
    fast_blas: Annotated[
        bool,
        typer.Option(
            "--fast-blas/--no-fast-blas",
            help="Preload OpenBLAS into workers on Linux when present.",
        ),
    ] = True,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--cors-origin",
            help="Allow browser requests from this origin (repeatable; '*' for any). Off by default.",
        ),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="Also accept this Host header when listening on loopback (repeatable).",
        ),
    ] = None,
    max_body_mb: Annotated[
        float | None, typer.Option(help="Larger request bodies get 413 [32].")
    ] = None,
    drain_timeout: Annotated[
        float | None,
        typer.Option(help="Seconds in-flight requests may finish after SIGTERM [30]."),
    ] = None,
    stall_timeout: Annotated[
        float | None,
        typer.Option(help="A worker step running longer than this is a hung worker [120]."),
    ] = None,
    batched_prefill: Annotated[
        bool | None,
        typer.Option(
            "--batched-prefill/--no-batched-prefill",
            help="Prefill prompts that arrive together as one padded batch [on]; off: each "
            "prompt alone at batch 1.",
        ),
    ] = None,
) -> None:
    """Start the server: supervisor, gateway and the first model's worker."""
    from ..supervisor.config import ConfigError, build_settings

    logging.basicConfig(
        level=os.environ.get("MLXTG_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # Keys can also come from the environment (the service units use an env file, so keys
    # never sit in a world-readable unit or in `ps`).
    env_keys = [k.strip() for k in os.environ.get("MLXTG_API_KEYS", "").split(",") if k.strip()]
    overrides: dict[str, Any] = {
        "host": host,
        "port": port,
        "api_keys": (api_key or []) + env_keys or None,
        "max_batch": max_batch,
        "max_queued": max_queued,
        "max_resident_models": max_resident_models,
        "gateways": gateways,
        "cache_ram_gb": cache_ram_gb,
        "cache_disk_gb": cache_disk_gb,
        "cache_slots": cache_slots,
        "cache_min_tokens": cache_min_tokens,
        "fast_blas": fast_blas,
        "batched_prefill": batched_prefill,
        "cors_origins": cors_origin or None,
        "allowed_hosts": allowed_host or None,
        "max_body_mb": max_body_mb,
        "drain_timeout": drain_timeout,
        "stall_timeout": stall_timeout,
    }
    try:
        settings = build_settings(config, model, overrides)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    running = paths.read_server_info()
    if running and _alive(running.get("pid")):
        typer.echo(
            f"error: mlxtg is already running from {paths.home()} (pid {running['pid']}, {running.get('url')})",
            err=True,
        )
        raise typer.Exit(1)
    if not _port_free(settings.host, settings.port):
        typer.echo(f"error: port {settings.port} on {settings.host} is already in use", err=True)
        raise typer.Exit(1)
    raise typer.Exit(_serve(settings))


def _serve(settings: Any) -> int:
    from ..supervisor.core import Supervisor
    from ..supervisor.gateways import GatewayGroup

    sup = Supervisor(settings)
    gateway_config = {
        "supervisor_endpoint": sup.gateway_endpoint,
        "host": settings.host,
        "port": settings.port,
        "api_keys": settings.api_keys,
        "cors_origins": settings.cors_origins,
        "allowed_hosts": settings.allowed_hosts,
        "max_body_bytes": int(settings.max_body_mb * (1 << 20)),
        "max_request_sequences": settings.max_request_sequences,
        "max_request_tokens": settings.max_request_tokens,
        "drain_timeout": settings.drain_timeout,
    }
    try:
        gateway = GatewayGroup.start(gateway_config, settings.gateways, paths.run_dir())
    except OSError as exc:  # the port was taken since the check, or is privileged
        typer.echo(f"error: cannot listen on {settings.host}:{settings.port}: {exc}", err=True)
        sup.close()
        return 1
    url = f"http://{settings.host}:{settings.port}"
    paths.write_server_info(
        {
            "pid": os.getpid(),
            "gateway_pid": gateway.pid,
            "gateway_pids": gateway.pids,
            "url": url,
            "home": str(paths.home()),
        }
    )

    drain = _Drain(settings.drain_timeout)

    def _stop(signum: int, _frame: Any) -> None:
        if drain.started_at is None:
            # First signal: the gateway drains (503 for new requests, in-flight ones
            # finish up to drain_timeout) and exits; workers stop after it.
            drain.start(sup.counters["worker_restarts"])
            with contextlib.suppress(ProcessLookupError):
                gateway.send_signal(signal.SIGTERM)
        else:  # a second signal: stop now
            sup.stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    sup.warm_up()
    typer.echo(
        f"mlxtg {__version__} serving {', '.join(settings.model_names())} at {url}/v1 (home {paths.home()})"
    )
    from .progress import make_view

    loads = make_view(log.info)  # bars on a terminal, log lines in a log file
    code = 0
    try:
        while not sup.stopping:
            sup.step()
            loads.show(sup.loading())
            if (exited := gateway.poll()) is not None:
                if drain.started_at is None:
                    typer.echo(f"error: the gateway exited (code {exited})", err=True)
                    code = 1
                else:
                    code = drain.exit_code(exited, sup.counters["worker_restarts"])
                break
            if drain.overdue():
                typer.echo("error: the gateway did not finish draining in time", err=True)
                code = 1
                break
    finally:
        loads.close()
        gateway.stop()
        sup.close()
        paths.server_file().unlink(missing_ok=True)
    return code or sup.exit_code


@dataclass(slots=True)
class _Drain:
    """The supervisor's view of a graceful stop: exit 0 only when the gateway cut no
    request and no worker died while it drained."""

    timeout: float
    started_at: float | None = None
    restarts_at_start: int = 0

    def start(self, restarts: int) -> None:
        self.started_at = time.monotonic()
        self.restarts_at_start = restarts

    def overdue(self) -> bool:
        # The gateway exits by itself after drain_timeout; this only guards a stuck one.
        return (
            self.started_at is not None and time.monotonic() > self.started_at + self.timeout + 15
        )

    def exit_code(self, gateway_code: int, restarts: int) -> int:
        if gateway_code != 0:
            log.warning("shutdown cut requests in flight (gateway exit code %s)", gateway_code)
            return 1
        if restarts != self.restarts_at_start:
            log.warning("a worker died while the server drained")
            return 1
        return 0


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_free(host: str, port: int) -> bool:
    if port == 0:
        return True
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


UrlOpt = Annotated[
    str | None, typer.Option("--url", help="Server URL (default: found through $MLXTG_HOME).")
]
PortOpt = Annotated[int | None, typer.Option("--port", help="Server port on 127.0.0.1.")]
KeyOpt = Annotated[
    str | None, typer.Option("--api-key", envvar="MLXTG_API_KEY", help="API key of the server.")
]


def _client(url: str | None, port: int | None, api_key: str | None) -> ServerClient:
    try:
        return ServerClient.find(url, port, api_key)
    except ServerNotFound as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    url: UrlOpt = None,
    port: PortOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Show the gateway, the supervisor and each model's worker."""
    data = _client(url, port, api_key).get("/admin/status")
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    from .render import print_status

    print_status(data)


@app.command()
def evict(
    model: Annotated[str | None, typer.Argument(help="Model to unload.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Unload every model.")] = False,
    url: UrlOpt = None,
    port: PortOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Unload a model (or all): its worker exits once its running requests finish."""
    if not model and not all_:
        typer.echo("error: name a model or pass --all", err=True)
        raise typer.Exit(2)
    data = _client(url, port, api_key).post("/admin/evict", {"model": None if all_ else model})
    for name, state in data.get("models", {}).items():
        typer.echo(f"{name}: {state}")
    if not data.get("models"):
        typer.echo("nothing was loaded")


@app.command()
def load(
    model: Annotated[str, typer.Argument(help="Configured model to load now.")],
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Return at once instead of showing the progress.")
    ] = False,
    url: UrlOpt = None,
    port: PortOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Pre-warm a configured model, showing its progress until it is ready."""
    from .progress import follow, make_view

    client = _client(url, port, api_key)
    before = next(
        (m.get("last_load") for m in client.get("/admin/status")["models"] if m["name"] == model),
        None,
    )
    data = client.post("/admin/load", {"model": model})
    typer.echo(f"{data['model']}: {data['state']}")
    if no_wait:
        return
    try:
        ok, line = follow(
            lambda: client.get("/admin/status"), data["model"], make_view(typer.echo), before
        )
    except KeyboardInterrupt:
        typer.echo(f"stopped watching; {data['model']} goes on loading in the server", err=True)
        raise typer.Exit(130) from None
    if not ok:
        typer.echo(f"error: {line}", err=True)
        raise typer.Exit(1)
    typer.echo(line)


@app.command("create-config")
def create_config(
    num_models: Annotated[
        int, typer.Option("--num-models", "-n", min=1, help="How many entries.")
    ] = 2,
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.")] = Path(
        "models.yaml"
    ),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented models.yaml template that runs as written."""
    from .create_config import render

    if output.exists() and not force:
        typer.echo(f"error: {output} exists (use --force to overwrite)", err=True)
        raise typer.Exit(1)
    output.write_text(render(num_models, str(output)))
    typer.echo(f"wrote {output}: edit it, then run `mlxtg up --config {output}`")


app.add_typer(service_app, name="service")

cache_app = typer.Typer(help="The prompt cache on disk (works with the server running or stopped).")
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def cache_ls(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Per model: slots, tokens, bytes, last use, hits, corrupt blocks and write errors."""
    from ..kv_files import list_caches
    from .render import print_caches

    entries = list_caches()
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    print_caches(entries, paths.home())


@cache_app.command("clear")
def cache_clear(
    model: Annotated[str | None, typer.Argument(help="Only this model's cache.")] = None,
    url: UrlOpt = None,
    port: PortOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Delete cached prompts (RAM and disk when the server runs, disk otherwise)."""
    from ..kv_files import clear_caches

    running = paths.read_server_info()
    if url or port or (running and _alive(running.get("pid"))):
        data = _client(url, port, api_key).post("/admin/cache/clear", {"model": model})
        removed = data.get("removed", [])
    else:
        removed = clear_caches(model)
    typer.echo("removed: " + (", ".join(removed) if removed else "nothing"))


def run() -> None:
    sys.exit(app())
