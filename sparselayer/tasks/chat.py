"""Prompt rendering: every prompt becomes the token ids the model samples from, once, the same for every engine.

A conversation prompt (TRL's conversational format: a list of {"role", "content"} messages) goes through
a chat template with the generation prompt added: its ids are exactly those of
`tokenizer.apply_chat_template(messages, add_generation_prompt=True, **chat_template_kwargs)`. A text
prompt is tokenized as it is (no special tokens), unless a template file is given (--chat-template
FILE), which renders every prompt, a text one as a single user message. The trainer renders each
prompt once (`PromptRenderer` keeps the ids), and hands the ids to the rollout engine, so the trainer,
vLLM and a remote server all see the same tokens; evaluation renders through the same object.

`fit_to_context` checks every prompt against the model's context: prompt tokens plus the longest
completion must fit, else a one-line DataError naming the row, or (--drop-long-prompts) the prompt
is left out with a count on stderr.
"""
from __future__ import annotations

import json
import sys
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2

from ..errors import ConfigError, DataError, first_line
from .base import Example, ListTask, Prompt, Task

ROLES = ("system", "user", "assistant", "tool")  # the roles chat templates of Qwen, Llama and TRL's data know
TEMPLATE_MODES = ("auto", "none")  # --chat-template besides a file path
TOKENIZE_CHUNK = 1024  # prompts per batched tokenizer call


def is_conversation(prompt: Prompt) -> bool:
    """Whether a prompt is a conversation (a list of messages) rather than text."""
    return not isinstance(prompt, str)


def conversation_problem(messages: Any) -> str | None:
    """What is wrong with a conversation prompt (one line), or None when it is a valid one."""
    if not isinstance(messages, (list, tuple)):
        return f"a prompt must be text or a list of {{role, content}} messages, got {type(messages).__name__}"
    if not messages:
        return "empty conversation (a prompt needs at least one message)"
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, Mapping):
            return f"message {number} of the conversation must be a {{role, content}} object, " \
                   f"got {type(message).__name__}"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"message {number} of the conversation has role {role!r}: roles are {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"message {number} of the conversation ({role}) must have text 'content', " \
                   f"got {type(content).__name__}"
    return None


