"""A model sharded across two processes with MLX's ring backend on 127.0.0.1 (issue 13).

Each run starts tests/distributed_rank.py twice as ranks 0 and 1 (the environment contract
of `mlx.launch`: MLX_RANK and MLX_HOSTFILE) and once alone. Greedy and seeded tokens must be
equal token for token to the single process's, and every rank's engine must have produced
exactly rank 0's tokens (unseeded sampling included: rank 0 shares the seed it drew).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port
from tiny_model import build_model

from mlxtg.models import DEMO_MODEL_PATH

RANK_SCRIPT = Path(__file__).with_name("distributed_rank.py")


def run_ranks(model: Path, split: str, out: Path, ranks: int) -> list[dict[str, list[int]]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    files = [out / f"rank{r}.json" for r in range(ranks)]
    if ranks > 1:
        hosts = out / "hosts.json"
        hosts.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(ranks)]))
        env["MLX_HOSTFILE"] = str(hosts)
    procs = [
        subprocess.Popen(
            [sys.executable, str(RANK_SCRIPT), str(model), split, str(files[r])],
            env={**env, "MLX_RANK": str(r)} if ranks > 1 else env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(ranks)
    ]
    for p in procs:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output.decode()
    return [json.loads(f.read_text()) for f in files]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("q") / "qwen2", "qwen2", layers=4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "which,split", [("tiny", "tensor"), ("demo", "tensor"), ("qwen2", "pipeline")]
)
def test_two_ranks_match_one_process(which, split, tiny_llama, qwen2, tmp_path):
    model = {"tiny": tiny_llama, "demo": DEMO_MODEL_PATH, "qwen2": qwen2}[which]
    (solo,) = run_ranks(model, split, tmp_path, ranks=1)
    lead, follower = run_ranks(model, split, tmp_path, ranks=2)
    assert lead == follower  # the follower's engine mirrored every step
    for key, tokens in solo.items():
        if not key.startswith("unseeded"):
            assert lead[key] == tokens, key
    assert len(lead["doomed/0"]) < 12  # the abort reached both ranks
    assert len(lead["late/0"]) == 12  # a late arrival (its prefix from the RAM cache)


class Wire:
    """A fake step channel: what rank 0 sends, the follower's next recv gets."""

    def __init__(self, sent, leader):
        self.sent, self.leader = sent, leader

    def send(self, data):
        self.sent.append(data)

    def recv(self):
        return self.sent.pop(0)


def test_step_share_carries_generates_aborts_clears_and_stop():
    from mlxtg.protocol import Abort, Control, ControlOp, Generate
    from mlxtg.worker.distributed import Seeding, StepShare, Stop
    from mlxtg.worker.params import SamplingParams
    from mlxtg.worker.scheduler import Request

    def prepare(msg):
        return Request(request_id=msg.request_id, prompt=[1, 2, 3])

    sent: list[bytes] = []
    lead, follow = StepShare(Wire(sent, True)), StepShare(Wire(sent, False))
    seeding = Seeding(prepare)
    unseeded = Generate(request_id="a", model="m", params=SamplingParams(), prompt="x")
    seeded = Generate(request_id="b", model="m", params=SamplingParams(seed=5), prompt="y")
    items = [seeding(unseeded), seeding(seeded), Abort(request_id="z")]
    items.append(Control(request_id="c", op=ControlOp.CACHE_CLEAR))
    lead.lead(items)
    seen: list[Generate] = []

    def prepare_here(msg):  # the follower prepares the messages rank 0 prepared
        seen.append(msg)
        return prepare(msg)

    got = follow.follow(prepare_here)
    assert [type(x).__name__ for x in got] == ["Request", "Request", "Abort", "Control"]
    assert seen[0].params.seed is not None and seen[0].params.seed == items[0].source.params.seed
    assert seen[1].params.seed == 5
    lead.lead([])  # an idle tick: nothing to do
    assert follow.follow(prepare) == []
    # A follower whose template renders other tokens (a clock in the template) takes rank 0's
    # when the length agrees, and leaves the group when it does not.
    lead.lead([seeding(seeded)])
    (request,) = follow.follow(lambda msg: Request(request_id=msg.request_id, prompt=[1, 2, 9]))
    assert request.prompt == [1, 2, 3]
    lead.lead([seeding(seeded)])
    with pytest.raises(RuntimeError, match="templates differ"):
        follow.follow(lambda msg: Request(request_id=msg.request_id, prompt=[1, 2]))
    lead.lead([], stop=True)
    assert isinstance(follow.follow(prepare), Stop)


