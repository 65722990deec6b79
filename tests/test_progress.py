"""Load progress (issue 15 item 4) without a server: the worker's reporter and its rate
limit, the download bars it reads, the loader's phases on a tiny model, the supervisor's
view of it in the status, and the terminal views `mlxtg up` and `mlxtg load` draw."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mlxtg.cli.progress import PlainView, count, describe, follow
from mlxtg.models import ModelSpec, demo_spec
from mlxtg.protocol import LoadPhase, Progress, Ready, decode, encode
from mlxtg.supervisor import control
from mlxtg.supervisor.config import ServerSettings
from mlxtg.supervisor.load_progress import LoadProgress, percent, phase_summary
from mlxtg.supervisor.processes import WorkerHandle, WorkerState
from mlxtg.worker.download import bars_to
from mlxtg.worker.progress import LoadReporter


class Recorder:
    """A ProgressSink that keeps what it was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def phase(self, phase: LoadPhase, total: int | None = None, unit: str = "") -> None:
        self.calls.append(("phase", str(phase), total, unit))

    def update(self, done: int, total: int | None = None) -> None:
        self.calls.append(("update", done, total))


# --- the worker's reporter --------------------------------------------------------------------


def reporter() -> LoadReporter:
    return LoadReporter("w", send=lambda m: None, max_per_s=2.0)  # one count per 0.5 s


def test_phase_changes_always_go_and_counts_at_most_once_per_interval():
    r = reporter()
    r.phase(LoadPhase.QUANTIZE, total=10, unit="layers")
    r.update(1)
    sent = r.due(now=0.0)
    assert [(m.phase, m.done, m.total, m.unit) for m in sent] == [
        (LoadPhase.QUANTIZE, 0, 10, "layers"),
        (LoadPhase.QUANTIZE, 1, 10, "layers"),
    ]
    r.update(2)
    r.update(3)
    assert r.due(now=0.2) == []  # too soon for a count
    assert [m.done for m in r.due(now=0.5)] == [3]  # the newest count, not each
    r.update(4)
    r.phase(LoadPhase.LOAD, total=3, unit="layers")  # a new phase: the old count is moot
    assert [(m.phase, m.done) for m in r.due(now=0.6)] == [(LoadPhase.LOAD, 0)]
    r.update(2, total=5)  # a total learnt late
    (m,) = r.due(now=2.0)
    assert (m.phase, m.done, m.total, m.unit) == (LoadPhase.LOAD, 2, 5, "layers")
    assert r.due(now=9.0) == []  # nothing new


def test_the_sender_thread_sends_everything_pending_on_stop():
    sent: list[Progress] = []
    r = LoadReporter("w", send=sent.append, max_per_s=0.001).start()  # counts only at stop
    r.phase(LoadPhase.DOWNLOAD, total=100, unit="bytes")
    for done in range(1, 101):
        r.update(done)
    r.phase(LoadPhase.WARMUP)
    r.stop()
    assert [m.phase for m in sent] == [LoadPhase.DOWNLOAD, LoadPhase.WARMUP]
    assert sent[-1].done is None and sent[-1].total is None
    assert all(m.worker_id == "w" for m in sent)


def test_a_failing_send_does_not_fail_the_load():
    def boom(_: Progress) -> None:
        raise OSError("socket gone")

    r = LoadReporter("w", send=boom).start()
    r.phase(LoadPhase.LOAD)
    r.stop()  # returns; the error is logged


def test_progress_crosses_the_wire():
    msg = Progress(worker_id="w", phase=LoadPhase.QUANTIZE, done=3, total=13, unit="layers")
    assert decode(encode(msg)) == msg
    assert decode(encode(Progress(worker_id="w", phase=LoadPhase.WARMUP))).done is None


# --- download bars ----------------------------------------------------------------------------


