"""The weight-push path: carrying the trained layer's changed weights to the rollout engine.

- `changes`: which trained tensors changed since the last push (widened to vLLM's fused groups).
- `delta`: the sparse bf16 layer-delta codec (C++ twin in `sparselayer._C`) and the checkpoint reads.
- `vllm_layout`: the head-padding plan and padded model folder for vLLM's CPU attention.
- `vllm_push`: loaders run inside an in-process vLLM worker to load pushed tensors in place.
- `server` / `client`: `sparselayer serve` (vLLM's OpenAI server + POST /sparselayer/delta) and
  the HTTP client that pushes deltas to it.
- `check`: --check-sync, the engine's log-probs of a fixed sequence against the trainer's.

Nothing here imports vLLM or FastAPI at package import; `sync` never imports `sparselayer.rollout`.
"""
