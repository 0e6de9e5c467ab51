"""The package's shape holds: layer contracts (import-linter), no import cycles, ruff clean."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)


def test_layer_contracts_hold():
    """Lower modules never import upper ones (the layers in pyproject.toml's [tool.importlinter])."""
    lint_imports = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    done = _run(lint_imports, "--no-cache")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def _cycle(graph: grimp.ImportGraph, modules: set[str]) -> list[str] | None:
    """One import cycle among `modules` (depth-first search), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for child in sorted(graph.find_modules_directly_imported_by(module) & modules):
            if state.get(child) == 1:
                return path[path.index(child):] + [child]
            if child not in state and (found := visit(child, path + [child])):
                return found
        state[module] = 2
        return None

    for start in sorted(modules):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycles_between_modules():
    """No module reaches itself through imports (a package's __init__ re-exporting its own modules aside)."""
    graph = grimp.build_graph("sparselayer", cache_dir=None)
    modules = {m for m in graph.modules if not (ROOT / "sparselayer" / m.replace(".", "/")[len("sparselayer/"):]
                                                 / "__init__.py").is_file() and m != "sparselayer"}
    assert _cycle(graph, modules) is None, " -> ".join(_cycle(graph, modules))


def test_ruff_is_clean():
    done = _run(sys.executable, "-m", "ruff", "check", "sparselayer", "tests", "benchmarks")
    assert done.returncode == 0, done.stdout[-4000:]


def test_moved_names_keep_their_old_import_paths():
    """Module paths users were pointed to keep working as aliases of where the code lives now."""
    import sparselayer.batch
    import sparselayer.objective
    import sparselayer.sync.delta
    from sparselayer.rl.grpo import per_token_loss, tis_weights
    from sparselayer.rollout.base import Batch, collate
    from sparselayer.rollout.delta import decode_delta, encode_delta
    from sparselayer.serve import DeltaState, serve

    assert tis_weights is sparselayer.objective.tis_weights and per_token_loss is sparselayer.objective.per_token_loss
    assert encode_delta is sparselayer.sync.delta.encode_delta and decode_delta is sparselayer.sync.delta.decode_delta
    assert Batch is sparselayer.batch.Batch and collate is sparselayer.batch.collate
    assert callable(serve) and DeltaState.__module__ == "sparselayer.sync.server"
