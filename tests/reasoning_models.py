"""Tiny reasoning models for tests: tests/tiny_model.py's models and BPE tokenizer, with
reasoning markers as added tokens and a reasoning chat template (docs/reasoning-design.md, 8).

The tokenizer is trained to 1024 - len(added) tokens, so with the added markers the vocab is
still 1024, the embedding's size (think style: `<think>` = 1020, `</think>` = 1021, which
mlx-lm reports as has_thinking). All three templates render a ChatML-like conversation.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny_model import build_model, build_tokenizer

VOCAB = 1024
THINK_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>")
HARMONY_TOKENS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>")

# Qwen3 style: the model opens <think> itself; enable_thinking false pre-fills an empty block;
# reasoning is dropped from history before the last user message.
QWEN3 = """\
{%- set ns = namespace(last_query=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
{%- if m.role == 'assistant' -%}
{%- set content = m.content or '' -%}
{%- set reasoning = m.reasoning_content or '' -%}
{%- if '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}
{%- set content = content.split('</think>')[-1] -%}
{%- endif -%}
{%- if loop.index0 > ns.last_query and reasoning -%}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') -}}
{%- else -%}
{{- '<|im_start|>assistant\\n' + content.lstrip('\\n') -}}
{%- endif -%}
{%- if m.tool_calls -%}{%- for c in m.tool_calls -%}
{{- '\\n<tool_call>\\n{"name": "' + c.function.name + '", "arguments": ' + c.function.arguments + '}\\n</tool_call>' -}}
{%- endfor -%}{%- endif -%}
{{- '<|im_end|>\\n' -}}
{%- elif m.role == 'tool' -%}
{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' -}}
{%- else -%}
{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}
{%- endif -%}
"""

# DeepSeek-R1-distill style: the generation prompt opens "<think>\n"; history keeps only the
# text after </think>.
R1 = """\
{%- for m in messages -%}
{%- if m.role == 'assistant' -%}
{%- set content = m.content or '' -%}
{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}
{{- '<|im_start|>assistant\\n' + content.lstrip('\\n') + '<|im_end|>\\n' -}}
{%- else -%}
{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}
"""

# gpt-oss (harmony) style: analysis then final channel; reasoning_effort in the system header.
HARMONY = """\
{{- '<|start|>system<|message|>Reasoning: ' + (reasoning_effort or 'medium') + '<|end|>' -}}
{%- for m in messages -%}
{%- if m.role == 'assistant' -%}{{- '<|start|>assistant<|channel|>final<|message|>' + (m.content or '') + '<|end|>' -}}
{%- elif m.role != 'system' -%}{{- '<|start|>' + m.role + '<|message|>' + m.content + '<|end|>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}
"""

STYLES = {
    "qwen3": (QWEN3, THINK_TOKENS, "<|im_end|>"),
    "r1": (R1, THINK_TOKENS, "<|im_end|>"),
    "harmony": (HARMONY, HARMONY_TOKENS, "<|return|>"),
}


def build_reasoning_tokenizer(
    out: Path,
    style: str,
    added: tuple[str, ...] | None = None,
    special: bool = False,
    template: str | None = None,
) -> Path:
    """A tokenizer in `out` with `style`'s template and markers (`added` overrides the
    markers, `template` the template); the vocab is 1024 whatever is added."""
    from tokenizers import AddedToken, Tokenizer

    style_template, markers, eos = STYLES[style]
    added = markers if added is None else added
    build_tokenizer(out, VOCAB - len(added))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    if tok.get_vocab_size() != VOCAB - len(added):
        raise RuntimeError(f"BPE trained to {tok.get_vocab_size()} tokens")
    tok.add_tokens([AddedToken(t, special=special, normalized=False) for t in added])
    tok.save(str(out / "tokenizer.json"))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = style_template if template is None else template
    cfg["eos_token"] = eos
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


def build_reasoning_model(out: Path, style: str, arch: str = "llama", seed: int = 0) -> Path:
    """tiny_model.build_model(out, arch) with `style`'s tokenizer; returns `out`."""
    build_model(out, arch=arch, seed=seed, vocab_size=VOCAB)
    build_reasoning_tokenizer(out, style)
    eos = STYLES[style][2]
    vocab = json.loads((out / "tokenizer.json").read_text())
    eos_id = next((t["id"] for t in vocab["added_tokens"] if t["content"] == eos), None)
    config = json.loads((out / "config.json").read_text())
    config["eos_token_id"] = eos_id
    (out / "config.json").write_text(json.dumps(config))
    return out
