"""Build the shipped demo model: synthetic corpus -> byte-level BPE -> small Llama trained with MLX.

    python -m mlxtg.demo.train --out DIR --steps N --seed 0   # train, checkpointing into DIR
    python -m mlxtg.demo.train --eval DIR                     # template parity + greedy quality

Run with OpenBLAS preloaded (LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3):
the mlx[cpu] wheel's reference BLAS is ~35x slower. Training imports only mlx, numpy, tokenizers,
safetensors-compatible MLX I/O and the stdlib; `--eval` also uses mlx_lm and transformers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from mlxtg.demo.corpus import CHAT_TEMPLATE, HELD_OUT, Gen, render

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOOL_TAGS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# -- tokenizer ------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Qwen2-style byte-level BPE; ChatML specials and tool tags appended as added tokens."""
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL) - len(TOOL_TAGS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Markup becomes added tokens later, so merges spent on it would be wasted vocabulary.
    strip = re.compile("|".join(map(re.escape, SPECIAL + TOOL_TAGS)))
    tok.train_from_iterator((strip.sub("\n", t) for t in texts), trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in TOOL_TAGS])
    return tok


def tokenizer_files(tok: Tokenizer) -> dict[str, dict]:
    """tokenizer_config.json and friends, written by hand so transformers 4 and 5 both read them."""
    ids = {s: tok.token_to_id(s) for s in SPECIAL + TOOL_TAGS}
    decoder = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": s in SPECIAL} for s, i in ids.items()}
    entry = lambda s: {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}  # noqa: E731
    return {
        "tokenizer_config.json": {
            "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
            "added_tokens_decoder": decoder, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": None, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 2048,
            "pad_token": "<|endoftext|>", "split_special_tokens": False,
            "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": None},
        "special_tokens_map.json": {
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "eos_token": entry("<|im_end|>"), "pad_token": entry("<|endoftext|>")},
        "generation_config.json": {
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"],
            "do_sample": False},
    }


def model_config(a: argparse.Namespace, tok: Tokenizer) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.hidden,
            "intermediate_size": a.intermediate, "num_hidden_layers": a.layers,
            "num_attention_heads": a.heads, "num_key_value_heads": a.heads, "head_dim": a.hidden // a.heads,
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
            "vocab_size": a.vocab, "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
            "initializer_range": 0.02, "torch_dtype": "float32",
            "bos_token_id": tok.token_to_id("<|endoftext|>"), "eos_token_id": tok.token_to_id("<|im_end|>"),
            "pad_token_id": tok.token_to_id("<|endoftext|>")}


# -- model math -----------------------------------------------------------------------------------
# MLX's CPU exp costs ~20 ns per element (not vectorised) while add/mul cost ~1 ns, and softmax,
# SiLU and the loss were half the step time. This exp is 2^n * poly(f), built from cheap ops.
@mx.custom_function
def _fast_exp(x):
    t = mx.maximum(x * 1.4426950408889634, -126.0)
    n = mx.floor(t)
    f = t - n
    p = 1.0 + f * (0.6931471805599453 + f * (0.2402265069591007 + f * (0.05550410866482158 + f * (
        0.009618129107628477 + f * (0.0013333558146428443 + f * 0.00015403530393381606)))))
    return (p.view(mx.int32) + (n.astype(mx.int32) << 23)).view(mx.float32)


@_fast_exp.vjp
def _fast_exp_vjp(primals, cotangent, output):
    return (cotangent * output,)


def fast_exp(x: mx.array) -> mx.array:
    return cast(mx.array, _fast_exp(x))


def softmax(x):
    e = fast_exp(x - mx.stop_gradient(x.max(-1, keepdims=True)))
    return e / e.sum(-1, keepdims=True)


