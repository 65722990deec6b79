"""One model across several processes with MLX's distributed runtime: rank 0 leads, the rest follow.

Every rank holds a shard of the weights (`shard`) and its shard of every KV cache, and runs
the same `Engine` on the same inputs. The collectives inside the forward pass (a tensor split
all-sums after each sharded layer pair; a pipeline split sends activations between stages and
gathers the last one) keep the ranks in step, and every rank ends a forward pass with the same
logits, so the same sampler with the same seeds picks the same tokens everywhere.

Only rank 0 talks to the supervisor. Before each engine step it shares that step's inputs
(`StepShare.lead`): the GENERATE messages as they arrived, each with a seed filled in where the
client gave none (`Seeding`), aborts and cache clears. The followers (`follow`) prepare the same
requests from those messages and take the same step; their outputs are dropped. Rank 0 shares
on every turn of its loop, idle ticks included, so followers never sit long in a collective
without news, and a rank that dies makes the others' next collective raise.

The processes find each other the way `mlx.launch` tells them to: MLX_RANK and MLX_HOSTFILE
(ring backend) in the environment.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
import msgspec
import numpy as np

from ..protocol import Abort, Control, Generate, decode, encode
from .scheduler import Request

log = logging.getLogger("mlxtg.worker")

SPLITS = ("tensor", "pipeline")


class Stop:
    """What `StepShare.follow` returns when the leader shuts down."""


def in_group() -> bool:
    """Whether this process was started as one rank of a group (by mlx.launch or the
    supervisor, which set the same variables)."""
    return "MLX_RANK" in os.environ and bool(os.environ.get("MLX_HOSTFILE"))


def init_group(backend: str = "ring") -> Any:
    """Join the group the environment describes; raises when it cannot (never a group of 1)."""
    import mlx.core as mx

    group = mx.distributed.init(strict=True, backend=backend)
    log.info("rank %d of %d (%s backend)", group.rank(), group.size(), backend)
    return group


def shard(model: Any, group: Any, split: str) -> None:
    """Split a lazily loaded model across `group` the way mlx-lm's sharded_load does."""
    # Uneven shards would give the ranks different KV-cache sizes, and so different RAM-cache
    # evictions: the ranks' engines would stop being mirrors. Refuse them up front.
    kind = getattr(model, "model_type", type(model).__module__.rsplit(".", 1)[-1])
    size = group.size()
    if split == "tensor":
        if not hasattr(model, "shard"):
            raise ValueError(f"{kind} models cannot be split by tensor; try split: pipeline")
        kv_heads = getattr(getattr(model, "args", None), "num_key_value_heads", None)
        if isinstance(kv_heads, int) and kv_heads % size:
            raise ValueError(
                f"{kv_heads} KV heads do not split evenly across {size} ranks; "
                "use split: pipeline or another number of hosts"
            )
        model.shard(group)
    elif split == "pipeline":
        inner: Any = getattr(model, "model", None)
        if not hasattr(inner, "pipeline"):
            raise ValueError(f"{kind} models cannot be split by pipeline; try split: tensor")
        if len(inner.layers) % size:
            raise ValueError(
                f"{len(inner.layers)} layers do not split evenly across {size} ranks; "
                "use split: tensor or another number of hosts"
            )
        inner.pipeline(group)
    else:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")


def share_bytes(group: Any, data: bytes | None) -> bytes:
    """Rank 0's `data` on every rank (others pass None): two all-sums, size then bytes."""
    import mlx.core as mx

    size = mx.distributed.all_sum(mx.array(len(data or b""), dtype=mx.int32), group=group)
    n = int(np.array(size))
    if n == 0:
        return b""
    if data is not None:
        buf = mx.array(np.frombuffer(data, dtype=np.uint8))
    else:
        buf = mx.zeros((n,), dtype=mx.uint8)
    return bytes(np.array(mx.distributed.all_sum(buf, group=group)))


def barrier(group: Any) -> None:
    """Wait until every rank gets here; raises when a rank is gone."""
    import mlx.core as mx

    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))


class Seeding:
    """Rank 0's preprocessor: fills in a seed where the client gave none (every rank must draw
    the same random numbers) and keeps the message on the request for `StepShare.lead`."""

    def __init__(self, inner: Any):
        self.inner = inner
        self._seeds = random.SystemRandom()

    def __call__(self, msg: Generate) -> Request:
        if msg.params.seed is None:
            params = msgspec.structs.replace(msg.params, seed=self._seeds.randrange(2**31))
            msg = msgspec.structs.replace(msg, params=params)
        request: Request = self.inner(msg)
        request.source = msg
        return request

    def __getattr__(self, name: str) -> Any:  # tokenize() and the rest, unchanged
        return getattr(self.inner, name)


class StepShare:
    """The per-step channel from rank 0 to the others."""

    def __init__(self, group: Any, share: Callable[[Any, bytes | None], bytes] = share_bytes):
        self.group = group
        self._share = share

    @property
    def leader(self) -> bool:
        return bool(self.group.rank() == 0)

    def lead(self, items: Iterable[Any], stop: bool = False) -> None:
        """Rank 0: share the inputs its engine is about to step with (or that it stops)."""
        entries: list[list[Any]] = [["stop"]] if stop else []
        for item in items:
            if isinstance(item, Request):
                entries.append(["gen", *encode(item.source)])
            elif isinstance(item, Abort | Control):
                entries.append(["msg", *encode(item)])
        self._share(self.group, msgpack.packb(entries) if entries else None)

    def follow(self, prepare: Callable[[Generate], Request]) -> list[Any] | Stop:
        """Another rank: the inputs of rank 0's next step, prepared here."""
        data = self._share(self.group, None)
        items: list[Any] = []
        for kind, *frames in msgpack.unpackb(data) if data else []:
            if kind == "stop":
                return Stop()
            msg = decode(frames)
            items.append(prepare(msg) if isinstance(msg, Generate) else msg)
        return items


def follow(
    engine: Any,
    prepare: Callable[[Generate], Request],
    share: StepShare,
    outputs: Callable[[list[Any]], None] | None = None,
) -> None:
    """A follower's whole life after loading: rank 0's steps, mirrored, until it stops. Its
    own outputs go to `outputs` (tests compare them with rank 0's), or nowhere."""
    while not isinstance(items := share.follow(prepare), Stop):
        if engine.idle and not items:
            continue  # rank 0's idle tick
        messages = engine.step(items)
        if outputs is not None:
            outputs(messages)
