"""The run directory: resolved config, metrics.jsonl, atomic checkpoints of what changes, resume.

Layout: config.yaml, metrics.jsonl (one JSON line per step), checkpoints/step-N/{trained.safetensors,
state.pt, meta.json}, summary.json. A checkpoint is written into a hidden temporary folder and
renamed into place, so a kill at any moment leaves either the old or the new checkpoint, whole.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from .errors import RunError

CHECKPOINT_PREFIX = "step-"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and an atomic rename."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, fsync and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the user's usual permissions
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_umask() -> int:
    """The process's umask (read once at import: setting it is process-wide and not thread-safe)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


class RunDir:
    """One training run's folder on disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"
        self.config_path = self.path / "config.yaml"
        self.summary_path = self.path / "summary.json"

    def create(self) -> RunDir:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        for stale in self.checkpoints.glob(".tmp-*"):  # left by a kill during a save
            shutil.rmtree(stale, ignore_errors=True)
        return self

    def has_run(self) -> bool:
        return self.config_path.exists() or self.latest_checkpoint() is not None

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise RunError(f"{self.path} is not a sparselayer run directory (no config.yaml)")
        try:
            data = yaml.safe_load(self.config_path.read_text()) or {}
        except yaml.YAMLError:
            raise RunError(f"{self.config_path} is not valid YAML") from None
        if not isinstance(data, dict):
            raise RunError(f"{self.config_path} does not hold a mapping of settings")
        return data

    def read_summary(self) -> dict[str, Any]:
        """The run's summary.json ({} before the first one is written): results, base/final accuracy."""
        if not self.summary_path.is_file():
            return {}
        try:
            data = json.loads(self.summary_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunError(f"{self.summary_path} is not valid JSON") from None
        if not isinstance(data, dict):
            raise RunError(f"{self.summary_path} does not hold a summary (a JSON object)")
        return data

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Replace summary.json atomically (a kill leaves the old summary or the new one, whole)."""
        atomic_write_text(self.summary_path, json.dumps(summary, indent=2) + "\n")

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line and flush it to disk."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip().startswith("{") and line.strip().endswith("}")]

    def truncate_metrics(self, last_step: int) -> None:
        """Drop lines of steps after `last_step` (logged after the checkpoint a resume starts from)."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= last_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def checkpoint_steps(self) -> list[int]:
        steps = []
        for d in self.checkpoints.glob(CHECKPOINT_PREFIX + "*"):
            suffix = d.name[len(CHECKPOINT_PREFIX):]
            if suffix.isdigit() and (d / "meta.json").exists():
                steps.append(int(suffix))
        return sorted(steps)

    def latest_checkpoint(self) -> Path | None:
        steps = self.checkpoint_steps()
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{steps[-1]}" if steps else None

    def save_checkpoint(self, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                        meta: dict[str, Any], keep: int = 2) -> Path:
        """Write trained tensors, optimizer/RNG state and metadata atomically; keep the newest `keep`."""
        self.create()
        final = self.checkpoints / f"{CHECKPOINT_PREFIX}{step}"
        tmp = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=f".tmp-{step}-"))
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "trained.safetensors"))
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            self._discard(final)
        os.rename(tmp, final)
        for old in self.checkpoint_steps()[:-keep]:
            self._discard(self.checkpoints / f"{CHECKPOINT_PREFIX}{old}")
        return final

    def _discard(self, path: Path) -> None:
        trash = path.with_name(f".tmp-trash-{path.name}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        """Trained tensors, optimizer/RNG state and metadata of one checkpoint folder."""
        try:
            tensors = load_file(str(path / "trained.safetensors"))
            state = torch.load(path / "state.pt", weights_only=False)
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, RuntimeError, ValueError) as exc:
            raise RunError(f"checkpoint {path} is unreadable: {str(exc).splitlines()[0]}") from None
        return tensors, state, meta
