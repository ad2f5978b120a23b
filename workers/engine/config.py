"""EngineConfig: every knob of one engine (torch-free, so the serving config can take its defaults from here)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    model: str  # HF model dir (config.json + *.safetensors [+ index]) or a .gguf file
    drafter: str | None = None  # the proposer's checkpoint (DFlash: a z-lab format dir); None = AR only for DFlash
    proposer: str = "dflash"  # which Proposer drafts (workers/speculative/proposer.py registry)
    dtype: str = "auto"  # auto: bfloat16 on CUDA and on CPUs with AMX / AVX512-BF16, else float32
    device: str = "auto"  # "cpu" | "cuda" | "cuda:N"
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max positions
    kv_block_size: int = 16  # tokens per KV-cache block
    kv_cache_bytes: int | None = None  # pool size on CPU (default 512 MiB)
    gpu_memory_utilization: float = 0.85
    spec_block_size: int = 16  # default SpecParams.block_size: anchor + drafts (vLLM num_speculative_tokens + 1)
    seed: int = 0
    cuda_graphs: bool = False  # workers/engine/graph_runner.py: CUDA graphs on GPU (tp == 1), static-buffer replay on CPU
    calibrate_step_costs: bool = False  # time AR / speculative steps at start-up (workers/engine/calibrate.py): the router's step costs
    check_cpu_kernels: bool = True  # workers/engine/kernel_check.py: kernels vs torch at start-up, off if they disagree
    cpu_packed_weights: bool = True  # workers/models/packed.py: oneDNN-reordered bf16 weights where the CPU has native bf16
