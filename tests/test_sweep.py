"""Layer-contribution sweep: C(k) and ranking on known numbers, layer selections, resume, compare, boost."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from sparselayer.cli import main
from sparselayer.config import TrainConfig
from sparselayer.contributions import read_ranking, resolve_layers
from sparselayer.errors import ConfigError
from sparselayer.model.layer_select import middle_layers, needs_ranking, select_layers
from sparselayer.model.layout import parse_layers
from sparselayer.sweep import RunResult, compare_sweeps, contribution, run_sweep, summarize, write_outputs
from sparselayer.trainer import Trainer

BASE, FULL = 0.2, 0.6


def _results(scores: dict[int | None, list[float]]) -> list[RunResult]:
    return [RunResult("full" if k is None else "layer", k, seed, s, f"runs/{k}-{seed}")
            for k, values in scores.items() for seed, s in enumerate(values)]


def _write_sweep(tmp_path, scores: dict[int | None, list[float]], num_layers: int = 8, name: str = "a"):
    folder = tmp_path / name
    folder.mkdir()
    summary = summarize(BASE, _results(scores), num_layers)
    write_outputs({**summary, "model": "known numbers", "max_steps": 1, "seeds": 1}, folder)
    return folder / "sweep.csv", summary


def test_contribution_on_known_numbers():
    assert contribution(0.5, BASE, FULL) == pytest.approx(0.75)
    assert contribution(0.7, BASE, FULL) == pytest.approx(1.25)  # one layer beating full RL
    assert contribution(0.1, BASE, FULL) == pytest.approx(-0.25)
    assert math.isnan(contribution(0.5, 0.3, 0.3))  # full RL gained nothing: C undefined


def test_summary_ranks_layers_and_averages_seeds():
    summary = summarize(BASE, _results({None: [0.6, 0.6], 1: [0.3, 0.5], 4: [0.6, 0.7], 6: [0.2, 0.2]}), 8)
    rows = {r["layer"]: r for r in summary["rows"] if r["kind"] == "layer"}
    assert summary["ranking"] == [4, 1, 6]
    assert rows[4]["contribution_mean"] == pytest.approx(1.125) and rows[4]["rank"] == 1
    assert rows[1]["score_mean"] == pytest.approx(0.4) and rows[1]["score_std"] == pytest.approx(math.sqrt(0.02))
    assert rows[1]["contribution_std"] == pytest.approx(math.sqrt(0.02) / 0.4)
    assert rows[6]["contribution_mean"] == pytest.approx(0.0) and rows[4]["depth"] == pytest.approx(0.5)
    kinds = [r["kind"] for r in summary["rows"]]
    assert kinds[:2] == ["base", "full"] and summary["full_score"] == pytest.approx(FULL)


def test_outputs_csv_json_png_and_top_k(tmp_path):
    csv_path, _ = _write_sweep(tmp_path, {None: [FULL], 0: [0.3], 3: [0.55], 5: [0.5], 7: [0.1]})
    folder = csv_path.parent
    assert (folder / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((folder / "sweep.json").read_text())["ranking"] == [3, 5, 0, 7]
    assert read_ranking(csv_path) == [3, 5, 0, 7]
    assert select_layers("top:2", 8, read_ranking(csv_path)) == [3, 5]
    assert resolve_layers("top:3", 8, str(csv_path)) == [0, 3, 5]
    assert parse_layers("top:3", 8, read_ranking(csv_path)) == [0, 3, 5]


def test_ranking_is_read_only_for_top_k(tmp_path):
    """Layer selection takes a ranking, not a file: the CSV is opened only when the spec is top:k."""
    assert needs_ranking("top:3") and needs_ranking(" TOP:1 ") and not needs_ranking("mid:3")
    assert not needs_ranking("16") and not needs_ranking("all")
    missing = tmp_path / "missing.csv"
    assert resolve_layers("mid:3", 28, missing) == [12, 13, 14]
    assert resolve_layers("10,16", 28, missing) == [10, 16] and resolve_layers("all", 28, missing) is None
    assert select_layers("top:2", 8, [6, 1, 3]) == [1, 6]
    with pytest.raises(ConfigError, match="give --from sweep.csv"):
        select_layers("top:2", 8)


def test_middle_layers():
    assert middle_layers(5, 24) == [9, 10, 11, 12, 13]
    assert middle_layers(1, 36) == [17] and middle_layers(4, 36) == [16, 17, 18, 19]
    assert middle_layers(24, 24) == list(range(24))
    assert parse_layers("mid:3", 28) == [12, 13, 14]


@pytest.mark.parametrize("spec, ranking, fragment", [
    ("mid:0", None, "1..24 are available"),
    ("mid:25", None, "1..24 are available"),
    ("top:3", None, "give --from sweep.csv"),
    ("top:3", "missing.csv", "sweep CSV not found"),
    ("top:9", "GOOD", "1..4 are available"),
])
def test_bad_selections_refused(tmp_path, spec, ranking, fragment):
    if ranking == "GOOD":
        ranking, _ = _write_sweep(tmp_path, {None: [FULL], 0: [0.3], 3: [0.55], 5: [0.5], 7: [0.1]})
    elif ranking:
        ranking = tmp_path / ranking
    with pytest.raises(ConfigError, match=fragment):
        resolve_layers(spec, 24, ranking)


def test_ranking_of_a_deeper_model_refused(tmp_path):
    csv_path, _ = _write_sweep(tmp_path, {None: [FULL], 20: [0.5]}, num_layers=24)
    with pytest.raises(ConfigError, match="deeper model"):
        resolve_layers("top:1", 8, str(csv_path))
    with pytest.raises(ConfigError, match="deeper model"):
        parse_layers("top:1", 8, [20])


def test_not_a_sweep_csv_refused(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="no layer with a finite"):
        read_ranking(bad)
    bad.write_text("kind,layer\nlayer,x\n")
    with pytest.raises(ConfigError, match="not a sweep CSV"):
        read_ranking(bad)


def test_compare_spearman(tmp_path):
    a, _ = _write_sweep(tmp_path, {None: [FULL], 0: [0.3], 2: [0.4], 4: [0.5], 6: [0.25]}, name="a")
    same, _ = _write_sweep(tmp_path, {None: [FULL], 0: [0.35], 2: [0.45], 4: [0.58], 6: [0.3]}, name="b")
    rev, _ = _write_sweep(tmp_path, {None: [FULL], 0: [0.5], 2: [0.4], 4: [0.3], 6: [0.55]}, name="c")
    short, _ = _write_sweep(tmp_path, {None: [FULL], 0: [0.5], 2: [0.4]}, name="d")
    assert compare_sweeps(a, same)["spearman"] == pytest.approx(1.0)
    assert compare_sweeps(a, rev)["spearman"] == pytest.approx(-1.0)
    assert compare_sweeps(a, same)["layers"] == [0, 2, 4, 6]
    with pytest.raises(ConfigError, match="at least 3"):
        compare_sweeps(a, short)


def test_cli_compare_and_bad_input(tmp_path, capsys):
    a, _ = _write_sweep(tmp_path, {None: [FULL], 0: [0.3], 2: [0.4], 4: [0.5]}, name="a")
    assert main(["sweep", "compare", str(a), str(a)]) == 0
    assert "Spearman rank correlation +1.000 over 3 common layers" in capsys.readouterr().out
    for argv, fragment in [(["sweep", "compare", str(a), str(tmp_path / "nope.csv")], "sweep CSV not found"),
                           (["sweep", "--layers", "99", "--max-steps", "1"], "out of range"),
                           (["sweep", "--layers", ",", "--max-steps", "1"], "empty"),
                           (["sweep", "--layers", "top:2", "--max-steps", "1"], "--from"),
                           (["sweep", "--seeds", "0"], "--seeds must be at least 1")]:
        assert main(argv + ["--output-dir", str(tmp_path / "sw")] * (argv[1] != "compare")) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, err


def _sweep_config(model, **extra) -> TrainConfig:
    base = {"model": str(model), "max_steps": 2, "prompts_per_step": 2, "num_generations": 2,
            "micro_batch_size": 4, "learning_rate": 0.01, "max_completion_length": 4, "num_eval": 6,
            "save_steps": 1, "rollout": "hf", "progress": False}
    return TrainConfig.from_mapping({**base, **extra})


@pytest.mark.slow
def test_interrupted_sweep_resumes_and_reuses_finished_runs(tiny_model, tmp_path):
    out = tmp_path / "sweep"
    started: list[str] = []

    def interrupt_third(line: str) -> None:
        started.append(line)
        if len(started) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(_sweep_config(tiny_model, full_learning_rate=0.001), "1,3", output_dir=out, on_run=interrupt_third)
    finished = {p.name: (p / "summary.json").stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert sorted(finished) == ["full-seed0", "layer1-seed0"] and (out / "base.json").is_file()
    assert (out / "sweep.csv").is_file()  # partial results after each run
    summary = run_sweep(_sweep_config(tiny_model, full_learning_rate=0.001), "1,3", output_dir=out)
    rates = {name: yaml.safe_load((out / "runs" / name / "config.yaml").read_text())["rl"]["learning_rate"]
             for name in ("full-seed0", "layer1-seed0")}
    assert rates == {"full-seed0": 0.001, "layer1-seed0": 0.01}  # the baseline trains at --full-learning-rate
    assert {p.name: (p / "summary.json").stat().st_mtime_ns for p in (out / "runs").iterdir()
            if p.name in finished} == finished  # reused, not retrained
    layers = [r["layer"] for r in summary["rows"] if r["kind"] == "layer"]
    assert layers == [1, 3] and sorted(summary["ranking"]) == sorted(k for k in (1, 3)
                                                                    if summary["full_score"] != summary["base_score"])
    assert (out / "runs" / "layer3-seed0" / "summary.json").is_file()
    for name in ("sweep.csv", "sweep.json", "sweep.png"):
        assert (out / name).stat().st_size > 0
    with pytest.raises(ConfigError, match="other settings"):
        run_sweep(_sweep_config(tiny_model), "1", output_dir=out)  # other --full-learning-rate


def test_boost_layers_param_groups(tiny_model):
    cfg = _sweep_config(tiny_model, layers="all", boost_layers="1,2", boost_lr=0.5)
    trainer = Trainer(cfg)
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == [0.01, 0.5]
    prefixes = ("model.layers.1.", "model.layers.2.")
    boosted = {id(p) for n, p in trainer.model.named_parameters() if n.startswith(prefixes)}
    assert {id(p) for p in groups[1]["params"]} == boosted and len(boosted) > 0
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(trainer.model.parameters()))
    with pytest.raises(ConfigError, match="--layers all"):
        Trainer(_sweep_config(tiny_model, layers="1", boost_layers="2", boost_lr=0.5))
    with pytest.raises(ConfigError, match="go together"):
        _sweep_config(tiny_model, layers="all", boost_layers="2").validate()


def test_sweep_folder_from_before_a_new_setting_is_still_accepted(tmp_path):
    """A sweep.yaml written before a setting existed ran at that setting's default: resuming is allowed,
    while a setting that really differs is still refused."""
    from sparselayer.sweep import _claim_directory, _settings

    config = TrainConfig.from_mapping({"layers": "1"})
    older = _settings(config)
    del older["rl"]["reference"], older["rl"]["old_logp_pass"]
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(older))
    _claim_directory(tmp_path, config)  # no error
    with pytest.raises(ConfigError, match="other settings.*reference"):
        _claim_directory(tmp_path, TrainConfig.from_mapping({"layers": "1", "reference": "copy"}))
