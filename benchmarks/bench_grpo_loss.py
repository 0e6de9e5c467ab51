"""Memory and time of GRPO loss forward + backward through a frozen LM head: fused vs naive.

naive: what a standard trainer does: logits from the LM head in the model's dtype (a bfloat16 matmul on
  CUDA), then float32 log_softmax and gather over the materialized tokens x vocab logits, then the same loss;
fused: sparselayer.kernels.grpo_loss (chunked PyTorch on CPU, Triton on CUDA), the same objective on
sparselayer.kernels.head_logprobs;
fused-torch: the chunked PyTorch backend on any device (sparselayer.kernels.fused_grpo_loss);
fused-recompute: the same without its one-pass forward: logsumexp only, the backward recomputes every tile
  (three matmuls instead of two; what the one-pass forward saves);
liger: Liger-Kernel's LigerFusedLinearGRPOLoss with its defaults (torch.compile'd loss math, one sequence
  per chunk; sequences of 1024 tokens), where liger_kernel is installed; the frozen head gets no gradient.

On CPU every (method, tokens, vocab) point runs in a fresh child process, so one run's allocator
caches cannot hide another's memory (the resident set counts them). On CUDA the points run in this
process, one after another: the allocator's peak counts live bytes only, its cache is emptied between
points, and one process saves a CUDA start per point. Peak EXTRA memory is measured after the inputs exist:
  CPU  rss_extra   peak resident set size over the first (cold) forward + backward minus the resident
                   size before it (VmHWM reset through /proc/self/clear_refs; a 1 ms /proc/self/statm
                   sampling thread where that is not allowed). Counts everything: torch, MKL, malloc.
       alloc_extra peak of live bytes of the torch CPU allocator over one forward + backward, from
                   torch.profiler memory events.
  CUDA alloc_extra torch.cuda.max_memory_allocated() minus memory_allocated() before the run.
Time: median wall time of --reps warm forward + backward runs.

    python benchmarks/bench_grpo_loss.py          # tokens {1k, 8k, 32k} x vocab {32k, 152k}, where memory allows
    python benchmarks/bench_grpo_loss.py --tokens 1024 8192 --vocab 32768   # the quick CPU subset

A naive point whose ~4 fp32 tokens x vocab tensors would not fit in --memory-limit-gb (default: 80% of
the memory free now) is skipped, and the reason is printed and kept in the JSON; so is, on CPU, any
point over --max-cpu-tflop of forward + backward work (about 6 x tokens x vocab x hidden flop).
--reps 0 measures memory only.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "grpo_loss.json"
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 2**20
METHODS = ("naive", "fused", "fused-torch", "fused-recompute", "liger")
LIGER_SEQ_LEN = 1024


# ---------------------------------------------------------------------------------------------- memory probes


def _status_kib(field: str) -> int:
    """One 'kB' field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_bytes() -> int:
    """Current resident set size from /proc/self/statm."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


class RssPeak:
    """Peak RSS over a block: the kernel's high-water mark when it can be reset, else a 1 ms sampler."""

    def __enter__(self) -> RssPeak:
        self.base = _rss_bytes()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM"
        except OSError:
            self.method = "statm sampling"
            self._samples = [self.base]
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._samples.append(_rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.method == "VmHWM":
            self.peak = _status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._samples + [_rss_bytes()])
        self.extra = max(0, self.peak - self.base)


def allocator_peak_cpu(fn) -> int:
    """Peak live bytes of torch's CPU allocator while fn runs (torch.profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# ---------------------------------------------------------------------------------------------- one point


def make_inputs(tokens: int, vocab: int, hidden: int, dtype: torch.dtype, device: str, beta: float) -> dict:
    """Seeded random loss inputs: hidden (requires grad), frozen head weight, per-token GRPO tensors."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=g)).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 2 / hidden**0.5).to(device, dtype)
    old = torch.log(torch.tensor(1.0 / vocab)) + 0.3 * torch.randn(tokens, generator=g)
    return dict(hidden=h, weight=w, targets=torch.randint(0, vocab, (tokens,), generator=g).to(device),
                old_logp=old.to(device), advantages=torch.randn(tokens, generator=g).to(device),
                token_weights=torch.full((tokens,), 1.0 / tokens, device=device), epsilon=0.2, epsilon_high=0.28,
                beta=beta, ref_logp=(old + 0.1).to(device) if beta > 0 else None)


