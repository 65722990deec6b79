"""One model across several processes with MLX's distributed runtime: rank 0 leads, the rest follow.

Every rank holds a shard of the weights (`shard`) and its shard of every KV cache, and runs
the same `Engine` on the same inputs. The collectives inside the forward pass (a tensor split
all-sums after each sharded layer pair; a pipeline split sends activations between stages and
gathers the last one) keep the ranks in step, and every rank ends a forward pass with the same
logits, so the same sampler with the same seeds picks the same tokens everywhere.

Only rank 0 talks to the supervisor. Before each engine step it shares that step's inputs
(`StepShare.lead`): the GENERATE messages as they arrived, each with a seed filled in where the
client gave none (`Seeding`), aborts and cache clears. The followers (`follow`) prepare the same
requests from those messages and take the same step; their outputs are dropped.

The step messages travel over ZeroMQ (`StepChannel`), not a collective: MLX's ring backend
busy-waits, so a follower waiting in an all-sum for the next step burned a whole core while the
model sat idle. Rank 0 sends on every turn of its loop, idle ticks (every 0.5 s) included, so a
follower that hears nothing for `SILENCE_S` knows rank 0 is gone; a rank that dies mid-step
makes the others' next collective raise.

The processes find each other the way `mlx.launch` tells them to: MLX_RANK and MLX_HOSTFILE
(ring backend) in the environment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import numpy as np
import zmq

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


def agree(group: Any, facts: str) -> None:
    """Wait until every rank has loaded, and fail the load unless all loaded the same thing
    alike (`facts`: fingerprint, constraint support, KV cache layout): ranks that differ would
    take different decisions and desynchronise their collectives."""
    import mlx.core as mx

    digest = np.frombuffer(hashlib.sha256(facts.encode()).digest(), dtype=np.uint8)
    every = np.array(mx.distributed.all_gather(mx.array(digest), group=group))
    if not (every.reshape(group.size(), -1) == digest).all():
        raise ValueError(
            "the ranks did not load the same model the same way (weights, quantisation, "
            "constraint support or KV cache layout differ between hosts); rank "
            f"{group.rank()} has: {facts}"
        )


def cache_layout(model: Any) -> str:
    """The KV cache kinds of the layers this rank runs (a pipeline stage runs some)."""
    from mlx_lm.models.cache import make_prompt_cache

    caches = make_prompt_cache(model)
    inner = getattr(model, "model", None)
    start = getattr(inner, "start_idx", 0) or 0
    end = getattr(inner, "end_idx", None) or len(caches)
    return ",".join(type(c).__name__ for c in caches[start:end])


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


class StepChannel:
    """Rank 0 -> every other rank, one message per engine step: a ROUTER on rank 0 (bound on
    its ring address, announced with one collective), a DEALER on each follower."""

    HELLO_TIMEOUT_S = 120.0
    SILENCE_S = 30.0  # rank 0 sends at least every 0.5 s; this much silence: it is gone

    def __init__(self, sock: zmq.Socket, leader: bool, peers: list[bytes]):
        self.sock = sock
        self.leader = leader
        self.peers = peers  # rank 0: the followers' identities

    @classmethod
    def open(cls, group: Any) -> StepChannel:
        ctx = zmq.Context.instance()
        if group.rank() == 0:
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished follower is an error
            port = sock.bind_to_random_port(f"tcp://{_rank0_ip()}")
            share_bytes(group, f"tcp://{_rank0_ip()}:{port}".encode())
            peers: list[bytes] = []
            deadline = time.monotonic() + cls.HELLO_TIMEOUT_S
            while len(peers) < group.size() - 1:
                if not sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                    raise RuntimeError("the other ranks did not connect to rank 0's step channel")
                peers.append(sock.recv_multipart()[0])
            return cls(sock, True, peers)
        endpoint = share_bytes(group, None).decode()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # A fixed identity: after a dropped TCP link ZeroMQ reconnects as the same peer.
        sock.setsockopt(zmq.IDENTITY, f"rank-{group.rank()}".encode())
        sock.connect(endpoint)
        sock.send(b"hello")
        return cls(sock, False, [])

    def send(self, data: bytes) -> None:
        try:
            for peer in self.peers:
                self.sock.send_multipart([peer, data])
        except zmq.ZMQError as exc:
            raise RuntimeError(f"a follower rank is gone: {exc}") from exc

    def recv(self) -> bytes:
        if not self.sock.poll(int(self.SILENCE_S * 1000)):
            raise RuntimeError(f"rank 0 sent nothing for {self.SILENCE_S:g} s: it is gone")
        return bytes(self.sock.recv())


def _rank0_ip() -> str:
    """Rank 0's address in the ring hostfile (`[["ip:port", ...], ...]`)."""
    hosts = json.loads(Path(os.environ["MLX_HOSTFILE"]).read_text())
    return str(hosts[0][0]).rsplit(":", 1)[0]


class StepShare:
    """The per-step messages from rank 0 to the others, over a `StepChannel`."""

    def __init__(self, channel: Any):
        self.channel = channel

    @property
    def leader(self) -> bool:
        return bool(self.channel.leader)

    def lead(self, items: Iterable[Any], stop: bool = False) -> None:
        """Rank 0: share the inputs its engine is about to step with (or that it stops)."""
        entries: list[list[Any]] = [["stop"]] if stop else []
        for item in items:
            if isinstance(item, Request):
                # The tokens too: a chat template may read the clock, so a follower's own
                # rendering could differ (a date, another time zone).
                entries.append(["gen", item.prompt, *encode(item.source)])
            elif isinstance(item, Abort | Control):
                entries.append(["msg", *encode(item)])
        self.channel.send(msgpack.packb(entries) if entries else b"")

    def follow(self, prepare: Callable[[Generate], Request]) -> list[Any] | Stop:
        """Another rank: the inputs of rank 0's next step, prepared here."""
        data = self.channel.recv()
        items: list[Any] = []
        for kind, *rest in msgpack.unpackb(data) if data else []:
            if kind == "stop":
                return Stop()
            if kind != "gen":
                items.append(decode(rest))
                continue
            msg = decode(rest[1:])
            assert isinstance(msg, Generate)
            request = prepare(msg)
            if request.prompt != rest[0]:
                if len(request.prompt) != len(rest[0]):
                    raise RuntimeError(
                        f"this rank rendered request {msg.request_id} to {len(request.prompt)} "
                        f"tokens, rank 0 to {len(rest[0])}: the hosts' templates differ"
                    )
                log.warning("request %s: using rank 0's prompt tokens", msg.request_id)
                request.prompt = list(rest[0])
            items.append(request)
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