def test_download_bars_count_bytes_written_and_ignore_file_bars():
    rec = Recorder()
    cls = bars_to(rec)
    files = cls(total=3, desc="Fetching 3 files")  # counts cached files too: never a download
    files.update(1)
    assert rec.calls == []
    # huggingface_hub's byte bars: network (its total an estimate it hides) and written.
    network = cls(total=0, unit="B", bar_format="{desc}: {bar}| {n_fmt:>5}B{postfix:>12}")
    written = cls(total=0, unit="B", bar_format="{l_bar}{bar}| {n_fmt}B / {total_fmt}B")
    written.total, network.total = 1000, 1000
    written.refresh()
    network.update(400)
    network.total = 2000  # the estimate grows
    written.update(300)
    written.update(700)
    assert rec.calls[0] == ("phase", "download", 1000, "bytes")
    assert ("update", 300, 1000) in rec.calls
    assert rec.calls[-1] == ("update", 1000, 1000)
    assert all(c[2] == 1000 for c in rec.calls)  # never the network bar's estimate


def test_fetch_reports_a_hub_download_and_returns_its_folder(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
):
    import huggingface_hub

    from mlxtg.worker.download import fetch

    def fake_download(repo_id: str, tqdm_class: Any, **kwargs: Any) -> str:
        written = tqdm_class(total=0, unit="B", bar_format="{n_fmt}B / {total_fmt}B")
        written.total = 2048
        written.refresh()
        written.update(2048)
        return str(tiny_llama)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    rec = Recorder()
    assert fetch("org/model", None, rec) == tiny_llama
    assert rec.calls == [
        ("phase", "download", 2048, "bytes"),
        ("update", 0, 2048),
        ("update", 2048, 2048),
    ]

    rec = Recorder()
    assert fetch(str(tiny_llama), None, rec) == tiny_llama.resolve()  # a path: no download
    assert rec.calls == []


# --- the loader's phases on a tiny model ------------------------------------------------------


