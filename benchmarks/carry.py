"""The wheels to carry to a GPU machine that reaches no package index, pinned to what is installed here.

    python benchmarks/carry.py            # print the commands
    python benchmarks/carry.py --list     # print name==version only

A GPU machine keeps its own torch and triton (built for its CUDA). Everything else grpo-scale and
benchmarks/gpu_check.sh import is listed with its whole dependency closure, as installed in this
environment, minus torch, triton and NVIDIA's libraries. deepspeed is published as source only, so it is
built here into a pure-Python wheel (`pip wheel --no-deps`); the rest are downloaded as wheels. Run the
printed commands on a machine with the package index and the GPU machine's Python version and platform.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys

ROOTS = ("transformers", "accelerate", "deepspeed", "peft", "tensorboard", "safetensors", "tokenizers", "pyyaml",
         "numpy", "tqdm", "pytest", "hypothesis")
OPTIONAL = ("liger-kernel", "trl", "datasets", "flash-attn")  # benchmarks' yardsticks and the flash extra
KEEP_THEIRS = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|pytorch-triton.*)$")  # built for the machine's CUDA
SOURCE_ONLY = {"deepspeed"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots=ROOTS) -> dict[str, str]:
    """{name: installed version} of ``roots`` and everything they require (markers evaluated here),
    without the packages the GPU machine keeps (torch, triton, NVIDIA's)."""
    from packaging.requirements import Requirement
    found, todo = {}, [_norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in found or KEEP_THEIRS.match(name):
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional dependency not installed here
        found[name] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_norm(req.name))
    return dict(sorted(found.items()))


def optional_installed() -> dict[str, str]:
    out = {}
    for name in OPTIONAL:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def commands(pins: dict[str, str], optional: dict[str, str]) -> str:
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    wheels = " ".join(f"{n}=={v}" for n, v in pins.items() if n not in SOURCE_ONLY)
    built = " ".join(f"{n}=={v}" for n, v in pins.items() if n in SOURCE_ONLY)
    lines = [
        "# 1. On a machine with the package index (Linux x86_64, like the GPU machine):",
        f"pip download --no-deps --only-binary=:all: --python-version {py} --platform manylinux2014_x86_64 "
        f"--platform manylinux_2_28_x86_64 -d wheels {wheels}",
    ]
    if built:
        lines.append(f"pip wheel --no-deps -w wheels {built}   # source-only: a pure-Python wheel, built once")
    missing = [n for n in OPTIONAL if n not in optional]
    if optional:
        lines.append("# optional peers installed here (Liger, TRL: yardsticks; flash-attn needs CUDA to build):")
        lines.append("pip download --no-deps -d wheels " + " ".join(f"{n}=={v}" for n, v in optional.items()))
    if missing:
        lines.append(f"# not installed here, so not listed: {', '.join(missing)} (their benchmark rows say skipped)")
    lines += [
        "# 2. Copy wheels/ and the repository to the GPU machine, then, from the repository root:",
        "pip install --no-index --no-deps wheels/*.whl && pip install --no-index --no-deps -e .",
        "bash benchmarks/gpu_check.sh",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="name==version lines only")
    args = parser.parse_args(argv)
    pins = closure()
    if args.list:
        print("\n".join(f"{n}=={v}" for n, v in pins.items()))
    else:
        print(commands(pins, optional_installed()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
