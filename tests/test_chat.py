"""Chat templates end to end: conversation prompts rendered once to the ids apply_chat_template gives, training
through hf and vLLM rollouts on those ids, evaluation on the same ids, prompts checked against the context, and
each bad input a one-line error."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import make_tiny_model
from test_dataset_task import cli_error, write_jsonl
from transformers import AutoTokenizer

from sparselayer import TrainConfig, Trainer
from sparselayer.batch import Rollouts
from sparselayer.cli import main
from sparselayer.errors import ConfigError, DataError
from sparselayer.evaluate import evaluate
from sparselayer.rollout.base import RolloutEngine
from sparselayer.rollout.hf import HFRolloutEngine
from sparselayer.tasks.base import Example
from sparselayer.tasks.chat import PromptRenderer, fit_to_context
from sparselayer.tasks.dataset import DatasetTask, dataset_task

# Qwen's template in shape (a header per message, the end-of-message token, the generation prompt, Qwen3's
# enable_thinking switch), with short markers: the tiny models' character tokenizer spells them out.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<' + message['role'] + '>' + message['content'] + eos_token + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<assistant>' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think></think>' }}{%- endif %}"
    "{%- endif %}"
)
QUICK = ["--max-steps", "2", "--prompts-per-step", "2", "--num-generations", "2", "--max-completion-length", "6",
         "--num-eval", "2", "--no-eval-at-start", "--no-progress", "--layers", "2"]


def with_chat_template(folder: Path, template: str = CHAT_TEMPLATE) -> Path:
    """Give a saved model folder's tokenizer a chat template (tokenizer_config.json)."""
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tiny random Qwen3 (4 layers, context 64) whose tokenizer carries CHAT_TEMPLATE."""
    return with_chat_template(make_tiny_model(tmp_path_factory.mktemp("chat") / "model"))


@pytest.fixture(scope="module")
def tokenizer(chat_model):
    return AutoTokenizer.from_pretrained(chat_model, local_files_only=True, padding_side="left")


def conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"{i}+{i % 3}="}]


def chat_rows(n: int = 8) -> list[dict]:
    return [{"prompt": conversation(i), "answer": str(i + i % 3), "level": i % 2} for i in range(n)]


def template_ids(tokenizer, messages, **kwargs) -> list[int]:
    """The reference: transformers' own tokenized chat template with the generation prompt."""
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False,
                                         **kwargs)


# ----------------------------------------------------------------------------- the renderer


def test_conversations_render_to_the_templates_ids(tokenizer):
    renderer = PromptRenderer(tokenizer)
    chats = [conversation(4), [{"role": "system", "content": "Add."}, *conversation(5)]]
    assert renderer.render(chats) == [template_ids(tokenizer, c) for c in chats]
    text = tokenizer.decode(renderer.render([conversation(4)])[0])
    assert text == "<user>4+1=<|endoftext|>\n<assistant>"
    assert renderer.render(["4+1="]) == [tokenizer("4+1=", add_special_tokens=False)["input_ids"]]  # text stays text


def test_system_prompt_and_template_kwargs(tokenizer):
    renderer = PromptRenderer(tokenizer, system_prompt="Be brief.", chat_template_kwargs='{"enable_thinking": false}')
    system = [{"role": "system", "content": "Be brief."}]
    assert renderer.render([conversation(1)]) == [template_ids(tokenizer, system + conversation(1),
                                                               enable_thinking=False)]
    own = [{"role": "system", "content": "Mine."}, *conversation(1)]  # a conversation's own system message stays
    assert renderer.render([own]) == [template_ids(tokenizer, own, enable_thinking=False)]
    assert tokenizer.decode(renderer.render([own])[0]).endswith("<assistant><think></think>")
    with pytest.raises(ConfigError, match="prompt 1: --system-prompt goes into conversation prompts"):
        renderer.render(["4+1="])


def test_template_file_renders_text_as_a_user_message(tmp_path, tokenizer):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}>"
                        "{% endif %}")
    renderer = PromptRenderer(tokenizer, str(template))
    assert renderer.render(["2+2=", conversation(2)]) == [tokenizer(t, add_special_tokens=False)["input_ids"]
                                                          for t in ("[2+2=]>", "[2+2=]>")]


def test_each_prompt_is_rendered_once(tokenizer):
    calls = []

    class Counting:
        chat_template = tokenizer.chat_template

        def apply_chat_template(self, *args, **kwargs):
            calls.append(args)
            return tokenizer.apply_chat_template(*args, **kwargs)

        def __call__(self, *args, **kwargs):
            return tokenizer(*args, **kwargs)

    renderer = PromptRenderer(Counting())
    first = renderer.render([conversation(1), conversation(2), conversation(1)])
    assert renderer.render([conversation(2), conversation(1)]) == [first[1], first[0]]
    assert len(calls) == 2