def forward(model, x, mask):
    """mlx_lm's Llama forward (same weights, same maths) with a block-diagonal mask and fast exp."""
    B, L = x.shape
    h = model.model.embed_tokens(x)
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        r = layer.input_layernorm(h)
        q, k, v = (p(r).reshape(B, L, a.n_heads, -1).transpose(0, 2, 1, 3) for p in (a.q_proj, a.k_proj, a.v_proj))
        s = (a.rope(q) * a.scale) @ a.rope(k).transpose(0, 1, 3, 2) + mask
        h = h + a.o_proj((softmax(s) @ v).transpose(0, 2, 1, 3).reshape(B, L, -1))
        r = layer.post_attention_layernorm(h)
        g = mlp.gate_proj(r)
        h = h + mlp.down_proj(g / (1.0 + fast_exp(-g)) * mlp.up_proj(r))
    return model.model.norm(h)


def loss_fn(model, x, mask, idx, y, w):
    # The LM head (and its exp) only runs on the assistant positions that carry loss.
    h = forward(model, x, mask)
    h = h.reshape(-1, h.shape[-1])[idx]
    logits = model.model.embed_tokens.as_linear(h)
    m = mx.stop_gradient(logits.max(-1))
    lse = mx.log(fast_exp(logits - m[:, None]).sum(-1)) + m
    nll = lse - mx.take_along_axis(logits, y[:, None], -1)[:, 0]
    return (nll * w).sum() / w.sum()


def init_gpt2(model, layers: int) -> None:
    """N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 * layers)."""
    def init(path, p):
        if p.ndim < 2:
            return p
        std = 0.02 / math.sqrt(2 * layers) if path.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
        return mx.random.normal(p.shape) * std
    model.update(tree_map_with_path(init, model.parameters()))