def step_fn(method: str, inputs: dict, chunk_tokens: int | None, chunk_vocab: int | None):
    """A closure running forward + backward of one method and dropping the gradient afterwards (tiles of the
    chunked PyTorch head: the head's defaults for the device where None)."""
    from sparselayer.kernels import fused_grpo_loss, grpo_loss

    head = importlib.import_module("sparselayer.kernels.head_logprobs")  # the package exports a function by that name
    cuda = inputs["hidden"].is_cuda
    if chunk_tokens is None:
        chunk_tokens = head.CUDA_CHUNK_TOKENS if cuda else head.DEFAULT_CHUNK_TOKENS
    if chunk_vocab is None:
        chunk_vocab = head.CUDA_CHUNK_VOCAB if cuda else head.DEFAULT_CHUNK_VOCAB

    if method == "liger":
        return liger_step_fn(inputs)

    def run() -> None:
        if method == "naive":
            loss = naive_grpo_loss(**inputs)
        elif method == "fused" and inputs["hidden"].is_cuda:
            loss, _ = grpo_loss(**inputs)
        elif method == "fused-recompute":
            loss = recompute_grpo_loss(inputs, chunk_tokens, chunk_vocab)
        else:
            loss, _ = fused_grpo_loss(**inputs, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
        loss.backward()
        inputs["hidden"].grad = None

    return run


def naive_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor,
                    advantages: torch.Tensor, token_weights: torch.Tensor, epsilon: float, epsilon_high: float,
                    beta: float, ref_logp: torch.Tensor | None) -> torch.Tensor:
    """The loss as a standard trainer computes it: materialized logits in the model's dtype (its LM head's
    matmul), log-probs in float32 (TRL's selective_log_softmax upcasts them), the same objective."""
    from sparselayer.kernels.grpo_loss import weighted_loss

    logits = (hidden @ weight.T).float()
    logp = logits.log_softmax(dim=-1).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return weighted_loss(logp, old_logp, advantages, token_weights, epsilon, epsilon_high, beta, ref_logp)


def recompute_grpo_loss(inputs: dict, chunk_tokens: int, chunk_vocab: int) -> torch.Tensor:
    """The chunked PyTorch head without its one-pass forward (logsumexp only; the backward recomputes the tiles)."""
    import dataclasses

    from sparselayer.kernels.grpo_loss import weighted_loss
    from sparselayer.kernels.head_logprobs import head_logprobs_with, torch_kernels

    kernels = dataclasses.replace(torch_kernels(chunk_tokens, chunk_vocab), lse_target_and_mean=None)
    logp = head_logprobs_with(kernels, inputs["hidden"], inputs["weight"], inputs["targets"])
    rest = {k: v for k, v in inputs.items() if k not in ("hidden", "weight", "targets")}
    return weighted_loss(logp, **rest)


def liger_step_fn(inputs: dict, seq_len: int = LIGER_SEQ_LEN):
    """Forward + backward of Liger-Kernel's LigerFusedLinearGRPOLoss (as TRL builds it: its defaults, the
    clip range and beta of this benchmark) on the same tokens cut into sequences of `seq_len`."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    h, tokens = inputs["hidden"], inputs["targets"].shape[0]
    rows = max(1, tokens // seq_len)
    shape = (rows, tokens // rows)
    loss_fn = LigerFusedLinearGRPOLoss(beta=inputs["beta"], use_ref_model=inputs["beta"] > 0,
                                       epsilon_low=inputs["epsilon"], epsilon_high=inputs["epsilon_high"])
    ref = inputs["ref_logp"].view(shape) if inputs["ref_logp"] is not None else None

    def run() -> None:
        loss, _ = loss_fn(h.view(*shape, -1), inputs["weight"], inputs["targets"].view(shape),
                          torch.ones(shape, device=h.device), inputs["advantages"].view(shape)[:, 0],
                          ref_per_token_logps=ref, old_per_token_logps=inputs["old_logp"].view(shape))
        loss.backward()
        h.grad = None

    return run


def measure(method: str, tokens: int, vocab: int, hidden: int, dtype: str, device: str, reps: int, beta: float,
            chunk_tokens: int | None, chunk_vocab: int | None) -> dict:
    """Peak extra memory and median time of one (method, tokens, vocab) point, in this process."""
    inputs = make_inputs(tokens, vocab, hidden, getattr(torch, dtype), device, beta)
    run = step_fn(method, inputs, chunk_tokens, chunk_vocab)
    result = dict(method=method, tokens=tokens, vocab=vocab, hidden=hidden, dtype=dtype, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        result["alloc_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        with RssPeak() as rss:
            run()
        result.update(rss_extra_bytes=rss.extra, rss_method=rss.method, alloc_extra_bytes=allocator_peak_cpu(run))
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    result.update(time_s=statistics.median(times) if times else None, times_s=times)
    return result


# ---------------------------------------------------------------------------------------------- driver


def naive_bytes(tokens: int, vocab: int) -> int:
    """What the naive path needs at its peak: ~4 fp32 tokens x vocab tensors (logits, softmax, grads)."""
    return 4 * tokens * vocab * 4


def naive_fits(tokens: int, vocab: int, device: str, limit_bytes: float) -> bool:
    """Whether the naive path's ~4 fp32 tokens x vocab tensors fit under the memory limit."""
    return naive_bytes(tokens, vocab) <= limit_bytes


