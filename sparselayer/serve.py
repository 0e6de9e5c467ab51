"""Compatibility alias: `sparselayer serve` lives in `sparselayer.sync.server`."""
from .model.layout import check_model_dir
from .sync.server import CPU_KV_CACHE_BYTES, DeltaState, build_router, refused_tensors, serve, vllm_args

__all__ = ["CPU_KV_CACHE_BYTES", "DeltaState", "build_router", "check_model_dir", "refused_tensors", "serve",
           "vllm_args"]
