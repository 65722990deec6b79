"""`mlxtg create-config`: a commented models.yaml that runs as written."""

from __future__ import annotations

from ..models import DEMO_MODEL_PATH

HEADER = """\
# mlxtg models.yaml: serve these with `mlxtg up --config {path}`
#
# Server-wide settings (command-line flags override them):
max_resident_models: 1        # models kept loaded at once; others are swapped in on request (LRU)
# memory_budget_gb: 16        # also evict when loading would exceed this (worker RSS + weights)
# max_batch: 32               # sequences decoded together per model
# max_queued: 128             # requests waiting per model before 429
# cache_ram_gb: 2             # RAM prefix cache per model
#
# Every entry below points at the demo model that ships with mlxtg, so this file runs as
# written. Replace model_id_or_path with a local folder or a Hugging Face id
# (e.g. mlx-community/Qwen2.5-7B-Instruct-4bit). Only models listed here can be requested.
models:
"""

ENTRY = """\
  - model_id_or_path: {source}
    model_name: {name}            # the `model` clients ask for (default: the folder name)
    quant: {quant}                     # none | q8 | q6 | q4 | q3 | q2: converted once at start-up, then reused
    # quant_group_size: 64        # mlx-lm group size for quantisation
    # tokenizer_id_or_path: null  # another tokenizer than the model's
    # adapter_path: null          # a LoRA adapter folder (adapter_config.json + adapters.safetensors)
    # revision: null              # Hugging Face branch, tag or commit
    # model_config: {{}}            # overrides of the model's config.json
    # tokenizer_config: {{}}        # extra tokenizer settings (e.g. eos_token)
    # chat_template: null         # a Jinja chat template replacing the tokenizer's
    # tool_parser: null           # hermes | llama3_json | mistral (default: detected from the template)
    # context_length: null        # cap the context length
    # reasoning_parser: auto      # auto | none | think | harmony (auto: from the vocabulary and template)
    # reasoning_tags: null        # [start, end] reasoning markers, e.g. ["<seed:think>", "</seed:think>"]
    pinned: {pinned}                  # pinned models are never evicted
    # idle_timeout: 600           # unload after this many idle seconds
    # cache_ram_gb: 2             # per-model prefix-cache budget (overrides the server's)
"""

_VARIANTS = [("none", "mlxtg-demo"), ("q8", "mlxtg-demo-q8"), ("q4", "mlxtg-demo-q4")]


def render(num_models: int, path: str = "models.yaml") -> str:
    out = [HEADER.format(path=path)]
    for i in range(num_models):
        quant, name = _VARIANTS[i % len(_VARIANTS)]
        if i >= len(_VARIANTS):
            name = f"{name}-{i}"
        out.append(ENTRY.format(source=DEMO_MODEL_PATH, name=name, quant=quant, pinned="false"))
    return "".join(out)
