"""Layer-contribution sweep: which layer is worth training for this model and task?

Trains the full model and each listed layer alone on the same budget and seed, scores each on the
held-out set, and ranks layers by the paper's contribution C(k) = (S_k - S_base) / (S_full - S_base)
(arXiv 2607.01232). Every run is an ordinary run directory under the sweep's folder, so an
interrupted sweep continues where it stopped and finished runs are reused.
"""
from __future__ import annotations

import dataclasses
import gc
import io
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import TrainConfig
from .contributions import csv_text, read_contributions, resolve_layers
from .errors import ConfigError
from .model.layout import check_model_dir
from .runs import RunDir, atomic_write_bytes, atomic_write_text
from .tasks import Task

# settings that may differ between an interrupted sweep and its continuation
PER_RUN_FIELDS = {"layers", "layer_ranking", "output_dir", "progress", "eval_at_start", "eval_at_end"}


@dataclass
class RunResult:
    """One finished training run of the sweep."""

    kind: str  # "full" or "layer"
    layer: int | None
    seed: int
    score: float  # held-out greedy accuracy after training
    run_dir: str


def contribution(score: float, base: float, full: float) -> float:
    """C(k) = (S_k - S_base) / (S_full - S_base); NaN when full-parameter training gained nothing."""
    gain = full - base
    return (score - base) / gain if gain != 0 else math.nan


def sweep_layers(spec: str, num_layers: int, ranking_csv: str | Path | None = None) -> list[int]:
    """The layers a sweep trains one at a time: `all` is every layer; else any --layers selection
    (top:k ranked by the sweep CSV `ranking_csv`)."""
    layers = resolve_layers(spec, num_layers, ranking_csv)
    return list(range(num_layers)) if layers is None else layers


def default_sweep_dir(config: TrainConfig) -> Path:
    """Deterministic, so re-running the same command continues the same sweep."""
    model = Path(config.model.model).name if config.model.model else "default"
    task = Path(config.task.dataset).stem if config.task.dataset else (config.task.task or "arithmetic")
    return Path("runs") / f"sweep-{model}-{task}-{config.run.max_steps}steps"


