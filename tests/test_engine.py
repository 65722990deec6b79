"""The engine on tiny random models: batching, prefix reuse and untrimmable caches."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_model import build_model

from mlxtg.models import ModelSpec
from mlxtg.protocol import Accepted, Generate, Output
from mlxtg.worker.engine import Engine
from mlxtg.worker.loader import load
from mlxtg.worker.params import SamplingParams
from mlxtg.worker.prefix_cache import RamPrefixCache
from mlxtg.worker.preprocess import Preprocessor
from mlxtg.worker.prompt_cache import PromptCache
from mlxtg.worker.scheduler import Request, Scheduler


class Harness:
    """Drives `Engine.step` directly: no sockets, no threads."""

    def __init__(self, path: Path, cache_bytes: int = 1 << 30, batched: bool = True):
        self.loaded = load(ModelSpec(model_id_or_path=str(path)))
        scheduler = Scheduler(max_batch=32, max_queued=64, chunk_tokens=16, padded=batched)
        self.engine = Engine(
            self.loaded,
            PromptCache(RamPrefixCache(cache_bytes, min_tokens=4)),
            scheduler=scheduler,
            batched_prefill=batched,
        )
        self.pre = Preprocessor(self.loaded)

    def request(self, rid: str, messages: list[dict], **params) -> Request:
        p = SamplingParams(temperature=0.0, max_tokens=12, **params)
        return self.pre(Generate(request_id=rid, model="m", params=p, messages=messages))

    def run(self, reqs: list[Request]) -> tuple[dict[str, list[int]], dict[str, int]]:
        out: dict[str, list[int]] = {}
        cached = {}
        messages = self.engine.step(reqs)
        while True:
            for m in messages:
                if isinstance(m, Accepted):
                    cached[m.request_id] = m.cached_tokens
                elif isinstance(m, Output):
                    for d in m.deltas:
                        out.setdefault(d.request_id, []).extend(d.token_ids)
            if self.engine.idle:
                return out, cached
            messages = self.engine.step()


@pytest.fixture(scope="module", params=["llama", "qwen2", "llama_swa"])
def harness(request, tmp_path_factory) -> Harness:
    return Harness(build_model(tmp_path_factory.mktemp(request.param) / "m", request.param))


def convo(i: int) -> list[dict]:
    return [{"role": "user", "content": f"the quick brown fox number {i} jumps over the lazy dog"}]


def test_batched_greedy_equals_alone(harness: Harness):
    alone, _ = harness.run([harness.request("a", convo(0))])
    crowd, _ = harness.run(
        [harness.request(f"b{i}", convo(i)) for i in range(1, 9)] + [harness.request("a", convo(0))]
    )
    assert crowd["a"] == alone["a"]


def test_next_turn_reuses_the_previous_prompt_even_with_untrimmable_caches(harness: Harness):
    first = convo(42)
    out, _ = harness.run([harness.request("t1", first)])
    reply = harness.loaded.tokenizer.decode(out["t1"])
    second = [
        *first,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "and then?"},
    ]
    fresh = Harness(harness.loaded.path, cache_bytes=0)
    expected, _ = fresh.run([fresh.request("t2", second)])
    got, cached = harness.run([harness.request("t2", second)])
    prompt1 = len(harness.request("x", first).prompt)
    assert cached["t2"] >= prompt1  # at least the whole previous prompt came from the cache
    assert got["t2"] == expected["t2"]  # and reusing it changes nothing
