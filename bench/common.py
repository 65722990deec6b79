"""Helpers shared by the benchmarks: machine facts, free ports, process trees, test models.

Nothing here imports MLX at module level, so a benchmark's parent process stays light; the
model builders run in a subprocess (`python -m bench.common build-llama ...`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from mlxtg.worker.blas import OPENBLAS_CANDIDATES, find_fast_blas  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
DEMO_MODEL = ROOT / "mlxtg" / "demo" / "model"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def find_openblas() -> str | None:
    """The OpenBLAS the mlxtg supervisor would preload (same lookup, so both servers match)."""
    return find_fast_blas()


def env_without_preload(blas: str | None = None) -> dict[str, str]:
    """This environment with LD_PRELOAD set to exactly `blas` (or removed)."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if blas:
        env["LD_PRELOAD"] = blas
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# -- machine facts --------------------------------------------------------------------------------
def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = int(line.split()[1]) / 2**20
    except OSError:
        pass
    mlx_ver = _version("mlx")
    try:
        mlx_cpu = _version("mlx-cpu")
        if mlx_cpu != "not installed":
            mlx_ver += f" (mlx-cpu {mlx_cpu})"
    except Exception:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(ram_gb, 1) if ram_gb else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "mlx": mlx_ver,
        "mlx_lm": _version("mlx-lm"),
        "mlxtg": _version("mlxtg"),
        "openblas": find_openblas(),
    }


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def busy_processes(min_cpu: float = 20.0, exclude: set[int] | None = None) -> list[str]:
    """Other processes using the CPU right now (the benchmark shares the machine)."""
    try:
        import psutil
    except ImportError:
        return []
    exclude = exclude or set()
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid not in exclude]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
    time.sleep(1.0)
    out = []
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
        except psutil.Error:
            continue
        if cpu >= min_cpu:
            cmd = " ".join(p.info.get("cmdline") or [p.info.get("name") or "?"])[:90]
            out.append(f"{cpu:.0f}% pid {p.pid} {cmd}")
    return out


# -- processes ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:
        return []


def stop_tree(
    proc: subprocess.Popen[Any], sig: int = signal.SIGINT, timeout: float = 30.0
) -> int | None:
    """Signal the process, wait, then SIGKILL it and every descendant it had (by pid).

    Descendants are collected before signalling: mlxtg's workers and gateway run in their
    own sessions, so a process-group kill would miss them."""
    kids = set(descendants(proc.pid))
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    kids |= set(descendants(proc.pid))
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # started with start_new_session=True
        try:
            proc.kill()
            proc.wait(timeout=10)
        except Exception:
            pass
    deadline = time.time() + 10
    for pid in kids:
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    return proc.returncode


def _alive(pid: int) -> bool:
    try:
        import psutil

        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


# -- models ---------------------------------------------------------------------------------------
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


def build_dev_tokenizer(out: Path) -> Path:
    """A stand-in tokenizer (the demo model's recipe, small BPE corpus) when the demo model
    is not there yet. Writes tokenizer files only."""
    from mlxtg.demo.corpus import Gen
    from mlxtg.demo.train import tokenizer_files, train_tokenizer, write_json

    out.mkdir(parents=True, exist_ok=True)
    gen = Gen(0)
    tok = train_tokenizer(["".join(t for t, _ in gen.sample()) for _ in range(3000)], 4096)
    tok.save(str(out / "tokenizer.json"))
    for name, obj in tokenizer_files(tok).items():
        write_json(out / name, obj)
    return out


def build_llama(
    out: Path,
    tokenizer_src: Path,
    hidden: int,
    layers: int,
    intermediate: int,
    heads: int,
    seed: int = 0,
) -> dict[str, Any]:
    """A random-weight Llama (fp32 safetensors) with `tokenizer_src`'s tokenizer files.

    GPT-2-like init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.models.llama import Model, ModelArgs

    tok = json.loads((tokenizer_src / "tokenizer.json").read_text())
    tcfg = json.loads((tokenizer_src / "tokenizer_config.json").read_text())
    vocab = len(tok["model"]["vocab"]) + len(
        [t for t in tok.get("added_tokens", []) if t["content"] not in tok["model"]["vocab"]]
    )
    ids = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab = max([vocab, *[i + 1 for i in ids.values()]])
    eos_tok = tcfg.get("eos_token")
    if isinstance(eos_tok, dict):
        eos_tok = eos_tok.get("content")
    eos_id = ids.get(eos_tok) if eos_tok else None
    src_cfg = tokenizer_src / "config.json"
    if src_cfg.exists():
        sc = json.loads(src_cfg.read_text())
        vocab = max(vocab, int(sc.get("vocab_size", vocab)))
        eos_id = sc.get("eos_token_id", eos_id)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "vocab_size": vocab,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "eos_token_id": eos_id,
    }
    mx.random.seed(seed)
    model = Model(ModelArgs(**{k: v for k, v in cfg.items() if k in ModelArgs.__dataclass_fields__}))

    def init(path: str, p: Any) -> Any:
        if p.ndim < 2:
            return p
        std = 0.02
        if path.endswith(("o_proj.weight", "down_proj.weight")):
            std /= math.sqrt(2 * layers)
        return mx.random.normal(p.shape) * std

    model.update(tree_map_with_path(init, model.parameters()))
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    nparams = sum(v.size for v in weights.values())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, {"format": "pt"})
    for name in TOKENIZER_FILES:
        if (tokenizer_src / name).exists():
            shutil.copy(tokenizer_src / name, tmp / name)
    cfg["bench_params"] = nparams
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {"path": str(out), "params": nparams}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.common")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-llama")
    b.add_argument("--out", required=True)
    b.add_argument("--tokenizer-src", required=True)
    b.add_argument("--hidden", type=int, default=1024)
    b.add_argument("--layers", type=int, default=14)
    b.add_argument("--intermediate", type=int, default=2816)
    b.add_argument("--heads", type=int, default=16)
    b.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("dev-tokenizer")
    t.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.cmd == "build-llama":
        info = build_llama(
            Path(a.out), Path(a.tokenizer_src), a.hidden, a.layers, a.intermediate, a.heads, a.seed
        )
        print(json.dumps(info))
    else:
        print(build_dev_tokenizer(Path(a.out)))


if __name__ == "__main__":
    main()