# -- data -----------------------------------------------------------------------------------------
def encode(tok: Tokenizer, docs: list[list[tuple[str, bool]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids plus a per-token flag: is this token assistant output (i.e. a loss target)?"""
    texts, spans = [], []
    for segs in docs:
        pos, sp = 0, []
        for text, target in segs:
            if target:
                sp.append((pos, pos + len(text)))
            pos += len(text)
        texts.append("".join(t for t, _ in segs))
        spans.append(sp)
    out = []
    for enc, sp in zip(tok.encode_batch(texts, add_special_tokens=False), spans, strict=True):
        starts = np.array([o[0] for o in enc.offsets])
        flag = np.zeros(len(starts), bool)
        for a, b in sp:
            flag |= (starts >= a) & (starts < b)
        out.append((np.array(enc.ids, np.int32), flag))
    return out


def make_batch(tok: Tokenizer, seed: int, step: int, batch: int, seq: int, pad: int):
    """Packed batch for one step: whole conversations per row, attention kept inside each one.

    Each step draws from its own seeded generator, so a resumed run sees exactly the same data.
    """
    gen = Gen(seed * 1_000_003 + step)
    pool = [d for d in encode(tok, [gen.sample() for _ in range(4 * batch)]) if len(d[0]) <= seq + 1]
    ids, tgt = np.full((batch, seq + 1), pad, np.int32), np.zeros((batch, seq + 1), bool)
    doc = -np.arange(1, seq + 2)[None].repeat(batch, 0)  # padding attends only to itself
    free = list(range(len(pool)))
    for b in range(batch):
        used, n = 0, 0
        for j in list(free):  # first fit, in generation order
            d_ids, d_tgt = pool[j]
            if used + len(d_ids) <= seq + 1:
                ids[b, used:used + len(d_ids)], tgt[b, used:used + len(d_ids)] = d_ids, d_tgt
                doc[b, used:used + len(d_ids)] = n
                used, n = used + len(d_ids), n + 1
                free.remove(j)
    causal = np.tril(np.ones((seq, seq), bool))
    mask = np.where((doc[:, :seq, None] == doc[:, None, :seq]) & causal, 0.0, -1e9).astype(np.float32)
    # the target at position t is token t+1, valid only inside the same conversation
    idx = np.nonzero((tgt[:, 1:] & (doc[:, 1:] == doc[:, :-1])).reshape(-1))[0]
    k = -(-max(len(idx), 1) // 256) * 256  # bucketed so mx.compile sees few shapes
    w = (np.arange(k) < len(idx)).astype(np.float32)
    idx = np.concatenate([idx, np.zeros(k - len(idx), idx.dtype)]).astype(np.int32)
    return (mx.array(ids[:, :seq]), mx.array(mask[:, None]), mx.array(idx),
            mx.array(ids[:, 1:].reshape(-1)[idx]), mx.array(w), int((doc[:, :seq] >= 0).sum()))


# -- output folder --------------------------------------------------------------------------------
def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def save_static(out: Path, tok: Tokenizer, cfg: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tokenizer.json.tmp"
    tok.save(str(tmp))
    os.replace(tmp, out / "tokenizer.json")
    for name, obj in {**tokenizer_files(tok), "config.json": cfg}.items():
        write_json(out / name, obj)


def save_weights(out: Path, model, step: int) -> None:
    # Atomic replace: a reader (or a crash) never sees a half-written checkpoint.
    tmp = out / "model.tmp.safetensors"
    mx.save_safetensors(str(tmp), dict(tree_flatten(model.parameters())), {"format": "pt", "step": str(step)})
    os.replace(tmp, out / "model.safetensors")


# -- training -------------------------------------------------------------------------------------
def train(a: argparse.Namespace) -> None:
    from mlx_lm.models.llama import Model, ModelArgs  # architecture only, so weight names match

    out, state_dir = Path(a.out), Path(a.state or f"{tempfile.gettempdir()}/mlxtg-demo-train-{a.seed}")
    mx.random.seed(a.seed)
    t0 = time.time()
    if a.resume:
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    else:
        gen = Gen(a.seed)
        tok = train_tokenizer(["".join(t for t, _ in gen.sample()) for _ in range(a.bpe_docs)], a.vocab)
    print(f"tokenizer: {tok.get_vocab_size()} tokens in {time.time() - t0:.1f}s", flush=True)
    cfg = model_config(a, tok)
    model = Model(ModelArgs(**{k: v for k, v in cfg.items() if k in ModelArgs.__dataclass_fields__}))
    init_gpt2(model, a.layers)
    nparams = sum(v.size for _, v in cast(list[tuple[str, mx.array]], tree_flatten(model.parameters())))
    print(f"model: {nparams / 1e6:.2f}M params ({nparams * 4 / 2**20:.1f} MiB fp32)", flush=True)

    x = mx.array(np.arange(40, dtype=np.int32).reshape(2, 20) % a.vocab)
    causal = mx.where(mx.tril(mx.ones((20, 20))) > 0, 0.0, -1e9)
    if (mx.abs(forward(model, x, causal) - model.model(x)).max() > 1e-4).item():
        raise RuntimeError("training forward differs from mlx_lm's Llama forward")

    warm = min(200, a.steps // 10)
    sched = optim.join_schedules([optim.linear_schedule(a.lr / 100, a.lr, warm),
                                  optim.cosine_decay(a.lr, a.steps - warm, a.lr / 10)], [warm])
    opt = optim.AdamW(sched, betas=[0.9, 0.95], weight_decay=0.01)
    first = 1
    if a.resume:  # weights from the folder, moments and step from the state dir
        model.load_weights(str(out / "model.safetensors"))
        opt.init(model.trainable_parameters())
        saved = cast(dict[str, mx.array], mx.load(str(state_dir / "optimizer.safetensors")))
        opt.state = tree_unflatten(list(saved.items()))
        first = json.loads((state_dir / "step.json").read_text())["step"] + 1
        print(f"resumed at step {first}", flush=True)
    else:
        save_static(out, tok, cfg)
        save_weights(out, model, 0)
    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, mask, idx, y, w):
        loss, grads = value_and_grad(model, x, mask, idx, y, w)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss

    pad = tok.token_to_id("<|endoftext|>") or 0
    t_start, seen, losses = time.time(), 0, []
    for i in range(first, a.steps + 1):
        x, mask, idx, y, w, ntok = make_batch(tok, a.seed, i, a.batch, a.seq, pad)
        loss = step(x, mask, idx, y, w)
        mx.eval(loss, state)
        seen += ntok
        losses.append(loss.item())
        if i % a.log_every == 0 or i == a.steps:
            el, done = time.time() - t_start, i - first + 1
            print(f"step {i}/{a.steps} loss {np.mean(losses):.4f} lr {sched(i).item():.2e} tok/s {seen / el:.0f} "
                  f"elapsed {el / 60:.1f}m eta {el / done * (a.steps - i) / 60:.1f}m", flush=True)
            losses = []
        if i % a.ckpt_every == 0 or i == a.steps:
            state_dir.mkdir(parents=True, exist_ok=True)
            tmp = state_dir / "optimizer.tmp.safetensors"
            mx.save_safetensors(str(tmp), dict(tree_flatten(opt.state)))
            os.replace(tmp, state_dir / "optimizer.safetensors")
            save_weights(out, model, i)
            write_json(state_dir / "step.json", {"step": i})
            print(f"checkpoint step {i} -> {out}", flush=True)
    print(f"done in {(time.time() - t0) / 60:.1f} min", flush=True)


# -- evaluation -----------------------------------------------------------------------------------
WEATHER_TOOLS = [("get_weather", "location"), ("get_current_weather", "city")]


def weather_tool(name: str, param: str) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": "Get the current weather in a given location",
        "parameters": {"type": "object", "properties": {
            param: {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": [param]}}}


def evaluate(path: str) -> None:
    from mlx_lm import generate, load

    model, tok = load(path)[:2]
    same, n = 0, 200
    gen = Gen(12345)
    for _ in range(n):  # the Python renderer the corpus used vs. the shipped jinja template
        msgs, tools = gen.conversation()
        same += tok.apply_chat_template(msgs, tools=tools, tokenize=False) == "".join(t for t, _ in render(msgs, tools))
    print(f"template parity: {same}/{n} conversations byte-identical")

    def reply(msgs, tools=None, max_tokens=80):
        prompt = tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)
        return generate(model, tok, prompt, max_tokens=max_tokens)

    for q in ["Hello!", "What is the capital of France?", "What is 7 + 5?", "List three fruits.",
              "Count from 1 to 6.", "What is gravity?"]:
        print(f"\nuser: {q}\nassistant: {reply([{'role': 'user', 'content': q}])}")

    ok = 0
    for i, city in enumerate(HELD_OUT):
        name, param = WEATHER_TOOLS[i % 2]
        q = ["What is the weather in {}?", "What's the weather like in {} today?"][i // 2 % 2].format(city)
        tools = [weather_tool(name, param)]
        text = reply([{"role": "user", "content": q}], tools)
        m = re.search(r"<tool_call>\s*(\{.*\})\s*</tool_call>", text, re.S)
        try:
            call = json.loads(m.group(1)) if m else {}
        except json.JSONDecodeError:
            call = {}
        args = call.get("arguments")
        if not isinstance(args, dict):
            args = {}
        good = call.get("name") == name and city.lower() in str(args.get(param, "")).lower()
        ok += good
        print(f"\n[{'ok' if good else 'FAIL'}] {q}  ({name}/{param})\n{text}")
        if good and i < 3:  # follow-up: does it turn the tool result into an answer?
            res = json.dumps({"location": city, "temperature": 17, "unit": "celsius", "condition": "cloudy"})
            hist = [{"role": "user", "content": q},
                    {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": call}]},
                    {"role": "tool", "content": res}]
            print(f"  after tool result: {reply(hist, tools)}")
    print(f"\nheld-out weather tool calls: {ok}/{len(HELD_OUT)} correct (function name and location)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output model folder (checkpoints are written here as training runs)")
    p.add_argument("--eval", metavar="DIR", help="evaluate a trained model folder instead of training")
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--seq", type=int, default=448, help="tokens per packed row")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--bpe-docs", type=int, default=20000, help="conversations the BPE is trained on")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--state", help="optimizer state dir for --resume (default: a temp dir per seed)")
    a = p.parse_args(argv)
    if a.eval:
        evaluate(a.eval)
    elif a.out:
        train(a)
    else:
        p.error("give --out DIR to train or --eval DIR to evaluate")


if __name__ == "__main__":
    main()
