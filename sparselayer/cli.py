"""`sparselayer` command line: a thin layer that turns flags/YAML into API calls (train, eval, export).

Every flag of `train` (and `sweep`, and `bench step`) is generated from the config dataclasses, help
text included (each dataclass's docstring, read by `config.field_help`), so the CLI cannot offer a
setting the Python API lacks. Errors caused by input print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .bench.config import PRESETS, StepBenchConfig
from .config import SECTIONS, TrainConfig, field_help
from .errors import ConfigError, SparseLayerError

EMBEDDED_RECIPE = Path(__file__).resolve().parent / "data" / "default_model" / "sparselayer.yaml"


def config_flag(f: dataclasses.Field) -> str:
    """The flag of a config field: --learning-rate for learning_rate."""
    return "--" + f.name.replace("_", "-")


def shown_default(value: Any) -> str | None:
    """A field default as help shows it (bools on/off); None when unset (the help says what unset means)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _add_config_flags(parser: argparse.ArgumentParser, shown: dict[str, str] | None = None) -> None:
    """One flag per config field (--learning-rate for learning_rate), help from the field's docstring entry.

    Defaults stay unset (SUPPRESS) so that resolve_train_config sees what was given; `shown` replaces
    the default the help states where a command has its own (sweep: --layers all).
    """
    for section, kind in SECTIONS.items():
        group = parser.add_argument_group(section)
        helps = field_help(kind)
        for f in dataclasses.fields(kind):
            text = helps.get(f.name, "")
            default = (shown or {}).get(f.name, shown_default(f.default))
            if default is not None:
                text = f"{text} (default: {default})" if text else f"default: {default}"
            flags = (config_flag(f), *f.metadata.get("aliases", ()))
            if f.type in ("bool", "bool | None"):  # --x / --no-x; unset: the field's default
                group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=text.replace("%", "%%"))
            elif f.type.startswith("list"):  # --reward a b, or repeated: --reward a --reward b
                group.add_argument(*flags, dest=f.name, action="extend", nargs="+", default=argparse.SUPPRESS,
                                   metavar=f.metadata.get("metavar", f.name.upper()), help=text.replace("%", "%%"))
            else:
                group.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS,
                                   metavar=f.metadata.get("metavar", f.name.upper()), help=text.replace("%", "%%"))
    parser.add_argument("--layer", dest="layer", default=argparse.SUPPRESS, metavar="K",
                        help="one trained decoder layer, as --layers K (negative counts from the end; "
                             "giving both is an error)")


