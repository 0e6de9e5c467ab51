"""Reproduce the embedded default model: a character tokenizer and a 24-layer Qwen3 pretrained on CPU.

The corpus is addition whose answers are right in a share `--correct-fraction` of samples and
carry-dropped otherwise (a common human error), so the base model holds the skill but does not
prefer it: held-out greedy accuracy lands between 10% and 60%, leaving room for RL to show.
Run: python -m sparselayer.data.make_default_model [--output DIR] [--steps N]
"""
from __future__ import annotations

import argparse
import math
import random
import string
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from ..tasks.arithmetic import ArithmeticTask, carryless_sum, format_answer, format_prompt, sample_pair
from . import DEFAULT_MODEL_DIR

PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"
CHARS = string.printable[:95] + "\n"  # digits, letters, punctuation, space, newline


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: every printable ASCII character is one token."""
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def build_model(vocab_size: int, eos_id: int, pad_id: int, seed: int) -> Qwen3ForCausalLM:
    """A random 24-layer, hidden-64 Qwen3 (about 1.5M parameters, 6 MB in float32)."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=24,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        tie_word_embeddings=True, rope_theta=10000.0, eos_token_id=eos_id, pad_token_id=pad_id,
        bos_token_id=None, torch_dtype="float32",
    )
    return Qwen3ForCausalLM(config)


def sample_batch(rng: random.Random, tok, batch: int, correct_fraction: float, max_value: int):
    """Token ids, attention mask and loss labels (completion tokens only) for one batch."""
    prompts, answers = [], []
    for _ in range(batch):
        a, b = sample_pair(rng, max_value, held_out=False)
        right = rng.random() < correct_fraction
        prompts.append(format_prompt(a, b))
        answers.append(format_answer(a + b if right else carryless_sum(a, b)))
    ids = [tok(p)["input_ids"] + tok(s)["input_ids"] + [tok.eos_token_id] for p, s in zip(prompts, answers)]
    width = max(map(len, ids))
    input_ids = torch.full((batch, width), tok.pad_token_id)
    labels = torch.full((batch, width), -100)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, (row, p) in enumerate(zip(ids, prompts)):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(p) : len(row)] = torch.tensor(row[len(p) :])
    return input_ids, mask, labels


@torch.no_grad()
def greedy_accuracy(model, tok, examples, max_new_tokens: int = 6) -> float:
    """Held-out greedy accuracy, batched (left padding)."""
    task, correct = ArithmeticTask(), 0
    for start in range(0, len(examples), 250):
        chunk = examples[start : start + 250]
        enc = tok([e.prompt for e in chunk], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(task.is_correct(t, e) for t, e in zip(texts, chunk))
    return correct / len(examples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--correct-fraction", type=float, default=0.35)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=250)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    tok = build_tokenizer()
    model = build_model(len(tok), tok.eos_token_id, tok.pad_token_id, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    rng, test = random.Random(args.seed), ArithmeticTask().test
    t0 = time.time()
    for step in range(1, args.steps + 1):
        input_ids, mask, labels = sample_batch(rng, tok, args.batch, args.correct_fraction, 999)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            acc = greedy_accuracy(model, tok, test[:250])
            model.train()
            print(f"step {step} loss {loss.item():.4f} held-out greedy acc {acc:.3f} ({time.time() - t0:.0f}s)",
                  flush=True)
    model.eval()
    print(f"final held-out greedy accuracy {greedy_accuracy(model, tok, test):.3f}")
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output, safe_serialization=True)
    tok.save_pretrained(args.output)
    print(f"saved to {args.output}")


if __name__ == "__main__":
    main()
