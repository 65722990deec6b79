"""End-to-end: several models behind one endpoint, switching, quantisation, LoRA, ops tools."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from conftest import API_KEY, Server, start_server
from tiny_model import build_lora_adapter, build_model

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path):
    root = tmp_path_factory.mktemp("multi")
    qwen = build_model(root / "tiny-qwen2", "qwen2", seed=3)
    adapter = build_lora_adapter(tiny_llama, root / "adapter")
    config = root / "models.yaml"
    config.write_text(
        f"""
max_resident_models: 1
models:
  - {{model_id_or_path: {tiny_llama}, model_name: a}}
  - {{model_id_or_path: {qwen}, model_name: b}}
  - {{model_id_or_path: {tiny_llama}, model_name: a-q4, quant: q4}}
  - {{model_id_or_path: {tiny_llama}, model_name: a-lora, adapter_path: {adapter}}}
"""
    )
    srv = start_server(root / "home", ["--config", str(config)])
    with openai.OpenAI(
        base_url=f"{srv.url}/v1", api_key=API_KEY, max_retries=0, timeout=180
    ) as client:
        yield srv, client
    assert srv.stop() == 0


def states(srv: Server) -> dict[str, str]:
    r = httpx.get(f"{srv.url}/v1/models", headers=srv.headers, timeout=10)
    return {m["id"]: m["state"] for m in r.json()["data"]}


def greedy(client, model: str) -> str:
    r = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=12, temperature=0)
    return r.choices[0].message.content


def test_switching_evicts_the_idle_model_and_frees_its_process(multi):
    srv, client = multi
    assert states(srv)["a"] == "loaded"
    a_pid = srv.status()["models"][0]["worker"]["pid"]
    greedy(client, "b")
    st = states(srv)
    assert st["b"] == "loaded" and st["a"] == "unloaded"
    time.sleep(0.5)
    assert not psutil.pid_exists(a_pid) or psutil.Process(a_pid).status() == psutil.STATUS_ZOMBIE


def test_quantised_and_lora_variants_load_and_lora_changes_output(multi):
    srv, client = multi
    base = greedy(client, "a")
    lora = greedy(client, "a-lora")
    assert lora != base
    assert greedy(client, "a") == base  # the base model is untouched by the adapter
    greedy(client, "a-q4")
    home = srv.home / "models"
    assert [p.name for p in home.iterdir() if p.name.endswith("-q4-g64")]


async def test_waiters_share_one_load_and_streams_get_keepalives(multi):
    srv, client = multi
    before = srv.status()["counters"]["model_loads"]
    body = {"model": "b", "messages": PROMPT, "max_tokens": 4, "stream": True}
    async with httpx.AsyncClient(timeout=180, headers=srv.headers) as http:

        async def one() -> str:
            async with http.stream("POST", f"{srv.url}/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                return (await r.aread()).decode()

        if states(srv)["b"] == "loaded":
            greedy(client, "a")
        outs = await asyncio.gather(*(one() for _ in range(3)))
    assert all(o.rstrip().endswith("data: [DONE]") for o in outs)
    assert srv.status()["counters"]["model_loads"] == before + 1


def test_unknown_model_404_lists_the_served_names(multi):
    _, client = multi
    with pytest.raises(openai.NotFoundError) as exc:
        greedy(client, "gpt-4")
    assert "a, b, a-q4, a-lora" in exc.value.body["message"]


def test_ops_commands_evict_and_load(multi):
    srv, _ = multi
    env = {**srv.env(), "MLXTG_API_KEY": API_KEY}

    def cli(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "mlxtg", *args],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    assert "evicted" in cli("evict", "--all")
    assert set(states(srv).values()) == {"unloaded"}
    assert "a-q4" in cli("load", "a-q4")
    deadline = time.monotonic() + 60
    while states(srv)["a-q4"] != "loaded" and time.monotonic() < deadline:
        time.sleep(0.3)
    assert states(srv)["a-q4"] == "loaded"
    deadline = time.monotonic() + 10  # stats arrive with the worker's heartbeats
    while True:
        data = json.loads(cli("status", "--json"))
        loaded = [m for m in data["models"] if m["state"] == "loaded"]
        if loaded and loaded[0]["worker"]["stats"] or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert [m["name"] for m in loaded] == ["a-q4"]
    assert loaded[0]["worker"]["stats"].keys() >= {"running", "queued", "tokens_generated"}


def test_metrics_endpoint(multi):
    srv, client = multi
    greedy(client, "a")
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    for name in (
        "mlxtg_requests_total",
        "mlxtg_time_to_first_token_seconds",
        "mlxtg_generated_tokens_total",
        "mlxtg_model_loads_total",
        "mlxtg_evictions_total",
        'mlxtg_model_loaded{model="a"} 1',
    ):
        assert name in text, name


def test_cache_clear_keeps_the_folder_of_a_running_worker(multi):
    srv, client = multi
    greedy(client, "b")  # b's disk cache folder exists from its load
    greedy(client, "a")
    a = next(m for m in srv.status()["models"] if m["name"] == "a")
    fp = a["worker"]["facts"]["fingerprint"]
    root = srv.home / "kv-cache"
    assert (root / fp / "meta.json").exists()
    r = httpx.post(
        f"{srv.url}/admin/cache/clear", json={"model": None}, headers=srv.headers, timeout=30
    )
    removed = r.json()["removed"]
    # The running worker clears its own cache; its folder (meta.json, index) is not pulled
    # from under it. The folders of the other models are gone.
    assert f"a ({fp})" in removed and any(name.startswith("b (") for name in removed)
    assert [p.name for p in root.iterdir()] == [fp]
    assert json.loads((root / fp / "meta.json").read_text())["model"] == "a"
    greedy(client, "a")