def test_models_yaml_distributed_entry_is_checked_and_round_trips(tmp_path):
    from pydantic import ValidationError

    from mlxtg.models import ModelSpec

    def spec(**dist):
        return ModelSpec.model_validate({"model_id_or_path": "m", "distributed": dist})

    s = spec(hosts=["127.0.0.1", {"ssh": "localhost", "ip": "127.0.0.1"}], split="pipeline")
    assert ModelSpec.from_wire(s.to_wire()) == s
    assert [h.ip for h in s.distributed.hosts] == ["127.0.0.1", "127.0.0.1"]
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(
        '{"hosts": [{"ssh": "localhost", "ips": ["127.0.0.1"]},'
        ' {"ssh": "mac2", "ips": ["10.9.9.9"]}]}'
    )
    s = spec(hostfile=str(hostfile), port=40000)
    bad_hostfile = tmp_path / "bad.json"
    bad_hostfile.write_text('{"hosts": [{"ssh": "a", "ips": []}, {"ssh": "b"}]}')
    assert [(h.ssh, h.ip) for h in s.distributed.hosts] == [
        ("localhost", "127.0.0.1"),
        ("mac2", "10.9.9.9"),
    ]
    for bad, why in [
        ({"hosts": ["127.0.0.1"]}, "at least 2 hosts"),
        ({"hosts": ["127.0.0.1"] * 2, "backend": "mpi"}, "backend"),
        ({"hosts": ["127.0.0.1"] * 2, "split": "data"}, "split"),
        ({"hosts": ["127.0.0.1", "::1"]}, "IPv4"),
        ({"hosts": ["127.0.0.1", "mac2"]}, "mac2"),
        ({"hosts": ["127.0.0.1"] * 2, "port": 65535}, "exceed 65535"),
        ({"hostfile": str(tmp_path / "missing.json")}, "cannot read"),
        ({"hostfile": str(bad_hostfile)}, "expected"),
    ]:
        with pytest.raises(ValidationError, match=why):
            spec(**bad)
    # Where rank 0 runs is checked only where the server starts (each rank rebuilds the spec).
    remote_first = spec(hosts=["10.9.9.9", "127.0.0.1"], port=40000)
    with pytest.raises(ValueError, match="must be this machine"):
        remote_first.distributed.check_here()
    with pytest.raises(ValueError, match="distributed.port"):
        spec(hosts=["127.0.0.1", "10.9.9.9"]).distributed.check_here()
    spec(hosts=["127.0.0.1", "10.9.9.9"], port=40000).distributed.check_here()


def test_rank_group_goes_down_whole_when_one_rank_exits(tmp_path):
    """RankGroup stands in for the worker's Popen: one rank gone -> the rest killed."""
    import signal
    import time

    from mlxtg.supervisor.ranks import RankGroup

    hostfile = tmp_path / "ring.json"
    hostfile.write_text("[]")
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    group = RankGroup(sleepers, hostfile)
    assert group.poll() is None and group.pid == sleepers[0].pid
    sleepers[2].send_signal(signal.SIGTERM)
    sleepers[2].wait()
    deadline = time.monotonic() + 10
    while group.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group.returncode is not None and group.returncode != 0
    assert all(p.poll() is not None for p in sleepers)
    assert not hostfile.exists()
