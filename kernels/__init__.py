"""GRPO loss: the fused Triton kernel (grpo_loss) and the eager reference (reference)."""
