"""Human-readable `mlxtg status` and `mlxtg cache ls`."""

from __future__ import annotations

import time
from typing import Any

import typer

from ..supervisor.load_progress import phase_summary
from .progress import describe


def _mb(n: Any) -> str:
    return f"{n / 2**20:.0f} MiB" if isinstance(n, int | float) else "-"


def _dur(s: Any) -> str:
    if not isinstance(s, int | float):
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def print_status(data: dict[str, Any]) -> None:
    sup = data.get("supervisor", {})
    gw = data.get("gateway", {})
    typer.echo(f"mlxtg {data.get('version')}")
    typer.echo(f"  gateway     pid {gw.get('pid', '-')}")
    typer.echo(f"  supervisor  pid {sup.get('pid', '-')}  up {_dur(sup.get('uptime'))}")
    for m in data.get("models", []):
        w = m.get("worker")
        if not w:
            typer.echo(f"  worker      -      model {m['name']}  {m['state']}")
            _last_load(m)
            continue
        st = w.get("stats", {})
        ram = st.get("prefix_cache") or {}
        disk = st.get("disk_cache") or {}
        typer.echo(
            f"  worker      pid {w['pid']}  model {m['name']}  {m['state']}  rss {_mb(w.get('rss_bytes'))}"
            f"  up {_dur(w.get('uptime'))}  blas {w.get('facts', {}).get('blas', '-')}"
        )
        if m.get("progress"):
            typer.echo(f"              {describe(m['progress'])}")
            continue  # no engine yet: nothing else to show
        _last_load(m)
        if w.get("facts", {}).get("reasoning"):
            typer.echo(f"              reasoning {w['facts']['reasoning']}")
        typer.echo(
            f"              running {st.get('running', 0)}  queued {st.get('queued', 0)}"
            f"  {st.get('tokens_per_s', 0)} tok/s  generated {st.get('tokens_generated', 0)} tok"
            f"  prefilled {st.get('prompt_tokens_computed', 0)} tok"
        )
        typer.echo(
            f"              cache RAM {ram.get('entries', 0)} entries {_mb(ram.get('bytes', 0))}"
            f" hits {ram.get('hits', 0)} misses {ram.get('misses', 0)} | {_disk(disk)}"
        )


def _last_load(m: dict[str, Any]) -> None:
    last = m.get("last_load")
    if not last:
        return
    if last.get("ok"):
        took = phase_summary(last.get("phases") or {})
        typer.echo(f"              loaded in {last.get('seconds', 0):.1f}s ({took})")
    else:
        typer.echo(f"              last load failed: {last.get('error')}")


def _disk(disk: dict[str, Any]) -> str:
    if disk.get("disabled"):
        return f"disk DISABLED ({disk['disabled']})"
    return (
        f"disk {disk.get('slots', 0)} slots {_mb(disk.get('bytes', 0))}"
        f" hits {disk.get('hits', 0)} misses {disk.get('misses', 0)}"
        f" corrupt {disk.get('corrupt', 0)} write errors {disk.get('write_errors', 0)}"
    )


def print_caches(entries: list[dict[str, Any]], home: Any) -> None:
    """Human-readable `mlxtg cache ls`: one line per model folder."""
    if not entries:
        typer.echo(f"no cached prompts under {home}")
    for e in entries:
        last = (
            time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"]))
            if e["last_used"]
            else "-"
        )
        typer.echo(
            f"{e['model']:<24} {e['fingerprint']}  slots {e['slots']:>4}  tokens {e['tokens']:>8}"
            f"  {e['bytes'] / 2**20:8.1f} MiB  last used {last}  hits {e['hits']}"
            f"  corrupt {e.get('corrupt', 0)}  write errors {e.get('write_errors', 0)}"
        )
