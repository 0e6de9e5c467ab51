"""Functions that run inside vLLM's worker (through `LLM.collective_rpc`) to load pushed weights.

`load_scoped` is vLLM's own in-place reload (checkpoint-format weights through the model's
`load_weights`, so q/k/v and gate/up are fused and CPU weights repacked) restricted to the
modules that own the pushed tensors: the stock `reload_weights` prepares, and afterwards walks,
every module of the model, which costs far more than loading one layer.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch

LAYER_RE = re.compile(r"^(.*?layers\.\d+)\.")


def owning_modules(names: Iterable[str]) -> list[str]:
    """Module paths to reload for these checkpoint names: the whole decoder layer, else the parent module.

    Only decoder-layer tensors go through `load_scoped`: an embedding may be tied to the LM head,
    whose repacked CPU copy lies outside the embedding module."""
    owners = []
    for name in names:
        match = LAYER_RE.match(name)
        owner = match.group(1) if match else name.rpartition(".")[0]
        if owner not in owners:
            owners.append(owner)
    return owners


def load_scoped(worker, weights: list[tuple[str, torch.Tensor]], modules: list[str]) -> int:
    """Load checkpoint-format `weights` into the listed modules of the worker's model; return tensors loaded."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload, initialize_layerwise_reload

    runner = worker.model_runner
    model = runner.get_model()
    scoped = [model.get_submodule(path) for path in modules]
    with set_current_vllm_config(runner.vllm_config), torch.no_grad():
        for module in scoped:
            initialize_layerwise_reload(module)
        loaded = model.load_weights(iter(weights))
        for module in scoped:
            finalize_layerwise_reload(module, runner.model_config)
    return len(loaded) if loaded is not None else len(weights)


def reload_full(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
    """vLLM's stock in-place reload, then re-prepare a tied LM head.

    On CPU the head keeps a repacked copy of the (shared) embedding matrix in a closure, which the
    stock reload does not rebuild when only the embedding module received weights.
    """
    worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    model = worker.model_runner.get_model()
    head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", 0):
        with torch.no_grad():
            head.quant_method.process_weights_after_loading(head)
