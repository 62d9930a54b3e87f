"""Launch settings and device dispatch for the Triton kernels, in one place."""
from __future__ import annotations

import torch
import triton

# Under the interpreter every block is a NumPy call, so bigger blocks mean fewer Python steps; tests
# lower this to make small vocabularies span several blocks.
INTERPRETER_MAX_BLOCK_V = 1024
# On a GPU a row is streamed in blocks of at most this many elements (registers, not shared memory).
GPU_MAX_BLOCK_V = 8192


def is_interpreted(kernel) -> bool:
    """Whether `kernel` was decorated while TRITON_INTERPRET=1 (Triton decides at decoration time)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_device(name: str, tensor: torch.Tensor, kernel) -> None:
    """Refuses to run a Triton kernel where it cannot: never fall back silently to another path."""
    if tensor.is_cuda or is_interpreted(kernel):
        return
    raise ValueError(
        f"{name} runs Triton kernels, which need CUDA tensors; got {tensor.device}. On a CPU, use the "
        "eager grpo_scale.kernels.reference functions, or set TRITON_INTERPRET=1 before importing "
        "grpo_scale.kernels.grpo_loss to run the kernels in Triton's (slow) interpreter"
    )


def row_config(V: int, kernel) -> dict:
    """Block size over the vocabulary and warps for the row kernels (one program per token row)."""
    if is_interpreted(kernel):
        return {"BLOCK_V": min(triton.next_power_of_2(V), INTERPRETER_MAX_BLOCK_V)}
    block = min(triton.next_power_of_2(V), GPU_MAX_BLOCK_V)
    return {"BLOCK_V": block, "num_warps": 16 if block >= 4096 else (8 if block >= 1024 else 4)}
