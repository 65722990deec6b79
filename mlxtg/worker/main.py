"""Worker process: HELLO -> CONFIG -> load -> READY, then the engine loop.

    python -m mlxtg.worker --endpoint ipc://... --worker-id ID

The loop (DESIGN.md §3): take new inputs (block only when idle) -> apply aborts ->
schedule -> run the model -> postprocess -> one OUTPUT message for the step.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq

from ..lifeline import exit_with_parent
from ..protocol import (
    Config,
    EngineSettings,
    Hello,
    Progress,
    Ready,
    decode,
    encode,
)
from . import distributed
from .blas import describe_blas
from .io import Shutdown, WorkerIO
from .progress import NO_PROGRESS, LoadReporter, ProgressSink
from .scheduler import Scheduler

log = logging.getLogger("mlxtg.worker")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mlxtg-worker")
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--worker-id", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("MLXTG_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s worker[{args.worker_id}] %(levelname)s %(message)s",
    )
    exit_with_parent()
    # The I/O thread must get the GIL promptly to send a step's tokens while the engine
    # thread runs Python (the default 5 ms interval shows up in time to first token).
    sys.setswitchinterval(0.0005)
    # Heavy imports before HELLO: a standby worker then only has weights left to load.
    for module in ("mlx_lm.utils", "mlxtg.worker.engine", "mlxtg.worker.preprocess"):
        importlib.import_module(module)
    # One rank of a distributed model (distributed.py): only rank 0 talks to the supervisor.
    group = distributed.init_group() if distributed.in_group() else None
    if group is not None and group.rank() != 0:
        return _follow(group)

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt_string(zmq.IDENTITY, args.worker_id)
    sock.connect(args.endpoint)

    # 1. Handshake: HELLO, wait for CONFIG.
    sock.send_multipart(encode(Hello(worker_id=args.worker_id, pid=os.getpid())))
    config = decode(sock.recv_multipart())
    if not isinstance(config, Config):
        log.error("expected CONFIG, got %s", type(config).__name__)
        return 2
    settings = config.engine
    channel = None
    if group is not None:
        distributed.share_bytes(group, msgpack.packb(encode(config)))

    # 2. Load the model, reporting progress (the reporter's thread owns the socket until
    # stop()); a failure is reported, not raised.
    def send(msg: Progress) -> None:
        sock.send_multipart(encode(msg))

    reporter = LoadReporter(args.worker_id, send).start()
    try:
        if group is not None:
            channel = distributed.StepChannel.open(group)
        runtime = _build_runtime(config, settings, reporter, group)
    except Exception as exc:
        reporter.stop()
        log.exception("model load failed")
        sock.send_multipart(
            encode(
                Ready(
                    worker_id=args.worker_id,
                    model=config.model.model_name or config.model.model_id_or_path,
                    error=str(exc),
                )
            )
        )
        sock.close()
        ctx.term()
        return 1
    reporter.stop()
    loaded, engine, preprocess = runtime
    blas = describe_blas()
    log.info("model %s loaded in %.1fs; BLAS: %s", loaded.spec.name, loaded.load_seconds, blas)
    sock.send_multipart(
        encode(
            Ready(
                worker_id=args.worker_id,
                model=loaded.spec.name,
                context_length=loaded.context_length,
                fingerprint=loaded.fingerprint,
                vocab_size=loaded.vocab_size,
                blas=blas,
                load_seconds=loaded.load_seconds,
                reasoning=str(loaded.reasoning or ""),
            )
        )
    )

    # 3. Serve.
    share = distributed.StepShare(channel) if channel is not None else None
    if share is not None:
        preprocess = distributed.Seeding(preprocess)
    loop = EngineLoop(engine, share)
    io = WorkerIO(ctx, sock, args.worker_id, preprocess, loop.stats, settings.heartbeat_s)
    loop.io = io
    io.start()
    try:
        loop.run()
    except Exception as exc:
        if share is None:
            raise
        log.exception("the group is broken (%s): exiting so the supervisor restarts it", exc)
        return 1
    return 0


def _follow(group: Any) -> int:
    """Ranks 1..n-1: the CONFIG, then every step's inputs, come from rank 0."""
    try:
        config = decode(msgpack.unpackb(distributed.share_bytes(group, None)))
        assert isinstance(config, Config)
        channel = distributed.StepChannel.open(group)
        _, engine, preprocess = _build_runtime(config, config.engine, NO_PROGRESS, group)
        distributed.follow(engine, preprocess, distributed.StepShare(channel))
    except Exception as exc:  # rank 0 or another rank is gone, or this one failed
        log.exception("rank %d leaves the group: %s", group.rank(), exc)
        return 1
    return 0