def work_tflop(tokens: int, vocab: int, hidden: int) -> float:
    """Forward + backward matmul work of the loss in TFLOP: logits twice, dH once (2 flop per multiply-add)."""
    return 6 * tokens * vocab * hidden / 1e12


def available_bytes(device: str) -> float:
    """Free memory now: MemAvailable on CPU, free device memory on CUDA."""
    if device == "cuda":
        return float(torch.cuda.mem_get_info()[0])
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024.0
    return float("inf")


def run_worker(script: str | Path, payload: dict) -> tuple[dict | None, str]:
    """Run `script --worker PAYLOAD` in a fresh Python process (clean allocator, honest peak);
    return its last JSON line (None when it failed) and its stderr."""
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(payload)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    ok = proc.returncode == 0 and lines
    return (json.loads(lines[-1]) if ok else None), proc.stderr


def run_child(point: dict) -> dict:
    """Measure one point in a fresh process; a failure becomes the point's `error`."""
    result, stderr = run_worker(__file__, point)
    return result if result is not None else dict(point, error=(stderr.strip().splitlines() or ["failed"])[-1])


def run_in_process(point: dict) -> dict:
    """Measure one CUDA point in this process (the allocator's peak counts live bytes only); a failure,
    out-of-memory included, becomes the point's `error`."""
    try:
        return measure(**point)
    except Exception as exc:  # noqa: BLE001 - the table shows which point failed and why
        return dict(point, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    finally:
        torch.cuda.empty_cache()


def _cell(row: dict | None, key: str, fmt) -> str:
    """One table cell: the formatted value, the row's error (truncated), or '-'."""
    if row is None:
        return "-"
    if row.get(key) is not None:
        return fmt(row[key])
    return row["error"].split(":")[0] if "error" in row else "-"


def format_table(rows: list[dict]) -> str:
    """Markdown table: one line per (tokens, vocab), the methods side by side (time, peak extra memory) and
    each against naive (memory share, speed-up); the alloc columns beside RSS on CPU."""
    mem = "rss_extra_bytes" if any("rss_extra_bytes" in r for r in rows) else "alloc_extra_bytes"
    label = mem.removesuffix("_bytes")
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    others = [m for m in methods if m != "naive"] if "naive" in methods else []
    head = (["tokens", "vocab"] + [f"{m} time s" for m in methods] + [f"{m} {label} MiB" for m in methods]
            + ([f"{m} alloc MiB" for m in methods] if mem != "alloc_extra_bytes" else [])
            + [f"{m}/naive mem" for m in others] + [f"naive/{m} time" for m in others])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    secs, mib = (lambda t: f"{t:.3f}"), (lambda b: f"{b / MiB:.1f}")
    for tokens, vocab in sorted({(r["tokens"], r["vocab"]) for r in rows}):
        by = {r["method"]: r for r in rows if (r["tokens"], r["vocab"]) == (tokens, vocab)}
        cells = [str(tokens), str(vocab)] + [_cell(by.get(m), "time_s", secs) for m in methods]
        cells += [_cell(by.get(m), mem, mib) for m in methods]
        if mem != "alloc_extra_bytes":
            cells += [_cell(by.get(m), "alloc_extra_bytes", mib) for m in methods]
        cells += [_ratio(by.get(m), by.get("naive"), mem, "{:.1%}") for m in others]
        cells += [_ratio(by.get("naive"), by.get(m), "time_s", "{:.2f}x") for m in others]
        out.append("| " + " | ".join(cells) + " |")
    reasons = sorted({f"{r['method']} {r['tokens']} x {r['vocab']}: {r['error']}" for r in rows if "error" in r})
    return "\n".join(out + [""] * bool(reasons) + reasons)


def _ratio(top: dict | None, bottom: dict | None, key: str, fmt: str) -> str:
    """top[key] / bottom[key] formatted, or '-' where either is missing."""
    if not top or not bottom or top.get(key) is None or not bottom.get(key):
        return "-"
    return fmt.format(top[key] / bottom[key])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; token and vocab defaults depend on the device."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 151936])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--methods", nargs="+", default=["naive", "fused"], choices=METHODS,
                   help="naive fused (default); fused-torch: the chunked PyTorch backend on CUDA too; liger: "
                        "Liger-Kernel's LigerFusedLinearGRPOLoss (skipped where liger_kernel is not installed)")
    p.add_argument("--reps", type=int, default=3, help="timed warm runs per point (median reported)")
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="tile of the chunked PyTorch head (default: the head's own, 1024 on CPU, 2048 on CUDA)")
    p.add_argument("--chunk-vocab", type=int, default=None,
                   help="tile of the chunked PyTorch head (default: the head's own, 4096 on CPU, 16384 on CUDA)")
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="skip naive points needing more (default: 80%% of free memory)")
    p.add_argument("--max-cpu-tflop", type=float, default=1.0,
                   help="on CPU, skip points with more forward + backward work (default 1.0: up to 8k x 32k)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every requested point (a child process each on CPU), print the table, write JSON after every point
    (so a run stopped early keeps what it measured). Method by method: a slow or failing method comes last."""
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(**json.loads(args.worker))))
        return 0
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cuda = device == "cuda"
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    limit = args.memory_limit_gb * 2**30 if args.memory_limit_gb else 0.8 * available_bytes(device)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu_count=os.cpu_count(), device=device,
                device_name=torch.cuda.get_device_name(0) if cuda else "cpu")
    rows: list[dict] = []
    for method in args.methods:
        for n in args.tokens:
            for v in args.vocab:
                point = dict(method=method, tokens=n, vocab=v, hidden=args.hidden, dtype=dtype, device=device,
                             reps=args.reps, beta=args.beta, chunk_tokens=args.chunk_tokens,
                             chunk_vocab=args.chunk_vocab)
                reason = skip_reason(point, cuda, limit, args.max_cpu_tflop)
                rows.append(dict(point, error=reason) if reason else
                            run_in_process(point) if cuda else run_child(point))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                write_results(args.output, meta, rows)
    print(format_table(rows))
    print(f"wrote {args.output}")
    return 0


def skip_reason(point: dict, cuda: bool, limit_bytes: float, max_cpu_tflop: float) -> str | None:
    """Why a point is not measured (CPU work over the cap, naive over the memory limit, Liger not installed)."""
    n, v, hidden = point["tokens"], point["vocab"], point["hidden"]
    if not cuda and work_tflop(n, v, hidden) > max_cpu_tflop:
        return f"skipped: ~{work_tflop(n, v, hidden):.1f} TFLOP per run on CPU, over --max-cpu-tflop {max_cpu_tflop:g}"
    if point["method"] == "naive" and not naive_fits(n, v, point["device"], limit_bytes):
        return f"skipped: needs ~{naive_bytes(n, v) / 2**30:.0f} GiB, limit {limit_bytes / 2**30:.0f} GiB"
    if point["method"] == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return "skipped: liger_kernel not installed"
    return None


def write_results(output: Path, meta: dict, rows: list[dict]) -> None:
    """The JSON (meta, rows, table) written atomically: a reader never sees half a file."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(json.dumps(dict(meta=meta, results=rows, table=format_table(rows)), indent=2) + "\n")
    os.replace(tmp, output)


if __name__ == "__main__":
    raise SystemExit(main())
