"""Tiny random-weight models of several mlx-lm architectures, built on the fly for tests.

They share a small byte-level BPE tokenizer trained here in a second, with a ChatML chat
template. Their output is noise: tests of mechanics (batching, masks, caching) must not
depend on a model's quality.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ARCHS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama"},
    "qwen2": {"model_type": "qwen2", "attention_bias": True},
    "mistral": {"model_type": "mistral"},
    # Sliding-window layers: RotatingKVCache, which cannot be trimmed.
    "llama_swa": {
        "model_type": "llama",
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 32,
    },
}


def _corpus() -> list[str]:
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "weather",
        "in",
        "oslo",
        "paris",
        "lima",
        "is",
        "sunny",
        "cold",
        "warm",
        "rain",
        "snow",
        "json",
        "schema",
        "number",
        "string",
        "object",
        "array",
        "true",
        "false",
        "null",
        "hello",
        "world",
        "model",
        "server",
        "token",
        "cache",
        "batch",
        "stream",
        "answer",
        "question",
        "tool",
        "call",
        "function",
    ]
    lines = []
    for i in range(2000):
        lines.append(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)))
        lines.append(f'{{"name": "x{i}", "value": {i * 13}, "ok": true, "items": [1, 2, 3]}}')
    lines.append("".join(chr(c) for c in range(32, 127)) + "éüß€日本")
    return lines


def build_tokenizer(out: Path, vocab_size: int = 1024) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "chat_template": CHATML,
                "model_max_length": 2048,
            }
        )
    )


def build_model(
    out: Path,
    arch: str = "llama",
    seed: int = 0,
    vocab_size: int = 1024,
    hidden: int = 64,
    layers: int = 2,
) -> Path:
    """Write a random-weight model of `arch` (see ARCHS) into `out`; returns `out`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    build_tokenizer(out, vocab_size)
    config = {
        **ARCHS[arch],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "eos_token_id": 2,
    }
    (out / "config.json").write_text(json.dumps(config))
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    # Larger-than-default weights so the logits are peaked and varied.
    params = {k: (v * 4.0 if v.ndim == 2 else v) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), params, metadata={"format": "mlx"})
    return out


def build_lora_adapter(model_dir: Path, out: Path, seed: int = 1) -> Path:
    """A random (non-zero) LoRA adapter for a tiny model, in mlx-lm's adapter layout."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, config = load_model(model_dir)
    lora = {
        "rank": 4,
        "scale": 20.0,
        "dropout": 0.0,
        "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"],
    }
    layers = config["num_hidden_layers"]
    linear_to_lora_layers(model, layers, lora)
    mx.random.seed(seed)
    weights = {
        k: mx.random.normal(v.shape) * 0.5
        for k, v in tree_flatten(model.parameters())
        if k.endswith(("lora_a", "lora_b"))
    }
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": layers, "lora_parameters": lora})
    )
    return out
