"""lm-evaluation-harness's `local-completions` model against the real `mlxtg up`: a small
multiple-choice task from local files (nothing is downloaded), scored by log-likelihood
through `echo` + `logprobs`; each choice's score is checked against mlx-lm in process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import API_KEY, Server

pytestmark = pytest.mark.slow
pytest.importorskip("lm_eval")

DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "London", "Rome"], "answer": 0},
    {"question": "The sky is", "choices": ["blue", "green"], "answer": 0},
    {"question": "One plus one is", "choices": ["two", "seven"], "answer": 0},
]


def _task(folder: Path) -> None:
    docs = folder / "docs.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "tiny.yaml").write_text(
        "task: mlxtg_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )


def _run_lm_eval(server: Server, folder: Path, model_args: str) -> tuple[list[dict], str]:
    out = folder / "out"
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "OPENAI_API_KEY": API_KEY,
    }
    cmd = [
        sys.executable, "-m", "lm_eval",
        "--model", "local-completions",
        "--model_args", f"base_url={server.url}/v1/completions,model=mlxtg-demo,{model_args}",
        "--tasks", "mlxtg_tiny", "--include_path", str(folder),
        "--log_samples", "--output_path", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (samples,) = out.rglob("samples_mlxtg_tiny_*.jsonl")
    return [json.loads(line) for line in samples.read_text().splitlines()], done.stderr


def _expected(context: str, continuation: str) -> float:
    """The continuation's log-likelihood, computed by mlx-lm in this process."""
    import mlx.core as mx
    import numpy as np

    from mlxtg.models import demo_spec
    from mlxtg.worker.loader import load

    loaded = _expected.__dict__.setdefault("loaded", load(demo_spec()))
    hf = loaded.tokenizer._tokenizer
    whole = hf(context + continuation, add_special_tokens=False).input_ids
    ctx = hf(context, add_special_tokens=False).input_ids
    logits = loaded.model(mx.array(whole)[None])[0].astype(mx.float32)
    logprobs = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    return float(sum(logprobs[t - 1, whole[t]] for t in range(len(ctx), len(whole))))


@pytest.mark.parametrize(
    "model_args",
    ["tokenizer_backend=huggingface,tokenizer={demo}", f"num_concurrent=2,auth_token={API_KEY}"],
    ids=["hf-tokenizer", "remote-tokenizer"],
)
def test_lm_eval_multiple_choice_scores_match_mlx_lm(server: Server, tmp_path, model_args):
    from mlxtg.models import demo_spec

    _task(tmp_path)
    args = model_args.format(demo=demo_spec().model_id_or_path)
    samples, log = _run_lm_eval(server, tmp_path, args)
    if "tokenizer_backend" not in args:  # found /tokenizer_info and /tokenize by itself
        assert "Using remote tokenizer backend" in log
    assert len(samples) == len(DOCS)
    for sample in samples:
        pairs = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        for (context, continuation), resp in zip(pairs, sample["filtered_resps"], strict=True):
            score = float(resp[0])
            assert score < 0  # a silently unscored prompt reads 0
            assert abs(score - _expected(context, continuation)) <= 1e-3