def run_sweep(config: TrainConfig, layers: str = "all", seeds: int = 1, output_dir: str | Path | None = None,
              task: Task | None = None, on_run: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the full baseline and each layer (x seeds), reusing finished runs; write CSV, JSON and plot.

    The baseline trains at `config.rl.full_learning_rate` when set (full-parameter RL usually needs
    a smaller rate than a single layer), else at the layers' rate. `task` replaces the config's task.
    """
    config = config.validate()
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    full_lr = config.rl.full_learning_rate or config.rl.learning_rate
    num_layers = _num_layers(config)
    chosen = sweep_layers(layers, num_layers, config.model.layer_ranking)
    directory = Path(output_dir or config.run.output_dir or default_sweep_dir(config))
    _claim_directory(directory, config)
    base = _read_base(directory)
    plan = [(None, s) for s in range(seeds)] + [(k, s) for s in range(seeds) for k in chosen]  # None: full
    results: list[RunResult] = []
    for i, (layer, seed) in enumerate(plan, 1):
        label = "full" if layer is None else f"layer {layer}"
        if on_run:
            on_run(f"[{i}/{len(plan)}] {label}, seed {config.run.seed + seed}")
        overrides = {"learning_rate": full_lr} if layer is None else {}
        result, run_base = _train_one(TrainConfig.from_mapping(overrides, config), directory, layer, seed,
                                      need_base=base is None, task=task)
        if base is None and run_base is not None:
            base = run_base
            atomic_write_text(directory / "base.json", json.dumps({"score": base}) + "\n")
        results.append(result)
        summary = summarize(base, results, num_layers)  # after every run: partial results are readable
        summary.update({"model": config.model.model or "embedded default", "max_steps": config.run.max_steps,
                        "learning_rate": config.rl.learning_rate, "full_learning_rate": full_lr, "seeds": seeds,
                        "directory": str(directory)})
        write_outputs(summary, directory)
        gc.collect()
    return summary


def _num_layers(config: TrainConfig) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(check_model_dir(config.model.model)).num_hidden_layers)


def _settings(config: TrainConfig) -> dict[str, Any]:
    """The training settings every run of one sweep must share."""
    return {section: {k: v for k, v in values.items() if k not in PER_RUN_FIELDS}
            for section, values in config.to_dict().items()}


def _claim_directory(directory: Path, config: TrainConfig) -> None:
    """Create the sweep folder, or check that an existing one was made with the same settings."""
    plan_file = directory / "sweep.yaml"
    settings = _settings(config)
    if plan_file.is_file():
        saved = yaml.safe_load(plan_file.read_text()) or {}
        defaults = TrainConfig().to_dict()  # a setting newer than the saved sweep ran at its default there
        differ = sorted(k for section in settings for k in settings[section]
                        if saved.get(section, {}).get(k, defaults[section][k]) != settings[section][k])
        if differ:
            raise ConfigError(f"{directory} holds a sweep with other settings ({', '.join(differ)}): "
                              "repeat them, or pick another --output-dir")
        return
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan_file, yaml.safe_dump(settings, sort_keys=False))


def _read_base(directory: Path) -> float | None:
    path = directory / "base.json"
    return float(json.loads(path.read_text())["score"]) if path.is_file() else None


def _train_one(config: TrainConfig, directory: Path, layer: int | None, seed: int, need_base: bool,
               task: Task | None) -> tuple[RunResult, float | None]:
    """Train one run (or reuse it when finished); return its result and the base score it measured."""
    from .train import train

    run_dir = directory / "runs" / f"{'full' if layer is None else f'layer{layer}'}-seed{seed}"
    summary = _finished_summary(RunDir(run_dir), config.run.max_steps)
    if summary is None or (need_base and "base_accuracy" not in summary):
        cfg = TrainConfig.from_mapping({"layers": "all" if layer is None else str(layer), "layer_ranking": None,
                                        "output_dir": str(run_dir), "seed": config.run.seed + seed,
                                        "eval_at_start": need_base, "eval_at_end": True}, config)
        summary = train(cfg, task=task, resume=(run_dir / "config.yaml").is_file())
    kind = "full" if layer is None else "layer"
    result = RunResult(kind, layer, config.run.seed + seed, float(summary["final_accuracy"]), str(run_dir))
    return result, summary.get("base_accuracy")


def _finished_summary(run: RunDir, max_steps: int) -> dict[str, Any] | None:
    """The run's summary when it trained all `max_steps` and was scored, else None (train or finish it)."""
    summary = run.read_summary()
    done = summary.get("steps") == max_steps and "final_accuracy" in summary
    return summary if done else None


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(base: float | None, results: list[RunResult], num_layers: int) -> dict[str, Any]:
    """Scores and contributions (mean and std over seeds) per layer, ranked best first."""
    if base is None:
        raise ConfigError("the sweep has no base score: delete its folder and start again")
    full_scores = [r.score for r in results if r.kind == "full"]
    full, full_std = _mean_std(full_scores)
    rows = [_row("base", None, [base], base, full, num_layers), _row("full", None, full_scores, base, full, num_layers)]
    layers = sorted({r.layer for r in results if r.kind == "layer"})
    layer_rows = [_row("layer", k, [r.score for r in results if r.layer == k], base, full, num_layers) for k in layers]
    ranked = sorted((r for r in layer_rows if math.isfinite(r["contribution_mean"])),
                    key=lambda r: (-r["contribution_mean"], r["layer"]))
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    return {"num_layers": num_layers, "base_score": base, "full_score": full, "full_score_std": full_std,
            "rows": rows + layer_rows, "ranking": [r["layer"] for r in ranked],
            "runs": [dataclasses.asdict(r) for r in results]}


def _row(kind: str, layer: int | None, scores: list[float], base: float, full: float, num_layers: int) -> dict:
    s_mean, s_std = _mean_std(scores)
    c_mean, c_std = _mean_std([contribution(s, base, full) for s in scores])
    return {"kind": kind, "layer": layer, "depth": None if layer is None else layer / num_layers, "runs": len(scores),
            "score_mean": s_mean, "score_std": s_std, "contribution_mean": c_mean, "contribution_std": c_std,
            "rank": None}


def write_outputs(summary: dict[str, Any], directory: Path) -> None:
    """sweep.csv (format: `sparselayer.contributions`), sweep.json and sweep.png, each written atomically."""
    atomic_write_text(directory / "sweep.csv", csv_text(summary["rows"]))
    atomic_write_text(directory / "sweep.json", json.dumps(summary, indent=2) + "\n")
    plot_sweep(summary, directory / "sweep.png")


def plot_sweep(summary: dict[str, Any], path: Path) -> None:
    """C(k) against depth with seed error bars, the base (0) and full (1) lines and the paper's 40-60% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = summary["num_layers"]
    rows = [r for r in summary["rows"] if r["kind"] == "layer"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axvspan(0.4 * n, 0.6 * n, color="tab:green", alpha=0.12, label="paper's best band (40-60% depth)")
    ax.axhline(1.0, color="tab:red", linestyle="--", label=f"full-parameter RL (S={summary['full_score']:.3f})")
    ax.axhline(0.0, color="gray", linestyle=":", label=f"base model (S={summary['base_score']:.3f})")
    ax.errorbar([r["layer"] for r in rows], [r["contribution_mean"] for r in rows],
                yerr=[r["contribution_std"] for r in rows], fmt="o-", capsize=3, label="layer k trained alone")
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xlabel(f"trained layer k (of {n})")
    ax.set_ylabel("contribution C(k)")
    ax.set_title(f"Layer contribution, {summary.get('model', '')}, {summary.get('max_steps', '?')} steps, "
                 f"{summary.get('seeds', 1)} seed(s)", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())


def format_table(summary: dict[str, Any]) -> str:
    """Layers ranked by C(k), then the base and full-parameter scores."""
    lines = [f"{'rank':>4}  {'layer':>5}  {'depth':>5}  {'score':>15}  {'C(k)':>15}"]
    rows = {r["layer"]: r for r in summary["rows"] if r["kind"] == "layer"}
    ordered = [rows[k] for k in summary["ranking"]] + [r for r in rows.values() if r["rank"] is None]
    for r in ordered:
        rank = "-" if r["rank"] is None else str(r["rank"])
        lines.append(f"{rank:>4}  {r['layer']:>5}  {r['depth']:>5.0%}  {_pm(r['score_mean'], r['score_std']):>15}  "
                     f"{_pm(r['contribution_mean'], r['contribution_std']):>15}")
    lines.append(f"base score {summary['base_score']:.3f}; full-parameter score "
                 f"{_pm(summary['full_score'], summary['full_score_std'])}")
    return "\n".join(lines)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}" if std else f"{mean:.3f}"


def compare_sweeps(a: str | Path, b: str | Path) -> dict[str, Any]:
    """Spearman rank correlation of two sweeps' C(k) over the layers both scored (the paper's cross-task check)."""
    from scipy.stats import spearmanr

    ca, cb = read_contributions(a), read_contributions(b)
    common = sorted(set(ca) & set(cb))
    if len(common) < 3:
        raise ConfigError(f"{a} and {b} share {len(common)} scored layers; a rank correlation needs at least 3")
    rho, p = spearmanr([ca[k] for k in common], [cb[k] for k in common])
    return {"spearman": float(rho), "p_value": float(p), "layers": common}
