"""Config validation: every error names the key path and the file."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from akv_runtime import run
from akv_runtime.config import (Config, ConfigError, config_from_dict, load_config)
from akv_runtime.reference import AlignmentRule

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def base() -> dict:
    return yaml.safe_load((CONFIGS / "llama7b.yaml").read_text())


def write(tmp_path, data, name="bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def expect_error(tmp_path, data, key, fragment=""):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message, message
    assert f"{key}:" in message, message
    assert fragment in message, message
    assert info.value.key == key
    return message


def test_shipped_configs_load():
    names = {p.name for p in SHIPPED}
    assert {"smollm2-135m.yaml", "llama7b.yaml", "llama3-8b.yaml"} <= names
    for path in SHIPPED:
        config = load_config(path)
        assert isinstance(config, Config)
        assert config.source == str(path)
        assert isinstance(config.rule_object(), AlignmentRule)


def test_typed_values():
    config = load_config(CONFIGS / "smollm2-135m.yaml")
    m = config.model
    assert (m.num_layers, m.num_query_heads, m.num_kv_heads, m.head_dim) == (30, 9, 3, 64)
    assert m.gqa_group == 3 and m.kind == "gguf-smollm2" and m.path is None
    assert all(isinstance(p, str) for p in config.workload.prompts)
    assert config.rule.k_thresholds == (8, 4)
    llama3 = load_config(CONFIGS / "llama3-8b.yaml").model
    assert (llama3.num_query_heads, llama3.num_kv_heads, llama3.head_dim) == (32, 8, 128)
    llama2 = load_config(CONFIGS / "llama7b.yaml").model
    assert (llama2.num_layers, llama2.num_query_heads, llama2.num_kv_heads,
            llama2.head_dim) == (32, 32, 32, 128)


@pytest.mark.parametrize("section,key", [("", "modle"), ("model", "heads"),
                                         ("workload", "steps"), ("cpu", "layers"),
                                         ("rule", "k_threshold")])
def test_unknown_key(tmp_path, section, key):
    data = base()
    (data[section] if section else data)[key] = 1
    path = f"{section}.{key}" if section else key
    expect_error(tmp_path, data, path, "unknown key")


@pytest.mark.parametrize("section,key", [("model", "head_dim"), ("model", "kind"),
                                         ("workload", "context_tokens"), ("", "model")])
def test_missing_key(tmp_path, section, key):
    data = base()
    del (data[section] if section else data)[key]
    path = f"{section}.{key}" if section else key
    expect_error(tmp_path, data, path, "missing key")


@pytest.mark.parametrize("section,key,value,fragment", [
    ("model", "num_layers", "thirty", "integer"),
    ("model", "num_layers", 32.0, "integer"),
    ("model", "num_kv_heads", True, "integer"),
    ("model", "path", 7, "string"),
    ("workload", "prompts", "just one string", "list"),
    ("workload", "chat_template", "yes", "true or false"),
    ("cpu", "num_layers", "4", "integer"),
    ("rule", "topk", [32], "integer"),
    ("", "rule", [1, 2], "mapping"),
])
def test_wrong_type(tmp_path, section, key, value, fragment):
    data = base()
    (data[section] if section else data)[key] = value
    path = f"{section}.{key}" if section else key
    expect_error(tmp_path, data, path, fragment)


def test_wrong_type_inside_a_list(tmp_path):
    data = base()
    data["workload"]["prompts"] = ["fine", 3]
    expect_error(tmp_path, data, "workload.prompts[1]", "string")
    data = base()
    data["rule"]["k_thresholds"] = [8]
    expect_error(tmp_path, data, "rule.k_thresholds", "list of 2")


@pytest.mark.parametrize("changes,key,fragment", [
    ({"num_query_heads": 32, "num_kv_heads": 5}, "model.num_kv_heads", "not a multiple"),
    ({"num_query_heads": 32, "num_kv_heads": 2}, "model.num_kv_heads", "GQA group of 16"),
    ({"head_dim": 96}, "model.head_dim", "(64, 128)"),
    ({"num_layers": 0}, "model.num_layers", ">= 1"),
    ({"kind": "onnx"}, "model.kind", "gguf-smollm2"),
    ({"path": None}, "model.path", "required"),
])
def test_impossible_model(tmp_path, changes, key, fragment):
    data = base()
    data["model"].update(changes)
    expect_error(tmp_path, data, key, fragment)


def test_impossible_workload_and_rule(tmp_path):
    data = base()
    data["workload"]["decode_steps"] = 0
    expect_error(tmp_path, data, "workload.decode_steps", ">= 1")
    data = base()
    data["cpu"]["num_layers"] = 33
    expect_error(tmp_path, data, "cpu.num_layers", "exceeds")
    data = base()
    data["rule"]["k_thresholds"] = [4, 8]
    expect_error(tmp_path, data, "rule.k_thresholds", "tier-8 gap")
    data = base()
    data["rule"]["topk"] = 0
    expect_error(tmp_path, data, "rule.topk", "1..1024")
    data = base()
    data["workload"]["prompts"] = ["  "]
    expect_error(tmp_path, data, "workload.prompts[0]", "empty")
    data = base()
    data["workload"]["seed"] = -1          # numpy's generators refuse it after the run began
    expect_error(tmp_path, data, "workload.seed", "in [0, 2^128), got -1")


@pytest.mark.skipif(not Path("/usr/share/common-licenses/GPL-3").is_file(),
                    reason="no Debian licence texts on this machine")
def test_unknown_corpus_text_names_the_key(tmp_path):
    data = base()
    data["workload"]["text"] = "NOPE-9"
    expect_error(tmp_path, data, "workload.text", "neither a file nor a licence")


def test_real_model_needs_prompts(tmp_path):
    data = yaml.safe_load((CONFIGS / "smollm2-135m.yaml").read_text())
    data["workload"]["prompts"] = []
    expect_error(tmp_path, data, "workload.prompts", "prompt")


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="empty"):
        load_config(write(tmp_path, ""))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    # a key given twice: PyYAML alone would keep the last one silently
    text = (CONFIGS / "llama7b.yaml").read_text().replace("model:\n", "model:\n  kind: gguf-smollm2\n", 1)
    with pytest.raises(ConfigError, match=r"(?s)not valid YAML.*found duplicate key 'kind'"):
        load_config(write(tmp_path, text))


def test_optional_sections_default():
    data = base()
    for section in ("cpu", "rule", "output"):
        del data[section]
    config = config_from_dict(data, "x.yaml")
    assert config.rule.to_rule() == AlignmentRule()
    assert config.cpu.num_layers is None
    assert config.reduced_for_cpu(runs_model=False)[1] == []


def test_reduced_for_cpu():
    config = load_config(CONFIGS / "smollm2-135m.yaml")
    reduced, changes = config.reduced_for_cpu(runs_model=True)
    assert reduced.workload.context_tokens == config.cpu.context_tokens
    assert len(reduced.workload.prompts) == config.cpu.num_prompts
    assert any(c.startswith("context_tokens") for c in changes)
    assert any(c.startswith("prompts") for c in changes)
    assert config.workload.context_tokens != reduced.workload.context_tokens  # frozen original
    llama = load_config(CONFIGS / "llama7b.yaml")
    _, changes = llama.reduced_for_cpu(runs_model=False)
    assert any(c.startswith("layers 32 → 4") for c in changes)
    assert not any(c.startswith("prompts") for c in changes)


def test_configs_are_frozen():
    config = load_config(CONFIGS / "llama7b.yaml")
    with pytest.raises(AttributeError):
        config.model.num_layers = 3


def test_run_command_reports_config_errors(tmp_path, capsys):
    data = copy.deepcopy(base())
    data["model"]["num_kv_heads"] = 5
    path = write(tmp_path, data)
    assert run.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "model.num_kv_heads" in err


def test_rule_by_name_and_named_defaults():
    """``rule: tuned`` picks the named rule; a mapping named after one takes its values for
    the keys it does not give; an unknown name is an error naming the key."""
    from akv_runtime.reference import TUNED_RULE
    base = yaml.safe_load(open(CONFIGS / "llama7b.yaml"))
    for rule in ("tuned", {"name": "tuned"}):
        data = copy.deepcopy(base)
        data["rule"] = rule
        assert config_from_dict(data).rule.to_rule() == TUNED_RULE
    data = copy.deepcopy(base)
    data["rule"] = {"name": "tuned", "v_skip": None, "k_thresholds": [10, 6]}
    got = config_from_dict(data).rule.to_rule()
    assert (got.v_skip, got.k_thresholds, got.v_thresholds) == (None, (10, 6), (8, 4))
    data["rule"] = "nope"
    with pytest.raises(ConfigError, match="rule: unknown named rule 'nope'"):
        config_from_dict(data)
    data["rule"] = {"name": "seed", "v_skip": 3}
    with pytest.raises(ConfigError, match="rule.v_skip"):
        config_from_dict(data)
    # a typo of a named rule is not run as the seed under the typo's label
    for typo in ({"name": "tunde"}, {"name": "sede", "k_thresholds": [8, 4], "topk": 32}):
        data["rule"] = typo
        with pytest.raises(ConfigError, match=f"rule.name: '{typo['name']}' is not a named rule"):
            config_from_dict(data)
    # a custom rule that gives both threshold pairs keeps its own name
    data["rule"] = {"name": "mine", "k_thresholds": [9, 4], "v_thresholds": [8, 5]}
    got = config_from_dict(data).rule.to_rule()
    assert (got.name, got.k_thresholds, got.v_thresholds) == ("mine", (9, 4), (8, 5))
