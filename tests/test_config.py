from pathlib import Path

import pytest

from mlxtg.cli.create_config import render
from mlxtg.supervisor.config import ConfigError, build_settings


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "models.yaml"
    p.write_text(text)
    return p


def test_no_config_no_model_serves_the_demo_model():
    s = build_settings(None, None, {})
    assert s.model_names() == ["mlxtg-demo"]


def test_list_and_mapping_forms(tmp_path: Path):
    model = tmp_path / "m"
    model.mkdir()
    a = build_settings(write(tmp_path, f"- model_id_or_path: {model}\n  model_name: a\n"), None, {})
    assert a.model_names() == ["a"]
    b = build_settings(
        write(
            tmp_path,
            f"max_resident_models: 2\nmodels:\n  - model_id_or_path: {model}\n    quant: q4\n",
        ),
        None,
        {"port": 6000},
    )
    assert b.max_resident_models == 2 and b.port == 6000 and b.models[0].quant == "q4"


def test_relative_paths_resolve_from_the_file(tmp_path: Path):
    (tmp_path / "weights").mkdir()
    s = build_settings(write(tmp_path, "- model_id_or_path: ./weights\n"), None, {})
    assert s.models[0].model_id_or_path == str((tmp_path / "weights").resolve())


@pytest.mark.parametrize(
    "text,needle",
    [
        (
            "- model_id_or_path: /nope/x\n  model_name: m\n",
            "models[0] (m): field 'model_id_or_path': path '/nope/x' does not exist",
        ),
        (
            "- model_id_or_path: org/repo\n  colour: red\n",
            "models[0]: field 'colour': Extra inputs are not permitted",
        ),
        ("- model_id_or_path: org/repo\n  quant: q5\n", "field 'quant'"),
        (
            "- model_id_or_path: org/a\n  model_name: x\n- model_id_or_path: org/b\n  model_name: x\n",
            "duplicate model_name 'x'",
        ),
        ("- {}\n", "field 'model_id_or_path': Field required"),
        ("models: 3\n", "expected a list of models"),
        ("- model_id_or_path: [\n", "not valid YAML"),
        ("max_batch: 0\nmodels:\n  - model_id_or_path: org/a\n", "setting 'max_batch'"),
    ],
)
def test_errors_name_file_entry_and_field(tmp_path: Path, text: str, needle: str):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        build_settings(path, None, {})
    assert needle in str(exc.value)
    assert str(path) in str(exc.value)


def test_hub_ids_are_not_checked_on_disk(tmp_path: Path):
    s = build_settings(
        write(tmp_path, "- model_id_or_path: mlx-community/Some-Model-4bit\n"), None, {}
    )
    assert s.model_names() == ["Some-Model-4bit"]


def test_create_config_template_parses_with_the_demo_model(tmp_path: Path):
    path = write(tmp_path, render(4))
    s = build_settings(path, None, {})
    assert s.model_names() == ["mlxtg-demo", "mlxtg-demo-q8", "mlxtg-demo-q4", "mlxtg-demo-3"]
    assert [m.quant for m in s.models] == ["none", "q8", "q4", "none"]


def test_prefill_mode_and_budgets_reach_the_worker_settings(tmp_path: Path):
    from mlxtg.protocol import Config, EngineSettings, ModelLoad, decode, encode

    cfg = tmp_path / "models.yaml"
    cfg.write_text("batched_prefill: false\nidle_prefill_chunk: 4096\nmodels: []\n")
    s = build_settings(cfg, None, {})
    assert (s.batched_prefill, s.idle_prefill_chunk) == (False, 4096)
    assert build_settings(cfg, None, {"batched_prefill": True}).batched_prefill is True
    engine = EngineSettings(batched_prefill=False, idle_prefill_chunk=4096)
    msg = Config(worker_id="w", model=ModelLoad(model_id_or_path="m"), engine=engine)
    back = decode(encode(msg))
    assert isinstance(back, Config) and back.engine == engine


def test_a_model_spec_travels_as_a_typed_record_and_comes_back_equal():
    from mlxtg.models import ModelSpec
    from mlxtg.protocol import Config, EngineSettings, decode, encode

    spec = ModelSpec.model_validate(
        {"model_id_or_path": "/m", "model_name": "a", "quant": "q4", "model_config": {"x": 1}}
    )
    back = decode(encode(Config(worker_id="w", model=spec.to_wire(), engine=EngineSettings())))
    assert isinstance(back, Config) and back.model.model_config_ == {"x": 1}
    assert ModelSpec.from_wire(back.model) == spec


def test_reasoning_keys_reach_the_worker_and_bad_ones_name_the_field(tmp_path: Path):
    from mlxtg.models import ModelSpec
    from mlxtg.protocol import Config, EngineSettings, decode, encode

    (tmp_path / "m").mkdir()
    text = (
        f"- model_id_or_path: {tmp_path / 'm'}\n  reasoning_parser: think\n"
        '  reasoning_tags: ["<seed:think>", "</seed:think>"]\n'
    )
    spec = build_settings(write(tmp_path, text), None, {}).models[0]
    assert spec.reasoning_parser == "think"
    assert spec.reasoning_tags == ("<seed:think>", "</seed:think>")
    back = decode(encode(Config(worker_id="w", model=spec.to_wire(), engine=EngineSettings())))
    assert isinstance(back, Config) and back.model.reasoning_tags == spec.reasoning_tags
    assert ModelSpec.from_wire(back.model) == spec
    for bad in ("  reasoning_parser: deepseek\n", "  reasoning_tags: [a]\n"):
        path = write(tmp_path, f"- model_id_or_path: {tmp_path / 'm'}\n{bad}")
        with pytest.raises(ConfigError, match="field 'reasoning_"):
            build_settings(path, None, {})