def test_renderer_errors_are_one_line(tmp_path, tokenizer):
    plain = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "plain"), local_files_only=True)
    with pytest.raises(ConfigError, match="chat.jsonl line 3 is a conversation, but the tokenizer of .* has no chat "
                                          "template: give one with --chat-template FILE"):
        PromptRenderer(plain).render([conversation(1)], ["chat.jsonl line 3"])
    with pytest.raises(ConfigError, match="--chat-template none renders none"):
        PromptRenderer(tokenizer, "none").render([conversation(1)])
    with pytest.raises(ConfigError, match="chat template file not found: absent.jinja"):
        PromptRenderer(tokenizer, "absent.jinja")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }}")
    with pytest.raises(ConfigError, match=r"prompt 1: .*broken.jinja failed: syntax error at line 1: "):
        PromptRenderer(tokenizer, str(broken)).render(["x"])
    with pytest.raises(DataError, match="prompt 1: message 1 of the conversation has role 'bot'"):
        PromptRenderer(tokenizer).render([[{"role": "bot", "content": "hi"}]])


# ----------------------------------------------------------------------------- engines and evaluation


def test_hf_engine_takes_token_ids_and_text(chat_model, tokenizer):
    from sparselayer.model.layout import load_model

    model = load_model(chat_model, "float32", "cpu")[0]
    engine = HFRolloutEngine(model, tokenizer)
    ids = template_ids(tokenizer, conversation(3))
    out = engine.generate([ids, "3+0="], 2, 4, seed=1)
    assert out.prompt_ids == [ids, ids] + [tokenizer("3+0=", add_special_tokens=False)["input_ids"]] * 2


class RecordingEngine(RolloutEngine):
    """Answers every prompt with EOS and remembers the prompts it was given."""

    def __init__(self, eos: int):
        self.eos, self.prompts = eos, []

    def generate(self, prompts, num_generations, max_new_tokens, temperature=1.0, top_p=1.0, seed=0, greedy=False):
        self.prompts.append(list(prompts))
        rows = [list(p) for p in prompts for _ in range(num_generations)]
        return Rollouts(prompt_ids=rows, completion_ids=[[self.eos] for _ in rows])

    def update_weights(self, named_tensors):
        return 0


def test_evaluate_sends_the_rendered_ids(tokenizer):
    task = dataset_task(chat_rows(4), eval_data=chat_rows(3))
    engine = RecordingEngine(tokenizer.eos_token_id)
    evaluate(engine, tokenizer, task, k=2)  # the tokenizer's template, by default
    assert engine.prompts[0] == engine.prompts[1] == [template_ids(tokenizer, e.prompt) for e in task.test]
    renderer = PromptRenderer(tokenizer, system_prompt="Sum.")
    evaluate(engine, tokenizer, task, k=0, renderer=renderer)
    system = [{"role": "system", "content": "Sum."}]
    assert engine.prompts[-1] == [template_ids(tokenizer, system + e.prompt) for e in task.test]


# ----------------------------------------------------------------------------- training


def expected_rows(tokenizer, examples: list[Example], n: int) -> list[list[int]]:
    return [template_ids(tokenizer, e.prompt) for e in examples for _ in range(n)]