def _add_serve_parser(sub) -> None:
    """`serve`: vLLM's OpenAI-compatible server plus the layer-delta endpoint (sparselayer.serve.serve)."""
    sv = sub.add_parser("serve", help="vLLM OpenAI-compatible server that also takes layer deltas (remote mode)")
    sv.add_argument("--model", required=True, help="local Hugging Face model folder to serve")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on")
    sv.add_argument("--max-model-len", type=int, default=None, help="vLLM: maximum sequence length")
    sv.add_argument("--dtype", default="auto", help="vLLM: weight dtype (auto, bfloat16, float16, float32)")
    sv.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="vLLM: fraction of GPU memory (of RAM on CPU) for weights and KV cache")
    sv.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                    help="vLLM: KV cache size (default on CPU without --gpu-memory-utilization: 1 GiB)")
    sv.add_argument("--enforce-eager", action="store_true", help="vLLM: no graph capture or compilation")
    sv.add_argument("--api-key", default=None, metavar="KEY",
                    help="every request, on every route, must carry Authorization: Bearer KEY (default: the "
                         "environment variable SPARSELAYER_API_KEY, which keeps the key out of the process list); "
                         "required to listen on a non-loopback --host")
    sv.add_argument("--max-body-bytes", type=int, default=None, metavar="N",
                    help="largest delta payload (413 above it, before reading; default: every checkpoint tensor "
                         "dense in bf16 plus its header)")
    sv.add_argument("--body-timeout", type=float, default=None, metavar="SECONDS",
                    help="time to receive a whole delta payload (408 after it; default: 60 s + 1 s per 16 MiB "
                         "of --max-body-bytes)")
    sv.add_argument("--max-tensors", type=int, default=None, metavar="N",
                    help="tensors one delta may name (default: the checkpoint's tensor count)")
    sv.add_argument("--max-metadata-bytes", type=int, default=None, metavar="N",
                    help="size of a delta's safetensors header, metadata included (default: 64 KiB + 1 KiB per "
                         "checkpoint tensor)")
    sv.add_argument("--max-metadata-depth", type=int, default=None, metavar="N",
                    help="JSON nesting of a delta's header and metadata (default: 8; a valid one has 4)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparselayer",
                                     description="GRPO post-training of a single transformer layer.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train one (or a few) layers with GRPO")
    tr.add_argument("--config", type=Path, help="YAML file of settings; flags override it")
    tr.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its latest checkpoint")
    tr.add_argument("--nproc-per-node", dest="nproc_per_node", type=int, default=argparse.SUPPRESS, metavar="N",
                    help="data-parallel on this node: hand the same command to torch.distributed.run with N "
                         "processes (one per GPU; gloo on CPU); several nodes: torchrun ... -m sparselayer train")
    _add_config_flags(tr)
    ev = sub.add_parser("eval", help="held-out accuracy of a model folder, a run directory or the embedded model")
    ev.add_argument("path", nargs="?", help="model folder or run directory (default: embedded base model)")
    ev.add_argument("--output", type=Path, help="also write the JSON result to this file")
    ev.add_argument("--k", type=int, default=4, help="samples per prompt for mean@k and pass@k (0: greedy only)")
    ev.add_argument("--num-eval", type=int, default=500, help="held-out prompts to score")
    ev.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the --k samples")
    ev.add_argument("--max-completion-length", type=int, default=None,
                    help="longest completion in tokens (default: the task's suggestion)")
    ev.add_argument("--task", default=None, help="built-in task (default: the run's task, else arithmetic)")
    ev.add_argument("--dataset", default=None, help="JSONL/Parquet prompt/answer file to evaluate on")
    ex = sub.add_parser("export", help="write a full HF model folder with the trained layer(s) merged")
    ex.add_argument("run_dir", help="run directory written by `sparselayer train`")
    ex.add_argument("--output", type=Path, required=True, help="folder to write the merged model to")
    sw = sub.add_parser("sweep", help="train each layer alone and the full model; rank layers by contribution C(k)")
    sw.add_argument("--config", type=Path, help="YAML file of training settings shared by every run")
    sw.add_argument("--seeds", type=int, default=1, help="runs per layer (seeds seed..seed+N-1): mean and std")
    _add_config_flags(sw, {"layers": "all"})
    sw_sub = sw.add_subparsers(dest="sweep_command", required=False)
    cmp = sw_sub.add_parser("compare", help="Spearman rank correlation of two sweeps' C(k)")
    cmp.add_argument("csv_a", type=Path, help="sweep.csv of one sweep")
    cmp.add_argument("csv_b", type=Path, help="sweep.csv of the other")
    _add_serve_parser(sub)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    step = bench.add_parser("step", help="full-parameter GRPO step vs the layer-sparse step, same model and batch")
    step.add_argument("--preset", choices=sorted(PRESETS), default="default",
                      help="model shape: default (24 layers, hidden 512, vocab 32768) or qwen3-8b (36 layers, "
                           "hidden 4096, vocab 151936, layer 16, nf4, gradient checkpointing, sparse variant only)")
    helps = field_help(StepBenchConfig)
    for f in dataclasses.fields(StepBenchConfig):
        kind = ({"action": argparse.BooleanOptionalAction} if isinstance(f.default, bool)
                else {"type": type(f.default)})
        step.add_argument(config_flag(f), dest=f.name, default=argparse.SUPPRESS, **kind,
                          help=f"{helps[f.name]} (default: {f.default}, or the preset's)")
    step.add_argument("--output", type=Path, default=Path("benchmarks/results/step.json"),
                      help="JSON file the results are written to")
    return parser


def _pop_layers(given: dict[str, Any]) -> str | None:
    """Remove --layer / --layers from parsed flags and return the one given (both: ConfigError)."""
    if "layer" in given and "layers" in given:
        raise ConfigError("--layer and --layers conflict: give one of them")
    return given.pop("layers", None) or given.pop("layer", None)


