"""Hugging Face models with download progress.

`mlxtg.models.resolve_model_path` decides where a model's files are, and fails with one
clear line when they are nowhere. A Hub id is fetched here first, with a tqdm class of
ours, so bytes that really download show as the `download` phase; a model already in the
cache shows no download phase, and a failed fetch is left to the resolver to explain (or to
serve from the cache offline).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from ..models import HUB_PATTERNS, looks_like_hub_id, resolve_model_path
from ..protocol import LoadPhase
from .progress import ProgressSink

log = logging.getLogger("mlxtg.worker")

def is_hub_id(id_or_path: str) -> bool:
    """`owner/name` that is not a local path (resolve_model_path's rule)."""
    if Path(id_or_path).expanduser().exists():
        return False
    return looks_like_hub_id(id_or_path)


def fetch(id_or_path: str, revision: str | None, progress: ProgressSink) -> Path:
    """A local folder holding the model, downloading what is missing with progress."""
    if is_hub_id(id_or_path):
        from huggingface_hub import snapshot_download

        try:
            return Path(
                snapshot_download(
                    id_or_path,
                    revision=revision,
                    allow_patterns=HUB_PATTERNS,
                    tqdm_class=bars_to(progress),  # type: ignore[arg-type]
                )
            )
        except Exception as exc:  # offline, unknown id, network: the resolver says why
            log.info("could not fetch %s (%s); looking in the local cache", id_or_path, exc)
    return resolve_model_path(id_or_path, revision=revision)


class ByteBars:
    """huggingface_hub's progress bars of one snapshot download, read as one count.

    It opens a bar over files (which counts cached files too) and byte bars: bytes written
    (total: the sizes of the files that download) and, for Xet, bytes on the network (total:
    an estimate that grows). Only bytes mean a download: the phase starts when a byte bar
    first gets a total, and the count is a byte bar that shows its total (huggingface_hub
    hides the network bar's, an estimate), the smallest such."""

    def __init__(self, progress: ProgressSink):
        self.progress = progress
        self.bars: list[Any] = []
        self.started = False
        self._lock = threading.Lock()

    def changed(self) -> None:
        with self._lock:
            sized = [b for b in self.bars if b.unit_ == "B" and (b.total or 0) > 0]
            if not sized:
                return
            bar = min(sized, key=lambda b: (not b.exact_, b.total))
            total, done = int(bar.total), min(int(bar.n), int(bar.total))
            if not self.started:
                self.started = True
                self.progress.phase(LoadPhase.DOWNLOAD, total=total, unit="bytes")
            self.progress.update(done, total)


def bars_to(progress: ProgressSink) -> type:
    """A tqdm class whose bars draw nothing and report to `progress` (for `tqdm_class`)."""
    from tqdm.auto import tqdm

    board = ByteBars(progress)

    class ReportingBar(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, unit: str = "it", **kwargs: Any):
            kwargs.pop("name", None)  # huggingface_hub's own bars take a name; tqdm does not
            kwargs["disable"] = True
            fmt = kwargs.get("bar_format")
            super().__init__(*args, unit=unit, **kwargs)
            self.unit_ = unit  # a disabled tqdm keeps no `unit`
            self.exact_ = fmt is None or "total" in fmt  # its total is shown, so meant
            board.bars.append(self)

        def update(self, n: float | None = 1) -> bool | None:
            self.n += n or 0  # a disabled tqdm does not count
            board.changed()
            return None

        def refresh(self, *args: Any, **kwargs: Any) -> None:
            board.changed()  # huggingface_hub raises `total` by assignment, then refreshes

    return ReportingBar