def test_conversational_jsonl_trains_two_steps_with_hf(chat_model, tokenizer, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    out = tmp_path / "run"
    assert main(["train", "--model", str(chat_model), "--dataset", str(data), "--rollout", "hf",
                 "--output-dir", str(out), *QUICK]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    config = TrainConfig.from_mapping({"model": str(chat_model), "dataset": str(data), "rollout": "hf",
                                       "layers": "2", "max_completion_length": 6, "num_generations": 2,
                                       "prompts_per_step": 2, "output_dir": str(tmp_path / "r2"), "progress": False})
    trainer = Trainer(config)
    examples = trainer.next_examples()
    assert trainer.generate(examples).prompt_ids == expected_rows(tokenizer, examples, 2)


@pytest.mark.slow
def test_conversational_jsonl_trains_two_steps_with_vllm(vllm_engine, tmp_path):
    """On the session's vLLM engine: a copy of its model folder whose tokenizer has the template (vLLM gets ids)."""
    from safetensors.torch import load_file

    folder = with_chat_template(Path(shutil.copytree(vllm_engine.folder, tmp_path / "model")))
    vllm_engine.reload_all(load_file(folder / "model.safetensors").items())  # earlier tests pushed other weights
    loaded = dataset_task(write_jsonl(tmp_path / "chat.jsonl", chat_rows()))
    config = TrainConfig.from_mapping({
        "model": str(folder), "layers": "2", "rollout": "vllm", "max_completion_length": 6, "num_generations": 4,
        "prompts_per_step": 2, "learning_rate": 0.05, "max_steps": 2, "output_dir": str(tmp_path / "run"),
        "progress": False, "system_prompt": "Sum."})
    trainer = Trainer(config, task=DigitShare(loaded.name, loaded.train, loaded.test), engine=vllm_engine)
    tokenizer = trainer.tokenizer
    examples = trainer.next_examples()
    rollouts = trainer.generate(examples)
    system = [{"role": "system", "content": "Sum."}]
    assert rollouts.prompt_ids == [template_ids(tokenizer, system + e.prompt) for e in examples for _ in range(4)]
    assert all(len(c) == len(lp) for c, lp in zip(rollouts.completion_ids, rollouts.sampling_logprobs))
    layer_bytes = sum(p.numel() * 4 for p in trainer.trained.values())
    assert [trainer.step()["push_bytes"] for _ in range(2)] == [layer_bytes, layer_bytes]  # it learned, and pushed


class DigitShare(DatasetTask):
    """Reward: the share of digits in the completion, so a random model's completions differ within a group."""

    def reward(self, completion: str, example: Example) -> float:
        return sum(ch.isdigit() for ch in completion) / max(1, len(completion))


# ----------------------------------------------------------------------------- bad input through the CLI


def test_chat_errors_through_the_cli(capsys, tmp_path, tiny_model, chat_model):
    chats = write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    line = cli_error(capsys, ["train", "--model", tiny_model, "--dataset", chats, "--output-dir", tmp_path / "o1",
                              *QUICK])
    assert re.search(f"{chats} line [1-4] is a conversation, but the tokenizer of .* has no chat template", line)
    line = cli_error(capsys, ["train", "--model", chat_model, "--dataset", chats, "--chat-template",
                              tmp_path / "absent.jinja", "--output-dir", tmp_path / "o2", *QUICK])
    assert "chat template file not found" in line
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    line = cli_error(capsys, ["train", "--model", chat_model, "--dataset", chats, "--chat-template", broken,
                              "--output-dir", tmp_path / "o3", *QUICK])
    assert re.search(f"{chats} line [1-4]: {broken} failed: syntax error at line 2: ", line)
    refusing = tmp_path / "refusing.jinja"
    refusing.write_text("{{ raise_exception('this template takes no system messages') }}")
    line = cli_error(capsys, ["train", "--model", chat_model, "--dataset", chats, "--chat-template", refusing,
                              "--output-dir", tmp_path / "o4", *QUICK])
    assert "failed: TemplateError: this template takes no system messages" in line
    roles = write_jsonl(tmp_path / "roles.jsonl", [{"prompt": [{"role": "narrator", "content": "Once"}]}])
    line = cli_error(capsys, ["train", "--model", chat_model, "--dataset", roles, "--output-dir", tmp_path / "o5",
                              *QUICK])
    assert "line 1: message 1 of the conversation has role 'narrator': roles are system, user, assistant" in line


# ----------------------------------------------------------------------------- prompts against the context


def long_rows() -> list[dict]:
    """Short prompts and one (line 3) that leaves no room for a completion in the tiny model's 64 positions."""
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(6)]
    rows.insert(2, {"prompt": "9" * 60 + "+1=", "answer": "1" + "0" * 60})
    return rows


def test_long_prompt_was_accepted_and_is_now_one_line(capsys, tmp_path, chat_model, tokenizer):
    data = write_jsonl(tmp_path / "long.jsonl", long_rows())
    context = json.loads((chat_model / "config.json").read_text())["max_position_embeddings"]
    prompt = long_rows()[2]["prompt"]
    assert len(tokenizer(prompt)["input_ids"]) + 6 > context  # what nothing checked before: 63 + 6 > 64
    line = cli_error(capsys, ["train", "--model", chat_model, "--dataset", data, "--output-dir", tmp_path / "o1",
                              "--rollout", "hf", *QUICK])
    assert f"{data} line 3: the prompt is 63 tokens, which with --max-completion-length 6 exceeds the model's " \
           "context of 64 tokens" in line and "--drop-long-prompts" in line
    capsys.readouterr()
    out = tmp_path / "dropped"
    assert main(["train", "--model", str(chat_model), "--dataset", str(data), "--output-dir", str(out), "--rollout",
                 "hf", "--drop-long-prompts", *QUICK]) == 0
    err = capsys.readouterr().err
    assert re.search(r"sparselayer: dropped 1 of \d (training|held-out) prompts longer than 58 tokens", err), err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_max_model_len_and_dropping_in_python(tokenizer):
    rows = [Example("1+1=", "2", source="a"), Example("x" * 40, None, source="b"), Example("2+2=", "4")]
    task = DatasetTask("small", rows, [Example("y" * 50, None)])
    renderer = PromptRenderer(tokenizer)
    with pytest.raises(DataError, match="^b: the prompt is 40 tokens, which with --max-completion-length 8"):
        fit_to_context(task, renderer, 32, 8)
    kept = fit_to_context(task, renderer, 32, 8, drop=True)
    assert [e.prompt for e in kept.train] == ["1+1=", "2+2="] and not kept.test
    assert kept.name == "small" and kept.is_correct("\\boxed{2}", rows[0])
    assert fit_to_context(task, renderer, None, 8) is task and fit_to_context(task, renderer, 100, 8) is task
    with pytest.raises(ConfigError, match="--max-completion-length 64 leaves no room"):
        fit_to_context(task, renderer, 64, 64)
    with pytest.raises(DataError, match="every training prompt is longer than 2 tokens"):
        fit_to_context(task, renderer, 10, 8, drop=True)
