"""The one random-model builder every benchmark uses, and small facts about model folders.

    python -m bench.models build --hidden 768 --layers 10 --intermediate 2048 --heads 12

Nothing here imports MLX at module level: `ensure_llama` builds in a subprocess (with the same
OpenBLAS preload as the servers), so a benchmark's parent process stays light.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/models.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"  # noqa: A001

from bench.common import DEMO_MODEL, OUT, ROOT, env_with_preload, find_openblas  # noqa: E402

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


@dataclass(frozen=True, slots=True)
class LlamaDims:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    max_pos: int = 2048
    seed: int = 0

    @property
    def name(self) -> str:
        return (f"llama-h{self.hidden}-l{self.layers}-i{self.intermediate}-a{self.heads}"
                f"-p{self.max_pos}-s{self.seed}")


# ~74 M parameters with the demo tokenizer (4,096 tokens): the forward pass dominates a step,
# yet 3 rounds at 1/4/16 streams fit in minutes on 2 cores.
SERVING_BIG = LlamaDims(hidden=768, layers=10, intermediate=2048, heads=12)
# The agent benchmark needs a long context (a ~2k-token system turn, 10 turns on top).
AGENT_BIG = LlamaDims(hidden=1024, layers=12, intermediate=2816, heads=16, max_pos=8192)


# -- model folders --------------------------------------------------------------------------------
def model_ready(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors")) and (
        path / "tokenizer.json"
    ).exists()


def wait_for_model(path: Path, timeout: float, log: Any = print) -> bool:
    """Poll until `path` holds a complete model folder (the demo model may still be training)."""
    deadline = time.time() + timeout
    said = False
    while not model_ready(path):
        if time.time() > deadline:
            return False
        if not said:
            log(f"waiting up to {timeout:.0f}s for {path} (config.json, weights, tokenizer)...")
            said = True
        time.sleep(5)
    return True


def model_params(path: Path) -> int | None:
    """Parameter count: recorded by the builder, else estimated from a Llama config."""
    cfg = json.loads((path / "config.json").read_text())
    if "bench_params" in cfg:
        return int(cfg["bench_params"])
    h, L, i, v = (cfg.get(k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))
    if not all((h, L, i, v)):
        return None
    kv = cfg.get("num_key_value_heads", cfg.get("num_attention_heads"))
    hd = cfg.get("head_dim", h // cfg["num_attention_heads"])
    per = h * hd * cfg["num_attention_heads"] * 2 + h * hd * kv * 2 + 3 * h * i + 2 * h
    return L * per + v * h * (1 if cfg.get("tie_word_embeddings", True) else 2) + h


def eos_ids(model: Path, also: tuple[str, ...] = ()) -> list[int]:
    """Every id config.json, generation_config.json or the tokenizer calls EOS, plus the added
    tokens named in `also` (e.g. tool-call tags a benchmark bans with logit_bias)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        p = model / name
        if p.exists():
            v = json.loads(p.read_text()).get("eos_token_id")
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, list):
                ids.update(int(x) for x in v)
    tc, tj = model / "tokenizer_config.json", model / "tokenizer.json"
    if tc.exists() and tj.exists():
        eos = json.loads(tc.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        for t in json.loads(tj.read_text()).get("added_tokens", []):
            if t["content"] == eos or t["content"] in also:
                ids.add(int(t["id"]))
    return sorted(ids)


# -- the builder ----------------------------------------------------------------------------------
def ensure_llama(dims: LlamaDims, tokenizer_src: Path = DEMO_MODEL, out: Path | None = None,
                 log: Any = print) -> Path:
    """A random-weight Llama of `dims` with `tokenizer_src`'s tokenizer, built once into
    bench/out/ and reused while its dimensions and tokenizer files still match."""
    out = out or OUT / dims.name
    if _up_to_date(out, dims, tokenizer_src):
        return out
    log(f"building {out} (random weights, tokenizer from {tokenizer_src})")
    cmd = [sys.executable, "-m", "bench.models", "build", "--out", str(out),
           "--tokenizer-src", str(tokenizer_src), *(f"--{k.replace('_', '-')}={v}" for k, v in asdict(dims).items())]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=900, env=env_with_preload(find_openblas()))
    return out


def _up_to_date(out: Path, dims: LlamaDims, tokenizer_src: Path) -> bool:
    if not model_ready(out):
        return False
    if json.loads((out / "config.json").read_text()).get("bench_dims") != asdict(dims):
        return False
    return all((out / n).read_bytes() == (tokenizer_src / n).read_bytes()
               for n in ("tokenizer.json", "tokenizer_config.json") if (tokenizer_src / n).exists())


def build_llama(out: Path, tokenizer_src: Path, dims: LlamaDims) -> dict[str, Any]:
    """Write the model (fp32 safetensors). GPT-2-like init: N(0, 0.02), residual projections
    scaled by 1/sqrt(2 * layers), so activations stay tame through every layer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.models.llama import Model, ModelArgs

    src: dict[str, Any] = {}
    if (tokenizer_src / "config.json").exists():
        src = json.loads((tokenizer_src / "config.json").read_text())
    tok = json.loads((tokenizer_src / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab = max(len(tok["model"]["vocab"]), *(i + 1 for i in added.values()), int(src.get("vocab_size", 0)))
    eos_id = src.get("eos_token_id")
    if eos_id is None:
        eos = json.loads((tokenizer_src / "tokenizer_config.json").read_text()).get("eos_token")
        eos_id = added.get(eos.get("content") if isinstance(eos, dict) else eos)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dims.hidden,
        "intermediate_size": dims.intermediate,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.heads,
        "head_dim": dims.hidden // dims.heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": dims.max_pos,
        "vocab_size": vocab,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "eos_token_id": eos_id,
        "bos_token_id": src.get("bos_token_id"),
        "pad_token_id": src.get("pad_token_id"),
    }
    mx.random.seed(dims.seed)
    model = Model(ModelArgs(**{k: v for k, v in cfg.items() if k in ModelArgs.__dataclass_fields__}))

    def init(path: str, p: Any) -> Any:
        if p.ndim < 2:
            return p
        std = 0.02 / (math.sqrt(2 * dims.layers) if path.endswith(("o_proj.weight", "down_proj.weight")) else 1)
        return mx.random.normal(p.shape) * std

    model.update(tree_map_with_path(init, model.parameters()))
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, {"format": "pt"})
    for name in TOKENIZER_FILES:
        if (tokenizer_src / name).exists():
            shutil.copy(tokenizer_src / name, tmp / name)
    cfg["bench_params"] = int(sum(v.size for v in weights.values()))
    cfg["bench_dims"] = asdict(dims)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {"path": str(out), "params": cfg["bench_params"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.models")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a random-weight Llama")
    b.add_argument("--out")
    b.add_argument("--tokenizer-src", default=str(DEMO_MODEL))
    for k, v in asdict(SERVING_BIG).items():
        b.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    a = ap.parse_args(argv)
    dims = LlamaDims(a.hidden, a.layers, a.intermediate, a.heads, a.max_pos, a.seed)
    out = Path(a.out) if a.out else OUT / dims.name
    print(json.dumps(build_llama(out, Path(a.tokenizer_src), dims)))


if __name__ == "__main__":
    main()