def _build_runtime(
    config: Config, settings: EngineSettings, progress: ProgressSink, group: Any = None
) -> tuple[Any, Any, Any]:
    from ..models import ModelSpec
    from .engine import Engine
    from .loader import load
    from .prefix_cache import RamPrefixCache
    from .preprocess import Preprocessor
    from .prompt_cache import PromptCache
    from .reasoning import reasoning_at

    loaded = load(ModelSpec.from_wire(config.model), progress, group)  # ends in the warm-up phase
    guided = None
    try:
        from .guided import GuidedCompiler

        # The wrapper, not the HF tokenizer: the compiler reads every EOS id from it.
        guided = GuidedCompiler(loaded.tokenizer, loaded.vocab_size)
    except ImportError:  # llguidance missing: constrained requests get a clear 400
        log.warning("llguidance is not installed: guided decoding disabled")
    ram = RamPrefixCache(
        settings.cache_ram_bytes,
        min_tokens=settings.cache_min_tokens,
        explain=reasoning_at(loaded.reasoning) if loaded.reasoning is not None else None,
    )
    disk = None
    if settings.cache_disk_bytes > 0 and group is not None:
        # Slots hold whole KV caches; each rank holds a shard of every one.
        log.warning("the disk prompt cache is off for a distributed model (RAM cache only)")
    elif settings.cache_disk_bytes > 0:
        from .. import paths
        from .disk_cache import DiskCache

        disk = DiskCache(
            Path(settings.cache_dir) if settings.cache_dir else paths.home() / "kv-cache",
            loaded.fingerprint,
            loaded.spec.name,
            max_bytes=settings.cache_disk_bytes,
            max_slots=settings.cache_slots,
            block_tokens=settings.cache_block_tokens,
            min_tokens=max(settings.cache_min_tokens, settings.cache_block_tokens),
        )
    scheduler = Scheduler(
        settings.max_batch,
        settings.max_queued,
        settings.prefill_chunk,
        idle_chunk_tokens=settings.idle_prefill_chunk,
        padded=settings.batched_prefill,
    )
    engine = Engine(
        loaded,
        PromptCache(ram, disk),
        guided,
        scheduler=scheduler,
        batched_prefill=settings.batched_prefill,
    )
    if group is not None:
        engine.mirrored = True
        # Every rank loaded its shard, and the same thing the same way (or this raises).
        layout = distributed.cache_layout(loaded.model)
        distributed.agree(group, f"{loaded.fingerprint} guided={guided is not None} {layout}")
    return loaded, engine, Preprocessor(loaded, guided)


class EngineLoop:
    """The single thread that runs MLX: inputs in, `Engine.step`, messages out."""

    def __init__(self, engine: Any, share: distributed.StepShare | None = None):
        self.engine = engine
        self.share = share  # a distributed rank 0 shares each step's inputs with the others
        self.io: WorkerIO | None = None
        self.started = time.time()
        self.last_step = time.time()
        # When the step now running began (None between steps). The supervisor's watchdog
        # reads its age from heartbeats: a forward pass that hangs shows up here even though
        # the I/O thread keeps beating.
        self.step_started: float | None = None

    def stats(self) -> dict[str, Any]:
        """Called from the I/O thread: reads only the snapshot the engine published."""
        started = self.step_started
        return dict(
            self.engine.snapshot,
            last_step=self.last_step,
            step_age_s=0.0 if started is None else round(time.monotonic() - started, 3),
            uptime=time.time() - self.started,
        )

    def run(self) -> None:
        assert self.io is not None
        io = self.io
        while True:
            # 1. Inputs: block only when there is nothing to do.
            idle = self.engine.idle
            items = io.take(block=idle)
            stop = any(isinstance(item, Shutdown) for item in items)
            if self.share is not None:
                # Every turn, idle ticks included; timed like a step, so the watchdog sees a
                # rank that hangs even while nothing runs.
                self.step_started = time.monotonic()
                self.share.lead([] if stop else items, stop=stop)
                self.step_started = None
            if stop:
                return
            if idle and not items:
                continue
            # 2. One step; its decode tokens leave before its prefill work starts.
            self.step_started = time.monotonic()
            messages = self.engine.step(items, flush=io.send_all)
            self.step_started = None
            self.last_step = time.time()
            if messages:
                io.send_all(messages)


if __name__ == "__main__":
    sys.exit(main())