def plain_conversation(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A conversation as plain dicts without None-valued keys (Arrow fills a struct's missing fields with None,
    which a template would take for values that are present)."""
    return [{k: v for k, v in message.items() if v is not None} for message in messages]


def parse_template_kwargs(value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """--chat-template-kwargs as a dict: a JSON object's text, a mapping, or nothing."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise ConfigError("--chat-template-kwargs must be a JSON object, e.g. '{\"enable_thinking\": false}'")
    return parsed


def read_template(spec: str) -> str:
    """The text of a --chat-template FILE (a ConfigError when it is missing or unreadable)."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"chat template file not found: {spec} (--chat-template takes auto, none or a Jinja file)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read chat template file {spec}: {first_line(e)}") from None
    if not text.strip():
        raise ConfigError(f"chat template file {spec} is empty")
    return text



def _template_failure(e: Exception) -> str:
    """A template's exception as one line: Jinja syntax errors with their line number."""
    if isinstance(e, jinja2.TemplateSyntaxError):
        return f"syntax error at line {e.lineno}: {first_line(e.message)}"
    message = first_line(e)
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


class PromptRenderer:
    """Turns prompts into token ids once, by the chat-template settings; keeps the ids of every prompt seen.

    chat_template: "auto" (the tokenizer's template renders conversations; text stays text), "none"
    (no template: conversations are an error), or a Jinja file that renders every prompt.
    """

    def __init__(self, tokenizer, chat_template: str = "auto", system_prompt: str | None = None,
                 chat_template_kwargs: str | Mapping[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.mode = chat_template if chat_template in TEMPLATE_MODES else "file"
        self.template = read_template(chat_template) if self.mode == "file" else None
        self.template_name = chat_template if self.mode == "file" else "the tokenizer's chat template"
        self.system_prompt = system_prompt
        self.kwargs = parse_template_kwargs(chat_template_kwargs)
        if system_prompt is not None and self.mode == "none":
            raise ConfigError("--system-prompt is a message of a conversation: it needs a chat template, "
                              "not --chat-template none")
        self._ids: dict[str | tuple[str], array] = {}

    @classmethod
    def from_config(cls, tokenizer, task_config) -> PromptRenderer:
        """The renderer of a TaskConfig's chat_template, system_prompt and chat_template_kwargs."""
        return cls(tokenizer, task_config.chat_template, task_config.system_prompt, task_config.chat_template_kwargs)

    def token_ids(self, examples: Sequence[Example]) -> list[list[int]]:
        """The prompt ids of each example (rendered now unless seen before)."""
        return self.render([e.prompt for e in examples], [e.source for e in examples])

    def render(self, prompts: Sequence[Prompt], wheres: Sequence[str] | None = None) -> list[list[int]]:
        """Token ids of each prompt; `wheres` name the prompts in errors (default: "prompt i")."""
        wheres = [w or f"prompt {i}" for i, w in enumerate(wheres or [""] * len(prompts), start=1)]
        keys = [self._key(p) for p in prompts]
        todo: dict[str | tuple[str], str] = {}
        for prompt, key, where in zip(prompts, keys, wheres):
            if key not in self._ids and key not in todo:
                todo[key] = self._text(prompt, where)
        self._tokenize(todo)
        return [self._ids[key].tolist() for key in keys]

    def _tokenize(self, texts: dict[str | tuple[str], str]) -> None:
        """Tokenize rendered texts in batches, as apply_chat_template(tokenize=True) does: no special tokens added."""
        items = list(texts.items())
        for start in range(0, len(items), TOKENIZE_CHUNK):
            chunk = items[start : start + TOKENIZE_CHUNK]
            ids = self.tokenizer([text for _, text in chunk], add_special_tokens=False)["input_ids"]
            for (key, _), row in zip(chunk, ids):
                self._ids[key] = array("i", row)  # 4 bytes a token: every prompt's ids stay for the run

    @staticmethod
    def _key(prompt: Prompt) -> str | tuple[str]:
        """Cache key of a prompt: its text itself (no copy), or its messages as canonical JSON in a tuple."""
        if isinstance(prompt, str):
            return prompt
        return (json.dumps(list(prompt), sort_keys=True, ensure_ascii=False, default=str),)

    def _text(self, prompt: Prompt, where: str) -> str:
        """The text a prompt is tokenized from: text as it is, or the rendered template."""
        if not is_conversation(prompt) and self.mode != "file":
            if self.system_prompt is not None:
                raise ConfigError(f"{where}: --system-prompt goes into conversation prompts, but this prompt is "
                                  "text: give conversation prompts or --chat-template FILE (renders text as a user "
                                  "message)")
            return prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        problem = conversation_problem(messages)
        if problem:
            raise DataError(f"{where}: {problem}")
        return self._apply(self._with_system(plain_conversation(messages)), where)

    def _with_system(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation with --system-prompt in front, unless it has a system message already."""
        if self.system_prompt is None or any(m["role"] == "system" for m in messages):
            return messages
        return [{"role": "system", "content": self.system_prompt}, *messages]

    def _apply(self, messages: list[dict[str, Any]], where: str) -> str:
        """The conversation through the chat template, generation prompt added."""
        if self.mode == "none":
            raise ConfigError(f"{where} is a conversation, but --chat-template none renders none: "
                              "use --chat-template auto or a template file")
        if self.template is None and not self.tokenizer.chat_template:
            name = getattr(self.tokenizer, "name_or_path", "") or "the model"
            raise ConfigError(f"{where} is a conversation, but the tokenizer of {name} has no chat template: "
                              "give one with --chat-template FILE")
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=True, **self.kwargs)
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError) as e:
            raise ConfigError(f"{where}: {self.template_name} failed: {_template_failure(e)}") from None


class PromptSubset(ListTask):
    """A task with some of its prompts left out (those too long for the model's context); the rest is its own."""

    def __init__(self, task: Task, train: Sequence[Example], test: Sequence[Example]):
        super().__init__(task.name, train, test)
        self.task = task
        self.suggested_max_completion_length = task.suggested_max_completion_length

    def is_correct(self, completion: str, example: Example) -> bool:
        return self.task.is_correct(completion, example)

    def reward(self, completion: str, example: Example) -> float:
        return self.task.reward(completion, example)

    def rewards(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        return self.task.rewards(completions, examples)

    def __getattr__(self, name: str) -> Any:
        """Anything else the wrapped task offers (a user task's own attributes)."""
        if name == "task":
            raise AttributeError(name)
        return getattr(self.task, name)


def fit_to_context(task: Task, renderer: PromptRenderer, context: int | None, max_completion_length: int,
                   drop: bool = False) -> Task:
    """Render every prompt of `task` once; one whose tokens + max_completion_length exceed `context` (None: no
    limit) is a DataError naming its row, or, with `drop`, left out (a count on stderr). Returns `task` itself
    when nothing is left out."""
    if context is not None and max_completion_length >= context:
        raise ConfigError(f"--max-completion-length {max_completion_length} leaves no room for a prompt in the "
                          f"model's context of {context} tokens (--max-model-len, else max_position_embeddings)")
    budget = None if context is None else context - max_completion_length
    kept = {}
    for split, examples in (("training", list(task.train)), ("held-out", list(task.test))):
        wheres = [e.source or f"{split} prompt {i}" for i, e in enumerate(examples, start=1)]
        lengths = [len(ids) for ids in renderer.render([e.prompt for e in examples], wheres)]
        too_long = [i for i, n in enumerate(lengths) if budget is not None and n > budget]
        if too_long and not drop:
            i = too_long[0]
            raise DataError(f"{wheres[i]}: the prompt is {lengths[i]} tokens, which with --max-completion-length "
                            f"{max_completion_length} exceeds the model's context of {context} tokens: shorten it, "
                            "lower --max-completion-length, or pass --drop-long-prompts to leave such prompts out")
        skip = set(too_long)
        kept[split] = ([e for i, e in enumerate(examples) if i not in skip], len(skip), len(examples))
    if not any(dropped for _, dropped, _ in kept.values()):
        return task
    _report_drops(kept, budget, context)
    if not kept["training"][0]:
        raise DataError(f"every training prompt is longer than {budget} tokens (the model's context of {context} "
                        f"less --max-completion-length {max_completion_length}): nothing is left to train on")
    return PromptSubset(task, kept["training"][0], kept["held-out"][0])


def _report_drops(kept: dict[str, tuple[list, int, int]], budget: int, context: int) -> None:
    """One stderr line counting the prompts --drop-long-prompts left out."""
    counts = " and ".join(f"{dropped} of {total} {split} prompts" for split, (_, dropped, total) in kept.items()
                          if dropped)
    print(f"sparselayer: dropped {counts} longer than {budget} tokens (the model's context of {context} less "
          "--max-completion-length; --drop-long-prompts)", file=sys.stderr)
