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

import zmq

from ..lifeline import exit_with_parent
from ..protocol import (
    Abort,
    Accepted,
    Config,
    Control,
    Delta,
    Error,
    FinishReason,
    Hello,
    Output,
    Ready,
    decode,
    encode,
)
from .blas import describe_blas
from .io import Shutdown, WorkerIO
from .params import RequestError
from .scheduler import QueueFull, Request, Scheduler
from .settings import EngineSettings

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
    # Heavy imports before HELLO: a standby worker then only has weights left to load.
    for module in ("mlx_lm.utils", "mlxtg.worker.engine", "mlxtg.worker.preprocess"):
        importlib.import_module(module)

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
    settings = EngineSettings.from_wire(config.engine)

    # 2. Load the model; a failure is reported, not raised.
    try:
        runtime = _build_runtime(config, settings)
    except Exception as exc:
        log.exception("model load failed")
        sock.send_multipart(
            encode(
                Ready(
                    worker_id=args.worker_id,
                    model=str(config.model.get("model_name")),
                    error=str(exc),
                )
            )
        )
        sock.close()
        ctx.term()
        return 1
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
            )
        )
    )

    # 3. Serve.
    scheduler = Scheduler(settings.max_batch, settings.max_queued, settings.prefill_chunk)
    loop = EngineLoop(engine, scheduler)
    io = WorkerIO(ctx, sock, args.worker_id, preprocess, loop.stats, settings.heartbeat_s)
    loop.io = io
    io.start()
    loop.run()
    return 0


def _build_runtime(config: Config, settings: EngineSettings) -> tuple[Any, Any, Any]:
    from ..models import ModelSpec
    from .engine import Engine
    from .loader import load
    from .prefix_cache import RamPrefixCache
    from .preprocess import Preprocessor

    loaded = load(ModelSpec.from_wire(config.model))
    guided = None
    try:
        from .guided import GuidedCompiler

        # The wrapper, not the HF tokenizer: the compiler reads every EOS id from it.
        guided = GuidedCompiler(loaded.tokenizer, loaded.vocab_size)
    except ImportError:  # llguidance missing: constrained requests get a clear 400
        log.warning("llguidance is not installed: guided decoding disabled")
    cache = RamPrefixCache(settings.cache_ram_bytes, min_tokens=settings.cache_min_tokens)
    disk = None
    if settings.cache_disk_bytes > 0:
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
    return loaded, Engine(loaded, cache, guided, disk), Preprocessor(loaded, guided)


class EngineLoop:
    """The single thread that runs MLX."""

    def __init__(self, engine: Any, scheduler: Scheduler):
        self.engine = engine
        self.scheduler = scheduler
        self.io: WorkerIO | None = None
        self.started = time.time()
        self.last_step = time.time()
        self.requests_done = 0

    def stats(self) -> dict[str, Any]:
        e = self.engine
        out: dict[str, Any] = {
            "running": e.running,
            "queued": len(self.scheduler.waiting),
            "tokens_generated": e.tokens_generated,
            "prompt_tokens_computed": e.prompt_tokens_computed,
            "kv_bytes": e.kv_bytes(),
            "guided": {
                "mask_seconds": round(e.mask_seconds, 4),
                "masked_tokens": e.mask_rows,
                **(e.guided.stats if e.guided is not None else {}),
            },
            "prefix_cache": dict(
                e.prefix_cache.stats, entries=len(e.prefix_cache), bytes=e.prefix_cache.nbytes
            ),
            "disk_cache": e.disk.describe() if e.disk is not None else None,
            "last_step": self.last_step,
            "uptime": time.time() - self.started,
        }
        try:
            import mlx.core as mx
            import psutil

            out["mlx_active_bytes"] = int(mx.get_active_memory())
            out["mlx_peak_bytes"] = int(mx.get_peak_memory())
            out["rss_bytes"] = int(psutil.Process().memory_info().rss)
        except Exception:  # stats must never break the heartbeat
            pass
        return out

    def run(self) -> None:
        assert self.io is not None
        io = self.io
        while True:
            # 1. Inputs: block only when there is nothing to do.
            idle = self.scheduler.idle and self.engine.running == 0
            for item in io.take(block=idle):
                if isinstance(item, Shutdown):
                    return
                if isinstance(item, Abort):
                    self._abort(item.request_id)
                elif isinstance(item, Control):  # cache clear
                    try:
                        self.engine.clear_caches()
                    except Exception:  # an operator action must never take the worker down
                        log.exception("clearing the prompt cache failed")
                elif isinstance(item, Request):
                    self._admit(item)
            # 2. One step.
            plan = self.scheduler.schedule()
            if plan.empty:
                continue
            deltas: list[Delta] = []
            if plan.decode:
                # Running streams get their token before this step's prefill work starts.
                decoded = self._guarded_decode()
                if decoded:
                    io.send(Output(deltas=decoded))
            for chunk in plan.prefill:
                deltas += self._guarded_prefill(chunk)
            self.scheduler.num_running = self.engine.running
            self.last_step = time.time()
            if deltas:
                io.send(Output(deltas=deltas))

    def _admit(self, req: Request) -> None:
        assert self.io is not None
        try:
            self.scheduler.add(req)
        except QueueFull:
            self.io.send(
                Error(
                    request_id=req.request_id,
                    status=429,
                    message="the model's request queue is full; retry shortly",
                    type="rate_limit_error",
                    code="queue_full",
                    retry_after=1.0,
                )
            )
            return
        cached, source, reason = self.engine.attach_prefix(req)
        self.io.send(
            Accepted(
                request_id=req.request_id,
                prompt_tokens=len(req.prompt),
                cached_tokens=cached,
                cache_source=source,
                cache_miss_reason=reason,
            )
        )

    def _abort(self, request_id: str) -> None:
        assert self.io is not None
        deltas = self.engine.abort(request_id)
        req = self.scheduler.remove(request_id)
        if req is not None:
            deltas.append(Delta(request_id=request_id, finish_reason=FinishReason.ABORT))
        if deltas:
            self.io.send(Output(deltas=deltas))

    def _guarded_prefill(self, chunk: Any) -> list[Delta]:
        req = chunk.request
        try:
            logits = self.engine.prefill(chunk)
            self.scheduler.complete(chunk)
            return self.engine.start(req, logits) if logits is not None else []
        except Exception as exc:  # one request's fault must not harm the others
            log.exception("prefill of %s failed", req.request_id)
            self.scheduler.remove(req.request_id)
            self._fail(req.request_id, exc)
            return []

    def _guarded_decode(self) -> list[Delta]:
        try:
            return self.engine.decode()
        except Exception as exc:
            log.exception("decode step failed; failing the running batch")
            for rid in {s.request_id for s in self.engine.batch}:
                self.engine.abort(rid)
                self._fail(rid, exc)
            return []

    def _fail(self, request_id: str, exc: Exception) -> None:
        assert self.io is not None
        status = exc.status if isinstance(exc, RequestError) else 500
        self.io.send(
            Error(
                request_id=request_id,
                status=status,
                message=f"generation failed: {exc}",
                type="server_error" if status >= 500 else "invalid_request_error",
            )
        )


if __name__ == "__main__":
    sys.exit(main())