def test_loading_a_quantised_model_reports_each_phase_in_order(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from mlxtg.worker.loader import load

    monkeypatch.setenv("MLXTG_HOME", str(tmp_path))
    rec = Recorder()
    load(ModelSpec(model_id_or_path=str(tiny_llama), quant="q4"), rec)
    phases = [c[1] for c in rec.calls if c[0] == "phase"]
    assert list(dict.fromkeys(phases)) == ["quantize", "load", "warmup"]  # no download: local
    for phase in ("quantize", "load"):
        (total,) = {c[2] for c in rec.calls if c[:2] == ("phase", phase) and c[2] is not None}
        i = rec.calls.index(("phase", phase, total, "layers"))
        counts = [c[1] for c in rec.calls[i + 1 : i + 1 + total]]
        assert counts == list(range(1, total + 1)), rec.calls  # one per layer, to the end

    rec = Recorder()  # the second time the quantised copy is on disk
    load(ModelSpec(model_id_or_path=str(tiny_llama), quant="q4"), rec)
    assert "quantize" not in [c[1] for c in rec.calls if c[0] == "phase"]


# --- the supervisor's view --------------------------------------------------------------------


def test_percent():
    assert percent(None, 10) is None and percent(3, None) is None and percent(3, 0) is None
    assert percent(1, 3) == 33.3 and percent(12, 10) == 100.0 and percent(0, 5) == 0.0


def test_load_progress_view_and_record_on_a_given_clock():
    p = LoadProgress(started=100.0)
    assert p.view(now=100.5) == {
        "phase": "starting",
        "done": None,
        "total": None,
        "unit": "",
        "elapsed_s": 0.5,
        "percent": None,
    }
    p.report(Progress(worker_id="w", phase=LoadPhase.QUANTIZE), now=101.0)
    p.report(
        Progress(worker_id="w", phase=LoadPhase.QUANTIZE, done=0, total=4, unit="layers"),
        now=101.5,
    )
    p.report(
        Progress(worker_id="w", phase=LoadPhase.QUANTIZE, done=1, total=4, unit="layers"),
        now=102.0,
    )
    view = p.view(now=103.0)
    assert view["phase"] == "quantize" and view["percent"] == 25.0
    assert view["elapsed_s"] == 2.0  # since the phase began, not the load
    p.report(Progress(worker_id="w", phase=LoadPhase.WARMUP), now=104.0)
    record = p.record(now=104.5)
    assert record["ok"] and record["error"] is None and record["seconds"] == 4.5
    assert record["phases"] == {"starting": 1.0, "quantize": 3.0, "warmup": 0.5}
    assert phase_summary(record["phases"]) == "starting 1.0s, quantize 3.0s, warmup 0.5s"
    assert phase_summary({"starting": 0.01, "load": 2.0}) == "load 2.0s"


@pytest.fixture
def sup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from mlxtg.supervisor.core import Supervisor

    monkeypatch.setenv("MLXTG_HOME", str(tmp_path / "home"))
    s = Supervisor(ServerSettings(models=[demo_spec()], standby_worker=False))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    s.pool.workers["w"] = WorkerHandle(
        worker_id="w", spec=demo_spec(), proc=proc, state=WorkerState.LOADING
    )
    yield s
    s.close()


def test_the_supervisor_status_shows_the_latest_progress_then_the_finished_load(sup):
    entry = control.status(sup)["models"][0]
    assert entry["state"] == "loading" and entry["progress"]["phase"] == "starting"
    assert entry["last_load"] is None
    for done in (0, 2, 3):
        msg = Progress(worker_id="w", phase=LoadPhase.LOAD, done=done, total=4, unit="layers")
        sup._from_worker("w", encode(msg))
    progress = control.status(sup)["models"][0]["progress"]
    assert progress.keys() == {"phase", "done", "total", "unit", "elapsed_s", "percent"}
    assert (progress["phase"], progress["done"], progress["percent"]) == ("load", 3, 75.0)
    (loading,) = sup.loading().values()  # what `mlxtg up` draws: the same view
    assert {k: v for k, v in loading.items() if k != "elapsed_s"} == {
        k: v for k, v in progress.items() if k != "elapsed_s"
    }

    sup._from_worker("w", encode(Progress(worker_id="w", phase=LoadPhase.WARMUP)))
    sup._from_worker("w", encode(Ready(worker_id="w", model=demo_spec().name, context_length=64)))
    entry = control.status(sup)["models"][0]
    assert entry["state"] == "loaded" and entry["progress"] is None and sup.loading() == {}
    last = entry["last_load"]
    assert last["ok"] and list(last["phases"]) == ["starting", "load", "warmup"]


def test_a_failed_load_is_recorded_with_its_error(sup):
    sup._from_worker("w", encode(Progress(worker_id="w", phase=LoadPhase.DOWNLOAD)))
    sup._from_worker("w", encode(Ready(worker_id="w", model="x", error="no such repo")))
    entry = control.status(sup)["models"][0]
    assert entry["state"] == "unloaded" and entry["progress"] is None
    assert entry["last_load"]["ok"] is False and entry["last_load"]["error"] == "no such repo"
    assert list(entry["last_load"]["phases"]) == ["starting", "download"]


# --- terminal views ---------------------------------------------------------------------------


def test_describe_and_count():
    q = {"phase": "quantize", "done": 5, "total": 13, "unit": "layers"}
    assert describe(q | {"elapsed_s": 1.23, "percent": 38.5}) == "quantize 5/13 layers (38%) 1.2s"
    d = {"phase": "download", "done": 12 << 20, "total": 3 << 29, "unit": "bytes"}
    assert describe(d | {"elapsed_s": 9, "percent": 0.8}) == (
        "download 12.0 MiB/1.50 GiB (1%) 9.0s"
    )
    assert describe({"phase": "warmup", "done": None, "total": None, "elapsed_s": 0.4}) == (
        "warmup 0.4s"
    )
    assert count({"done": 3, "total": None, "unit": "files"}) == "3 files"


def test_plain_view_writes_phase_changes_at_once_and_counts_at_most_every_few_seconds():
    lines: list[str] = []
    clock = [0.0]
    view = PlainView(lines.append, every_s=5.0, clock=lambda: clock[0])

    def at(t: float, loading: dict[str, Any]) -> None:
        clock[0] = t
        view.show(loading)

    def q(done: int) -> dict[str, Any]:
        return {"phase": "quantize", "done": done, "total": 10, "unit": "layers", "elapsed_s": 0}

    at(0.0, {"m": q(0)})
    at(1.0, {"m": q(1)})  # same phase, too soon
    at(5.0, {"m": q(6)})
    at(5.5, {"m": {"phase": "load", "elapsed_s": 0}, "n": {"phase": "starting", "elapsed_s": 0}})
    at(6.0, {})  # both done
    at(6.5, {"m": {"phase": "starting", "elapsed_s": 0}})  # loaded again: a new history
    assert lines == [
        "loading m: quantize 0/10 layers 0.0s",
        "loading m: quantize 6/10 layers 0.0s",
        "loading m: load 0.0s",
        "loading n: starting 0.0s",
        "loading m: starting 0.0s",
    ]


class Shown:
    def __init__(self) -> None:
        self.snapshots: list[dict[str, Any]] = []
        self.closed = False

    def show(self, loading: dict[str, Any]) -> None:
        self.snapshots.append(loading)

    def close(self) -> None:
        self.closed = True


def status_of(state: str, progress: Any = None, last_load: Any = None) -> dict[str, Any]:
    entry = {"name": "m", "state": state, "progress": progress, "last_load": last_load}
    return {"models": [entry]}


def test_follow_shows_progress_until_loaded():
    old = {"ok": False, "error": "an older failure", "seconds": 1.0, "phases": {}}
    new = {"ok": True, "error": None, "seconds": 2.5, "phases": {"load": 2.0, "warmup": 0.5}}
    p = {"phase": "load", "done": 1, "total": 2, "unit": "layers", "elapsed_s": 0.1}
    script = iter(
        [
            status_of("unloaded", last_load=old),  # waiting for another model to go idle
            status_of("loading", p, last_load=old),
            status_of("loaded", last_load=new),
        ]
    )
    view = Shown()
    ok, line = follow(lambda: next(script), "m", view, before=old, sleep=lambda _: None)
    assert ok and line == "m: loaded in 2.5s (load 2.0s, warmup 0.5s)"
    assert view.snapshots == [{}, {"m": p}] and view.closed


def test_follow_reports_a_new_failure():
    bad = {"ok": False, "error": "out of memory", "seconds": 1.0, "phases": {}}
    script = iter([status_of("loading", {"phase": "load"}), status_of("unloaded", last_load=bad)])
    view = Shown()
    ok, line = follow(lambda: next(script), "m", view, before=None, sleep=lambda _: None)
    assert not ok and line == "m: failed to load: out of memory" and view.closed


def test_status_shows_the_progress_of_a_loading_model_and_the_last_load(
    capsys: pytest.CaptureFixture[str],
):
    from mlxtg.cli.render import print_status

    loading = {"phase": "quantize", "done": 3, "total": 13, "unit": "layers", "elapsed_s": 2.0}
    last = {"ok": True, "seconds": 2.5, "phases": {"starting": 0.01, "load": 2.0, "warmup": 0.5}}
    print_status(
        {
            "models": [
                {"name": "a", "state": "loading", "worker": {"pid": 1}, "progress": loading},
                {"name": "b", "state": "loaded", "worker": {"pid": 2}, "last_load": last},
                {"name": "c", "state": "unloaded", "last_load": {"ok": False, "error": "boom"}},
            ]
        }
    )
    out = capsys.readouterr().out
    assert "quantize 3/13 layers 2.0s" in out
    assert "loaded in 2.5s (load 2.0s, warmup 0.5s)" in out
    assert "last load failed: boom" in out


def test_rich_view_draws_each_phase_and_stops_when_nothing_loads():
    import io

    from rich.console import Console

    from mlxtg.cli.progress import RichView

    out = io.StringIO()
    view = RichView(Console(file=out, force_terminal=True, width=100))
    view.show({"m": {"phase": "starting", "done": None, "total": None, "unit": ""}})
    view.show({"m": {"phase": "quantize", "done": 3, "total": 13, "unit": "layers"}})
    view.show({"m": {"phase": "download", "done": 1 << 20, "total": 4 << 20, "unit": "bytes"}})
    view.show({})
    assert view._progress is None  # stopped: the terminal is the log's again
    text = out.getvalue()
    assert "m: quantize" in text and "13/13 layers" in text and "4.0 MiB/4.0 MiB" in text
    view.close()
