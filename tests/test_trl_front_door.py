"""sparselayer.trl: TRL's GRPOTrainer constructor and GRPOConfig over sparselayer's engine.

The field table covers every GRPOConfig field and is what docs/trl.md shows; refused fields refuse any
non-default value with one line; the mapping converts TRL's batch geometry and step units; callbacks see
TRL's events and can stop the run; the example differs from its pristine TRL twin only in the import and
`layers=`, trains as a script, and stops with one line on a setting sparselayer cannot honour.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

trl = pytest.importorskip("trl")

from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from sparselayer.config import TrainConfig  # noqa: E402
from sparselayer.data import DEFAULT_MODEL_DIR  # noqa: E402
from sparselayer.errors import ConfigError  # noqa: E402
from sparselayer.optim import lr_factor  # noqa: E402
from sparselayer.runs import RunDir  # noqa: E402
from sparselayer.trl import GRPOTrainer  # noqa: E402
from sparselayer.trl.fields import DOC, FIELDS, IGNORED, MAPS, REFUSED, with_table  # noqa: E402
from sparselayer.trl.mapping import field_default, settings_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE, ORIGINAL = ROOT / "examples" / "trl_grpo.py", ROOT / "tests" / "data" / "trl_grpo_original.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def grpo_config(tmp_path: Path, **fields) -> GRPOConfig:
    """A GRPOConfig that constructs on a CPU-only machine (TRL's bf16 default needs a GPU or use_cpu)."""
    return GRPOConfig(output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, **fields)


def addition_rows(n: int) -> list[dict]:
    return [{"prompt": f"{a:03d}+{a * 7 % 1000:03d}=", "answer": str(a + a * 7 % 1000)} for a in range(n)]


def exact_sum(completions, answer, **kwargs):
    return [1.0 if c.strip().isdigit() and int(c.strip()) == int(a) else 0.0 for c, a in zip(completions, answer)]


def small_args(tmp_path: Path, **fields) -> GRPOConfig:
    """A few quick steps on the embedded model: 4 prompts x 4 completions, 8 completion tokens."""
    base = {"per_device_train_batch_size": 16, "num_generations": 4, "max_completion_length": 8, "max_steps": 2,
            "learning_rate": 1e-3, "lr_scheduler_type": "constant", "disable_tqdm": True, "save_steps": 1}
    return grpo_config(tmp_path, **{**base, **fields})


# -- the table -------------------------------------------------------------------------------------------


def test_every_grpo_config_field_has_one_rule_in_trl_order():
    names = [f.name for f in dataclasses.fields(GRPOConfig)]
    assert list(FIELDS) == names
    assert {rule.kind for rule in FIELDS.values()} == {MAPS, REFUSED, IGNORED}
    assert all(rule.note.strip() for rule in FIELDS.values())


def test_docs_table_is_current():
    text = DOC.read_text()
    assert with_table(text) == text, "docs/trl.md's table is stale: run `python -m sparselayer.trl`"


def _other(default):
    """A value different from a field's default, of a plausible type."""
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + 1 if isinstance(default, int) else default + 0.5
    if isinstance(default, str):
        return default + "-other"
    if isinstance(default, (list, dict)):
        return ["other"] if isinstance(default, list) else {"other": 1}
    return 7  # None: a value where none was


REFUSED_FIELDS = [name for name, rule in FIELDS.items() if rule.kind == REFUSED]


@pytest.fixture(scope="module")
def base_args(tmp_path_factory):
    return grpo_config(tmp_path_factory.mktemp("grpo"))


@pytest.mark.parametrize("name", REFUSED_FIELDS)
def test_a_refused_field_refuses_any_non_default_value_by_name(base_args, name):
    default = field_default(next(f for f in dataclasses.fields(GRPOConfig) if f.name == name))
    settings_of(base_args, 100, has_eval=False)  # the defaults pass
    args = copy.copy(base_args)
    setattr(args, name, _other(default))
    with pytest.raises(ConfigError, match=rf"^GRPOConfig\.{name}=.* is not supported by sparselayer \(") as err:
        settings_of(args, 100, has_eval=False)
    assert "\n" not in str(err.value)


def test_a_field_unknown_to_the_table_is_refused_when_set(base_args):
    @dataclasses.dataclass
    class NewerConfig(GRPOConfig):
        brand_new_knob: float = 0.0

    args = copy.copy(base_args)
    args.__class__ = NewerConfig
    args.brand_new_knob = 0.0
    settings_of(args, 100, has_eval=False)
    args.brand_new_knob = 1.0
    with pytest.raises(ConfigError, match=r"GRPOConfig\.brand_new_knob=1\.0 .*TRL 1\.16"):
        settings_of(args, 100, has_eval=False)


# -- the mapping -----------------------------------------------------------------------------------------


def test_mapping_converts_geometry_units_and_settings(tmp_path):
    args = grpo_config(
        tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2, steps_per_generation=4,
        num_generations=4, num_iterations=2, max_steps=12, learning_rate=3e-4, lr_scheduler_type="cosine",
        warmup_steps=0.25, optim="adamw_8bit", beta=0.04, epsilon_high=0.28, loss_type="dr_grpo",
        scale_rewards="batch", importance_sampling_level="sequence", use_bias_correction_kl=False, temperature=0.7,
        top_p=0.9, max_completion_length=64, seed=5, use_vllm=True, vllm_mode="server", vllm_server_host="10.0.0.2",
        vllm_server_port=9000, vllm_gpu_memory_utilization=0.5, eval_strategy="steps", eval_steps=4,
        eval_on_start=True, save_steps=8, save_total_limit=3, logging_steps=4, log_completions=True,
        report_to="tensorboard", chat_template_kwargs={"enable_thinking": False}, reward_weights=[1.0, 0.5],
        gradient_checkpointing=False, model_init_kwargs={"dtype": "bfloat16", "attn_implementation": "eager"})
    values, cadence = settings_of(args, 40, has_eval=True)
    config = TrainConfig.from_mapping({**values, "reward": ["accuracy", "format"]}).validate()
    rl, ro, run, m = config.rl, config.rollout, config.run, config.model
    # generation batch 8 x 1 process x 4 = 32 completions = 8 prompts x 4; 4 / 2 = 2 optimizer steps per batch
    assert (rl.prompts_per_step, rl.num_generations, rl.steps_per_generation, rl.micro_batch_size) == (8, 4, 2, 8)
    assert cadence.optimizer_steps_per_batch == 4 and cadence.max_steps == 12 and run.max_steps == 3
    assert cadence.batches_per_epoch == 5 and cadence.logging_steps == 4
    assert (rl.learning_rate, rl.lr_scheduler_type, rl.warmup_steps, rl.optim) == (3e-4, "cosine", 3, "adamw8bit")
    assert (rl.beta, rl.epsilon_high, rl.loss_type, rl.scale_rewards) == (0.04, 0.28, "dr_grpo", "batch")
    assert rl.importance_sampling_level == "sequence" and rl.use_bias_correction_kl is False
    assert (ro.temperature, ro.top_p, ro.max_completion_length) == (0.7, 0.9, 64)
    assert ro.rollout_url == "http://10.0.0.2:9000" and ro.gpu_memory_utilization == 0.5
    assert (m.dtype, m.attn_implementation, m.device, m.gradient_checkpointing) == ("bfloat16", "eager", "cpu", False)
    assert (run.seed, run.eval_steps, run.eval_at_start, run.eval_at_end) == (5, 1, True, True)
    assert (run.save_steps, run.save_total_limit, run.log_completions, run.report_to) == (2, 3, 1, ["tensorboard"])
    assert json.loads(config.task.chat_template_kwargs) == {"enable_thinking": False}
    assert config.task.reward_weights == [1.0, 0.5]


def test_precision_rollout_and_epochs(tmp_path):
    values, cadence = settings_of(grpo_config(tmp_path, num_train_epochs=2.5, per_device_train_batch_size=8,
                                              num_generations=4, fp16=True, use_vllm=True), 21, has_eval=False)
    assert values["max_steps"] == math.ceil(2.5 * (21 // 2)) and cadence.max_steps == values["max_steps"]
    assert values["dtype"] == "float16" and values["rollout"] == "vllm" and values["eval_at_end"] is False
    values, _ = settings_of(grpo_config(tmp_path, max_steps=4, lr_scheduler_type="constant", warmup_steps=3), 10,
                            has_eval=False)
    assert values["rollout"] == "hf" and values["dtype"] == "float32"
    assert values["warmup_steps"] == 0  # transformers' "constant" has no warm-up


@pytest.mark.parametrize(("fields", "message"), [
    ({"per_device_train_batch_size": 4, "num_generations": 4, "steps_per_generation": 3,
      "gradient_accumulation_steps": 2},
     r"GRPOConfig\.steps_per_generation=3 .*gradient_accumulation_steps=2"),
    ({"num_iterations": 2, "max_steps": 5}, r"GRPOConfig\.max_steps=5 .*multiple of 2"),
    ({"lr_scheduler_type": "polynomial"}, r"GRPOConfig\.lr_scheduler_type='polynomial' .*constant"),
    ({"optim": "sgd"}, r"GRPOConfig\.optim='sgd'"),
    ({"report_to": "mlflow"}, r"GRPOConfig\.report_to=.*mlflow"),
    ({"max_grad_norm": 0.0}, r"GRPOConfig\.max_grad_norm=0\.0 .*clips"),
    ({"model_init_kwargs": {"device_map": "auto"}}, r"GRPOConfig\.model_init_kwargs=.*device_map"),
    ({"save_strategy": "best", "metric_for_best_model": "reward"}, r"GRPOConfig\.save_strategy='best'"),
    ({"logging_strategy": "epoch"}, r"GRPOConfig\.logging_strategy='epoch'"),
    ({"eval_strategy": "steps", "eval_steps": 5}, r"needs an eval_dataset"),
])
def test_what_cannot_be_honoured_is_one_line(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message) as err:
        settings_of(grpo_config(tmp_path, **fields), 100, has_eval=False)
    assert "\n" not in str(err.value)


def test_a_loss_type_sparselayer_lacks_is_refused(base_args):
    args = copy.copy(base_args)
    args.loss_type = "vespo"
    with pytest.raises(ConfigError, match=r"GRPOConfig\.loss_type='vespo' is not supported by sparselayer"):
        settings_of(args, 100, has_eval=False)


def test_lr_schedules_match_transformers_after_the_warmup():
    import torch
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    for kind, make in (("linear", get_linear_schedule_with_warmup), ("cosine", get_cosine_schedule_with_warmup)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        theirs = make(opt, 3, 20)
        for step in range(25):
            expected = theirs.lr_lambdas[0](step)
            ours = lr_factor(kind, step, 3, 20)
            assert ours == pytest.approx(expected if step >= 3 else (step + 1) / 3, abs=1e-12), (kind, step)
    assert [lr_factor("constant", s, 2, 10) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="--lr-scheduler-type must be one of"):
        TrainConfig.from_mapping({"lr_scheduler_type": "polynomial"}).validate()


# -- the trainer -----------------------------------------------------------------------------------------


def test_reward_funcs_a_model_id_is_refused_builtins_and_functions_pass(tmp_path):
    rows = addition_rows(20)
    with pytest.raises(ConfigError, match=r"'org/reward-model' is not a built-in reward .*reward model"):
        GRPOTrainer(str(DEFAULT_MODEL_DIR), "org/reward-model", small_args(tmp_path), rows)
    with pytest.raises(ConfigError, match="runs no reward models"):
        GRPOTrainer(str(DEFAULT_MODEL_DIR), [exact_sum, __import__("torch").nn.Linear(2, 1)], small_args(tmp_path),
                    rows)
    trainer = GRPOTrainer(str(DEFAULT_MODEL_DIR), [exact_sum, "accuracy"], small_args(tmp_path), rows)
    assert trainer.config.task.reward == [exact_sum, "accuracy"] and trainer.config.model.layers == "16"


def test_a_refused_field_raises_config_error_in_python(tmp_path):
    with pytest.raises(ConfigError, match=r"^GRPOConfig\.top_entropy_quantile=0\.2 is not supported by sparselayer"):
        GRPOTrainer(str(DEFAULT_MODEL_DIR), exact_sum, small_args(tmp_path, top_entropy_quantile=0.2),
                    addition_rows(20))


class Recorder(TrainerCallback):
    """Records the events it sees; stops the run once global_step reaches `stop_at`."""

    def __init__(self, stop_at: int | None = None):
        self.events, self.stop_at = [], stop_at

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append(("begin", state.global_step))

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(("step", state.global_step))
        if self.stop_at is not None and state.global_step >= self.stop_at:
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append(("log", state.global_step, dict(logs)))

    def on_train_end(self, args, state, control, **kwargs):
        self.events.append(("end", state.global_step))


def test_callbacks_see_trl_events_and_can_stop_the_run_on_a_checkpoint(tmp_path):
    """num_iterations 2: each rollout batch is 2 optimizer steps; a stop at global_step 4 ends after batch 2 of 5,
    on a checkpoint, and resume_from_checkpoint=True continues to the end."""
    recorder = Recorder(stop_at=4)
    args = small_args(tmp_path, num_iterations=2, max_steps=10, save_steps=6, logging_steps=2)
    trainer = GRPOTrainer(str(DEFAULT_MODEL_DIR), exact_sum, args, addition_rows(40), callbacks=[recorder])
    out = trainer.train()
    kinds = [e[0] for e in recorder.events]
    assert kinds[0] == "begin" and kinds[-1] == "end"
    assert [e[1] for e in recorder.events if e[0] == "step"] == [2, 4]
    logs = [e for e in recorder.events if e[0] == "log"]
    assert [e[1] for e in logs] == [2, 4, 4]  # every logging_steps=2 optimizer steps, then the final metrics
    assert {"reward", "loss", "learning_rate", "completions/mean_length"} <= logs[0][2].keys()
    assert logs[-1][2]["train_loss"] == pytest.approx(out.training_loss)
    assert out.global_step == 4 and trainer.summary["steps"] == 2
    run = RunDir(args.output_dir)
    assert run.checkpoint_steps() == [2]  # save_steps 6 optimizer steps = 3 batches: the stop wrote step 2
    assert [r["step"] for r in run.read_metrics()] == [1, 2]

    resumed = Recorder()
    again = GRPOTrainer(str(DEFAULT_MODEL_DIR), exact_sum, args, addition_rows(40), callbacks=[resumed])
    out = again.train(resume_from_checkpoint=True)
    assert [e[1] for e in resumed.events if e[0] == "step"] == [6, 8, 10]
    assert out.global_step == 10 and again.summary["steps"] == 5
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4, 5]


def test_a_loaded_model_and_its_tokenizer_train(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    args = small_args(tmp_path, max_steps=1)
    trainer = GRPOTrainer(model, exact_sum, args, addition_rows(20), processing_class=tokenizer, layers="-1")
    out = trainer.train()
    folder = Path(args.output_dir) / "base-model"
    assert trainer.config.model.model == str(folder) and (folder / "model.safetensors").is_file()
    assert out.global_step == 1 and RunDir(args.output_dir).checkpoint_steps() == [1]


def test_a_tokenizer_that_disagrees_with_the_model_folder_is_refused(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ConfigError, match="chat template differs"):
        GRPOTrainer(str(DEFAULT_MODEL_DIR), exact_sum, small_args(tmp_path), addition_rows(20),
                    processing_class=tokenizer)


def test_a_sparselayer_train_config_is_accepted_as_args(tmp_path):
    config = TrainConfig.from_mapping({"prompts_per_step": 2, "num_generations": 4, "max_steps": 1, "progress": False,
                                       "learning_rate": 1e-3, "rollout": "hf", "eval_at_start": False,
                                       "eval_at_end": False, "max_completion_length": 8,
                                       "output_dir": str(tmp_path / "run")})
    trainer = GRPOTrainer(str(DEFAULT_MODEL_DIR), exact_sum, config, addition_rows(20), layers="12")
    out = trainer.train()
    assert trainer.config.model.layers == "12" and config.model.layers == "16"  # the caller's config is untouched
    assert out.global_step == 1 and out.metrics["train_steps_per_second"] > 0


# -- the example -----------------------------------------------------------------------------------------


def test_the_example_differs_from_plain_trl_only_in_the_import_and_layers():
    ours, theirs = EXAMPLE.read_text().splitlines(), ORIGINAL.read_text().splitlines()
    changes = [line for line in difflib.ndiff(theirs, ours) if line[:2] in ("- ", "+ ")]
    assert changes == ["- from trl import GRPOTrainer", "+ from sparselayer.trl import GRPOTrainer",
                       '+         layers="16",']


def _run_example(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), "--model_name_or_path", str(DEFAULT_MODEL_DIR), *flags],
                          env=ENV, capture_output=True, text=True, timeout=600)


def test_the_example_trains_as_a_script(tmp_path):
    out = tmp_path / "run"
    done = _run_example("--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "16",
                        "--num_generations", "4", "--num_prompts", "64", "--disable_tqdm", "true")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained 2 steps" in done.stdout
    run = RunDir(out)
    lines = run.read_metrics()
    assert [r["step"] for r in lines] == [1, 2] and all(math.isfinite(r["reward_mean"]) for r in lines)
    assert run.checkpoint_steps() == [2]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()  # trainer.save_model
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_the_pristine_twin_is_a_working_trl_script(tmp_path):
    """The comparison means something only if the original runs under TRL itself (a few steps, CPU)."""
    out = tmp_path / "trl-run"
    done = subprocess.run([sys.executable, str(ORIGINAL), "--model_name_or_path", str(DEFAULT_MODEL_DIR),
                           "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "16",
                           "--num_generations", "4", "--num_prompts", "32", "--disable_tqdm", "true"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained 1 steps" in done.stdout and (out / "model.safetensors").is_file()


def test_the_example_stops_with_one_line_on_a_field_sparselayer_cannot_honour(tmp_path):
    done = _run_example("--output_dir", str(tmp_path / "run"), "--top_entropy_quantile", "0.2")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "sparselayer: error: GRPOConfig.top_entropy_quantile=0.2 is not supported by sparselayer "
        f"({FIELDS['top_entropy_quantile'].note})"]


def test_importing_sparselayer_does_not_import_trl():
    done = subprocess.run([sys.executable, "-c", "import sys, sparselayer, sparselayer.trl; "
                                                 "assert 'trl' not in sys.modules, 'trl was imported'"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_without_trl_a_grpo_config_is_one_clear_line(monkeypatch, tmp_path):
    import sparselayer.trl as front_door

    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now fails as if it were not installed
    with pytest.raises(ConfigError, match=r"needs TRL for GRPOConfig: pip install 'sparselayer\[trl\]'"):
        GRPOTrainer(str(DEFAULT_MODEL_DIR), exact_sum, None, addition_rows(20))
    with pytest.raises(ConfigError, match="needs TRL"):
        front_door.GRPOConfig  # noqa: B018
