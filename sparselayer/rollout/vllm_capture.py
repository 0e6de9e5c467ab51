"""Capture inside an in-process vLLM: a hook in the worker, and the assembly of what it saw into rows.

A forward pre-hook on decoder layer K of the worker's model receives (positions, hidden_states, residual);
the residual stream entering the layer is hidden_states + residual (hidden_states alone at layer 0, where
residual is None). Each forward's tokens belong to the requests in the order of
`model_runner.input_batch.req_ids`, split by `model_runner.query_start_loc` (its first num_reqs + 1 entries).

With n samples per prompt vLLM names the child requests "{index}_{parent id}" (plus "-{random suffix}"),
and with prefix caching a position computed once serves every request whose tokens up to it are the same
(a group's prompt is computed in one child; a shared system prompt in one prompt's request). So the states
are keyed by the token prefix they belong to (a running hash), and each row takes its positions from
wherever they were computed. The engine resets vLLM's prefix cache before a capturing call, so that no
position comes from an earlier call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..batch import CapturedStates
from .capture import CaptureSpec, StatePlacer

ATTRIBUTE = "_sparselayer_capture"  # where the recorder lives on vLLM's worker


@dataclass
class Chunk:
    """What one forward fed layer K: its requests (vLLM's ids), their token offsets, positions and states."""

    req_ids: list[str]
    starts: list[int]  # query_start_loc[: num_reqs + 1]
    positions: list[int]
    states: torch.Tensor  # tokens x H, in the trainer's dtype


@dataclass
class Recorder:
    """The forward pre-hook on layer K inside the worker; records only while `active`."""

    runner: Any
    layer: int
    dtype: torch.dtype
    active: bool = False
    chunks: list[Chunk] = field(default_factory=list)
    handle: Any = None

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.active:
            return
        bound = dict(zip(("positions", "hidden_states", "residual"), args)) | kwargs
        batch = self.runner.input_batch
        num = batch.num_reqs
        starts = self.runner.query_start_loc.cpu[: num + 1].tolist()
        hidden, residual = bound["hidden_states"], bound.get("residual")
        stream = hidden if residual is None else hidden + residual
        tokens = starts[-1]  # a forward may be padded beyond its scheduled tokens
        self.chunks.append(Chunk(list(batch.req_ids[:num]), starts, bound["positions"][:tokens].tolist(),
                                 stream[:tokens].to(self.dtype, copy=True)))


def install(worker, layer: int, dtype: torch.dtype) -> None:
    """(On the worker.) Hook decoder layer `layer` of the model, replacing an earlier hook."""
    old = getattr(worker, ATTRIBUTE, None)
    if old is not None:
        old.handle.remove()
    runner = worker.model_runner
    recorder = Recorder(runner, layer, dtype)
    recorder.handle = runner.get_model().model.layers[layer].register_forward_pre_hook(recorder, with_kwargs=True)
    setattr(worker, ATTRIBUTE, recorder)


def start(worker) -> None:
    """(On the worker.) Record from now on, from an empty record."""
    recorder = getattr(worker, ATTRIBUTE)
    recorder.chunks, recorder.active = [], True


def stop(worker) -> list[Chunk]:
    """(On the worker.) Stop recording; return (and forget) what was recorded."""
    recorder = getattr(worker, ATTRIBUTE)
    chunks, recorder.chunks, recorder.active = recorder.chunks, [], False
    return chunks


def prefix_keys(tokens: list[int]) -> list[int]:
    """One key per position: a running hash of the tokens up to it (equal keys: equal prefixes, equal states)."""
    keys, h = [], 0
    for t in tokens:
        h = hash((h, t))
        keys.append(h)
    return keys


class MissingStates(RuntimeError):
    """A position needed by a row was computed in no forward of this call (the caller falls back)."""


def assemble(chunks: list[Chunk], sequences: dict[str, list[int]], rows: list[tuple[str, int, int]],
             groups: list[tuple[str, int]], spec: CaptureSpec) -> CapturedStates:
    """The captured states of a rollout batch from the chunks one vLLM call recorded.

    `sequences`: each request's tokens (prompt + sampled), by its external id ("{index}_{parent}", or the
    parent's id for n = 1); `rows`: per row (request, prompt length, completion length after the EOS cut);
    `groups`: per prompt (one of its requests, prompt length). MissingStates where a position is missing.
    """
    keys = {rid: prefix_keys(tokens) for rid, tokens in sequences.items()}
    table: dict[int, int] = {}
    offset = 0
    for chunk in chunks:
        for j, rid in enumerate(chunk.req_ids):
            own = keys.get(external_id(rid, keys))
            if own is None:
                continue
            for t in range(chunk.starts[j], chunk.starts[j + 1]):
                if chunk.positions[t] < len(own):
                    table[own[chunk.positions[t]]] = offset + t
        offset += len(chunk.positions)
    flat = torch.cat([c.states for c in chunks]) if chunks else None
    placer = StatePlacer(spec)

    def gather(rid: str, lo: int, hi: int) -> torch.Tensor:
        index = [table.get(k) for k in keys[rid][lo:hi]]
        if None in index or flat is None:
            raise MissingStates(f"request {rid}: {index.count(None)} positions were not computed in this call")
        return placer.place(flat[torch.tensor(index, dtype=torch.long, device=flat.device)])

    prompts = [gather(rid, 0, p) for rid, p in groups]
    return CapturedStates(spec.layer, prompts, [gather(rid, p, p + max(c - 1, 0)) for rid, p, c in rows])


def external_id(internal: str, known: dict[str, Any]) -> str:
    """The id a request was submitted under: vLLM appends "-{random suffix}" to it internally."""
    return internal if internal in known else internal.rsplit("-", 1)[0]