def resolve_train_config(args: argparse.Namespace) -> TrainConfig:
    """defaults <- embedded model's recipe <- saved run config (--resume) <- --config YAML <- flags."""
    not_settings = ("command", "config", "resume", "nproc_per_node", "argv")
    given = {k: v for k, v in vars(args).items() if k not in not_settings}
    layers = _pop_layers(given)
    if layers is not None:
        given["layers"] = layers
    yaml_cfg = TrainConfig.from_yaml(args.config) if args.config else None
    config = TrainConfig()
    if args.resume:
        from .runs import RunDir

        out = given.get("output_dir") or (yaml_cfg.run.output_dir if yaml_cfg else None)
        if not out:
            raise ConfigError("--resume needs --output-dir (the run to continue)")
        if (Path(out) / "config.yaml").is_file():
            config = TrainConfig.from_mapping(RunDir(out).read_config())
    explicit_model = given.get("model") or (yaml_cfg.model.model if yaml_cfg else None) or config.model.model
    if not explicit_model and not args.resume and EMBEDDED_RECIPE.is_file():
        config = TrainConfig.from_yaml(EMBEDDED_RECIPE, config)
    if args.config:
        config = TrainConfig.from_yaml(args.config, config)
    return TrainConfig.from_mapping(given, config).validate()


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import launch, launched_rank, launched_size
    from .train import train

    nproc = vars(args).pop("nproc_per_node", None)
    config = resolve_train_config(args)  # flags checked here, before any process starts
    if nproc is not None and launched_size() == 1:
        return launch(nproc, _without_nproc(args.argv))
    summary = train(config, resume=args.resume)
    if launched_rank() != 0:
        return 0  # under torchrun rank 0 prints the result
    base, final = summary.get("base_accuracy"), summary.get("final_accuracy")
    line = f"trained {summary['layers']} for {summary['steps']} steps in {summary['train_time_s']:.0f}s"
    measure = "episode success" if config.task.env or config.task.task == "chain" else "accuracy"  # multi-turn
    if base is not None and final is not None:
        line += f"; held-out {measure} {base:.1%} -> {final:.1%} ({(final - base) * 100:+.1f} points)"
    if config.run.eval_steps and "best_eval" in summary:
        best = summary["best_eval"]
        line += f"\nbest held-out accuracy {best['accuracy']:.1%} at step {best['step']}"
    print(line + f"\nrun directory: {summary['output_dir']}")
    return 0


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """The command line without --nproc-per-node N (what each rank torch.distributed.run starts gets)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            out.append(arg)
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_path
    from .runs import atomic_write_text
    from .tasks import build_task

    if args.task and args.dataset:
        raise ConfigError("--dataset and --task are exclusive: give one of them")
    if args.k < 0 or args.num_eval < 1:
        raise ConfigError("--k must be >= 0 and --num-eval >= 1")
    task = build_task(args.task, args.dataset) if (args.task or args.dataset) else None
    result = evaluate_path(args.path, task=task, num_examples=args.num_eval, k=args.k,
                           max_new_tokens=args.max_completion_length, temperature=args.temperature)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run, is_run_dir

    if not is_run_dir(args.run_dir):
        raise ConfigError(f"{args.run_dir} is not a sparselayer run directory (no config.yaml)")
    print(f"exported to {export_run(args.run_dir, args.output)}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import compare_sweeps, format_table, run_sweep

    if args.sweep_command == "compare":
        result = compare_sweeps(args.csv_a, args.csv_b)
        print(f"Spearman rank correlation {result['spearman']:+.3f} over {len(result['layers'])} common layers "
              f"(p = {result['p_value']:.3g})")
        return 0
    layers = _pop_layers(vars(args)) or "all"
    seeds = args.seeds
    for name in ("sweep_command", "seeds"):
        vars(args).pop(name, None)
    args.resume = False
    config = resolve_train_config(args)
    summary = run_sweep(config, layers, seeds=seeds, on_run=lambda line: print(line, flush=True))
    print(format_table(summary))
    print(f"written {summary['directory']}/sweep.csv, sweep.json and sweep.png")
    return 0


def _quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, hub notices) out of the user's terminal."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.step import bench_step, format_table

    fields = {f.name for f in dataclasses.fields(StepBenchConfig)}
    values = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if k in fields}}
    cfg = StepBenchConfig(**values)
    sizes = (cfg.num_layers, cfg.hidden, cfg.vocab, cfg.prompts, cfg.generations, cfg.steps)
    if min(sizes) < 1 or not 0 <= cfg.layer < cfg.num_layers:
        raise ConfigError("bench step: sizes must be positive and --layer within the model's layers")
    result = bench_step(cfg, args.output)
    print(format_table(result))
    print(f"written to {args.output}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .sync.server import serve

    serve(args.model, host=args.host, port=args.port, max_model_len=args.max_model_len, dtype=args.dtype,
          gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
          kv_cache_memory_bytes=args.kv_cache_memory_bytes, api_key=args.api_key,
          max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout, max_tensors=args.max_tensors,
          max_metadata_bytes=args.max_metadata_bytes, max_metadata_depth=args.max_metadata_depth)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # train --nproc-per-node hands it to torchrun
    _quiet_libraries()
    handler = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "bench": cmd_bench, "serve": cmd_serve,
               "sweep": cmd_sweep}[args.command]
    try:
        return handler(args)
    except SparseLayerError as exc:
        print(f"sparselayer: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("sparselayer: interrupted (the last checkpoint is intact; continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
