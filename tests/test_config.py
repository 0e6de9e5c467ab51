"""TrainConfig: defaults, flat/dashed/sectioned mappings, YAML round trip, CLI precedence, layer specs, freezing."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from sparselayer.cli import EMBEDDED_RECIPE, build_parser, resolve_train_config
from sparselayer.config import SECTIONS, TrainConfig
from sparselayer.errors import ConfigError
from sparselayer.model.layout import freeze_except, load_model, parse_layers


def resolve(*argv) -> TrainConfig:
    return resolve_train_config(build_parser().parse_args(["train", *map(str, argv)]))


# ----------------------------------------------------------------------------- TrainConfig


def test_defaults_validate():
    cfg = TrainConfig()
    assert cfg.validate() is cfg
    assert (cfg.model.layers, cfg.rl.loss_type, cfg.rl.scale_rewards) == ("16", "dapo", "group")
    assert (cfg.rl.num_generations, cfg.rl.learning_rate, cfg.run.max_steps) == (8, 1e-5, 100)
    assert set(cfg.to_dict()) == set(SECTIONS)


def test_field_names_are_unique_across_sections():
    """Flat keys are routed to their section by name, so no two sections may share one."""
    names = [f.name for kind in SECTIONS.values() for f in dataclasses.fields(kind)]
    assert len(names) == len(set(names))


def test_from_mapping_flat_keys_are_coerced():
    cfg = TrainConfig.from_mapping({"learning_rate": "3e-4", "num_generations": "4", "max_steps": 7.0,
                                    "eval_at_start": "false", "model": "/m", "layers": 12, "epsilon_high": None})
    assert cfg.rl.learning_rate == 3e-4 and isinstance(cfg.rl.learning_rate, float)
    assert cfg.rl.num_generations == 4 and cfg.run.max_steps == 7 and isinstance(cfg.run.max_steps, int)
    assert cfg.run.eval_at_start is False
    assert cfg.model.model == "/m" and cfg.model.layers == "12"
    assert cfg.rl.epsilon_high is None
    # everything not given keeps its default
    assert cfg.rl.beta == TrainConfig().rl.beta and cfg.task == TrainConfig().task


def test_from_mapping_dashed_keys():
    cfg = TrainConfig.from_mapping({"learning-rate": 0.002, "num-generations": 3, "max-completion-length": 12})
    assert (cfg.rl.learning_rate, cfg.rl.num_generations, cfg.rollout.max_completion_length) == (0.002, 3, 12)


def test_from_mapping_sectioned():
    cfg = TrainConfig.from_mapping({"rl": {"learning_rate": 0.01, "loss-type": "grpo"},
                                    "run": {"max_steps": 3, "seed": 5},
                                    "model": {"model": "/some/model", "layers": "-1"}})
    assert (cfg.rl.learning_rate, cfg.rl.loss_type) == (0.01, "grpo")
    assert (cfg.run.max_steps, cfg.run.seed) == (3, 5)
    assert (cfg.model.model, cfg.model.layers) == ("/some/model", "-1")


def test_from_mapping_overlays_base_without_mutating_it():
    base = TrainConfig.from_mapping({"learning_rate": 0.5, "max_steps": 9})
    cfg = TrainConfig.from_mapping({"max_steps": 2}, base)
    assert (cfg.rl.learning_rate, cfg.run.max_steps) == (0.5, 2)
    assert base.run.max_steps == 9, "the base config must not be modified"


@pytest.mark.parametrize("values, fragment", [
    ({"learning_rat": 1.0}, "unknown setting 'learning_rat'"),
    ({"max_steps": "ten"}, "'max_steps' expects int"),
    ({"max_steps": 2.5}, "'max_steps' expects int"),
    ({"eval_at_end": "maybe"}, "'eval_at_end' expects bool"),
    ({"learning_rate": None}, "cannot be empty"),
])
def test_from_mapping_rejects_bad_values(values, fragment):
    with pytest.raises(ConfigError, match=fragment):
        TrainConfig.from_mapping(values)


@pytest.mark.parametrize("value, expected", [
    (True, "group"), (False, "none"), ("true", "group"), ("false", "none"), ("batch", "batch"), ("none", "none")])
def test_scale_rewards_booleans(value, expected):
    assert TrainConfig.from_mapping({"scale_rewards": value}).validate().rl.scale_rewards == expected


@pytest.mark.parametrize("flag, expected", [("true", "group"), ("false", "none"), ("batch", "batch")])
def test_scale_rewards_flag(flag, expected):
    assert resolve("--model", "/m", "--scale-rewards", flag).rl.scale_rewards == expected


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig.from_mapping({"model": "/a/model", "layers": "10,16", "dtype": "bfloat16", "task": "arithmetic",
                                    "learning_rate": 2.5e-4, "beta": 0.04, "epsilon_high": 0.28,
                                    "scale_rewards": "none", "loss_type": "dr_grpo", "max_completion_length": 64,
                                    "temperature": 0.7, "output_dir": "runs/x", "max_steps": 3, "progress": False})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    back = TrainConfig.from_yaml(path)
    assert back == cfg
    assert back != TrainConfig(), "the round trip must carry the non-default values"
    assert back.rl.epsilon_high == 0.28 and back.model.layers == "10,16" and back.run.progress is False


def test_from_yaml_flat_file_over_base(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("learning-rate: 0.03\nrl:\n  num_generations: 6\n")
    base = TrainConfig.from_mapping({"max_steps": 11, "learning_rate": 0.9})
    cfg = TrainConfig.from_yaml(path, base)
    assert (cfg.rl.learning_rate, cfg.rl.num_generations, cfg.run.max_steps) == (0.03, 6, 11)


# ----------------------------------------------------------------------------- CLI resolution


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": {"model": "/from/yaml", "layers": "2"},
                                    "rl": {"learning_rate": 0.5, "num_generations": 4},
                                    "run": {"max_steps": 7}}))
    cfg = resolve("--config", path, "--learning-rate", "0.25", "--model", "/from/flag", "--no-progress")
    assert cfg.rl.learning_rate == 0.25  # flag wins
    assert cfg.model.model == "/from/flag"  # flag wins
    assert cfg.rl.num_generations == 4 and cfg.run.max_steps == 7 and cfg.model.layers == "2"  # YAML kept
    assert cfg.run.progress is False
    assert cfg.rl.loss_type == TrainConfig().rl.loss_type  # neither: default


def test_layer_flag_maps_to_layers():
    assert resolve("--model", "/m", "--layer", "16").model.layers == "16"
    assert resolve("--model", "/m", "--layer", "-1").model.layers == "-1"
    assert resolve("--model", "/m", "--layers", "14-18").model.layers == "14-18"


def test_layer_and_layers_conflict():
    with pytest.raises(ConfigError, match="--layer and --layers conflict"):
        resolve("--model", "/m", "--layer", "1", "--layers", "2")


def test_resolve_validates():
    with pytest.raises(ConfigError, match="--num-generations"):
        resolve("--model", "/m", "--num-generations", "1")


def _recipe() -> dict:
    recipe = yaml.safe_load(EMBEDDED_RECIPE.read_text())
    assert isinstance(recipe, dict) and recipe
    return recipe


def test_embedded_recipe_applied_without_model():
    recipe = _recipe()
    cfg = resolve()
    assert cfg.model.model is None
    assert cfg == TrainConfig.from_mapping(recipe)
    assert cfg.rl.learning_rate == recipe["learning_rate"] != TrainConfig().rl.learning_rate
    # flags still win over the recipe
    assert resolve("--learning-rate", "0.02").rl.learning_rate == 0.02
    assert resolve("--max-steps", "5").rl.learning_rate == recipe["learning_rate"]


def test_embedded_recipe_not_applied_with_model(tiny_model):
    cfg = resolve("--model", tiny_model)
    assert cfg.model.model == str(tiny_model)
    assert cfg.rl.learning_rate == TrainConfig().rl.learning_rate != _recipe()["learning_rate"]
    assert dataclasses.replace(cfg, model=TrainConfig().model) == TrainConfig()


def test_embedded_recipe_not_applied_with_model_in_yaml(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model: /from/yaml\nmax_steps: 3\n")
    cfg = resolve("--config", path)
    assert cfg.model.model == "/from/yaml" and cfg.run.max_steps == 3
    assert cfg.rl.learning_rate == TrainConfig().rl.learning_rate


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("spec, expected", [
    ("16", [16]), ("-1", [27]), ("-28", [0]), ("14-18", [14, 15, 16, 17, 18]), ("10,16", [10, 16]),
    (" 10 , 16 ", [10, 16]), ("all", None), ("ALL", None),
    ("16,10,16", [10, 16]), ("14-16,15,-1,27", [14, 15, 16, 27]), ("3-3", [3]),
])
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 28) == expected


@pytest.mark.parametrize("spec, fragment", [
    ("28", "out of range"), ("-29", "out of range"), ("18-14", "not a layer list"), ("abc", "not a layer list"),
    ("1.5", "not a layer list"), (",", "empty"),
])
def test_parse_layers_rejects(spec, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_layers(spec, 28)


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model):
    model, _ = load_model(tiny_model, device="cpu")
    return model


def test_freeze_except_one_layer(tiny_loaded):
    model = tiny_loaded
    trained = freeze_except(model, [2])
    expected = {n for n, _ in model.named_parameters() if n.startswith("model.layers.2.")}
    assert expected and set(trained) == expected
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads == expected
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("model.layers.1.") for n in frozen) and any("embed" in n for n in frozen)
    assert all(trained[n] is p for n, p in model.named_parameters() if n in trained)
    # only the trained layer gets gradients from a backward pass
    ids = torch.tensor([[1, 2, 3, 4]])
    model.zero_grad(set_to_none=True)
    model(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None for p in trained.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trained)
    model.zero_grad(set_to_none=True)


def test_freeze_except_two_layers_then_all(tiny_loaded):
    model = tiny_loaded
    names = [n for n, _ in model.named_parameters()]
    trained = freeze_except(model, [0, 3])
    assert set(trained) == {n for n in names if n.startswith(("model.layers.0.", "model.layers.3."))}
    trained_all = freeze_except(model, None)
    assert set(trained_all) == set(names)
    assert all(p.requires_grad for p in model.parameters())
