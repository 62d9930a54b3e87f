"""A vLLM server for ``use_vllm: true`` with ``vllm_mode: server`` (the counterpart of ``trl vllm-serve``).

    python -m grpo_scale.vllm_serve --model embedded:tiny-math --port 8000

It loads the model (the same names ``model_name_or_path`` takes: a folder, a Hub name, a .gguf file,
``embedded:...``) into one vLLM engine and answers the trainer's main process over HTTP:

- ``GET /health/``: the model, dtype and context length (the trainer waits for it at start).
- ``POST /generate/`` (JSON): prompt token ids, one seed per prompt, the sampling settings and the
  end-of-sequence ids; answers each completion's token ids and the sampler's log-prob of each token
  (after temperature, top-k and top-p: what the loss's importance-sampling correction compares with).
- ``POST /update_weights/`` (a chunked stream of tensors, ``grpo_scale.engines.write_tensor``): the policy's
  weights, parameter by parameter in the checkpoint's names, loaded into the engine as they arrive
  (vLLM's in-place reload; no second copy of the model is held).
- ``POST /logprobs/`` (JSON): prompt and completion token ids; answers the engine's log-prob of each
  completion token (temperature 1): what the weight-sync test compares with the policy's.
- ``POST /reset_prefix_cache/``: drop cached prompt keys and values (after a weight update).

Requests are served one at a time. Anyone who reaches the port can replace the weights: the default
host is 127.0.0.1; bind another (``--host 0.0.0.0``) only on a network you trust.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

logger = logging.getLogger("grpo_scale.vllm_serve")


@dataclass
class ServeArguments:
    model: str = field(default="embedded:tiny-math", metadata={"help": "Model to serve: what model_name_or_path "
                                                                         "takes (folder, Hub name, .gguf, embedded:...)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind (0.0.0.0: every interface; anyone "
                                                             "who reaches it can replace the weights)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on (the trainer's vllm_server_port)."})
    dtype: str = field(default="auto", metadata={"help": "Weights' dtype in vLLM: auto (float32 on a CPU, the "
                                                         "model's on a GPU), float32, bfloat16, float16."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs the engine spans."})
    max_model_len: Optional[int] = field(default=None, metadata={"help": "Context length (null: the model's)."})
    max_num_seqs: int = field(default=256, metadata={"help": "Most sequences decoded at once."})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "GPU memory fraction vLLM may take."})
    seed: int = field(default=0, metadata={"help": "The engine's seed (each request brings its own as well)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the model folder."})


def parse_args(argv=None) -> ServeArguments:
    from transformers import HfArgumentParser
    parser = HfArgumentParser(ServeArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def build_engine(args: ServeArguments):
    """(LLM, SamplingParams, resolved model folder, dtype name)."""
    import torch

    from grpo_scale.engines import cpu_engine_args, import_vllm
    from grpo_scale.models import resolve_model_path
    LLM, SamplingParams = import_vllm()
    path = resolve_model_path(args.model)
    on_gpu = torch.cuda.is_available()
    dtype = args.dtype if args.dtype != "auto" or on_gpu else "float32"
    kw = dict(model=path, tokenizer=path, dtype=dtype, tensor_parallel_size=args.tensor_parallel_size,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, seed=args.seed,
              logprobs_mode="processed_logprobs", trust_remote_code=args.trust_remote_code)
    if on_gpu:
        kw["gpu_memory_utilization"] = args.gpu_memory_utilization
    else:
        kw.update(cpu_engine_args(path, args.max_num_seqs, args.max_model_len, getattr(torch, dtype),
                                  args.trust_remote_code))
    # the engine in this process: weight updates reach its model directly (one worker; TP > 1 on GPUs
    # runs its workers as vLLM's own processes and the updates travel by collective_rpc)
    if args.tensor_parallel_size == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    llm = LLM(**kw)
    return llm, SamplingParams, path, str(llm.llm_engine.model_config.dtype).removeprefix("torch.")


class ChunkedReader:
    """Reads exactly n bytes at a time from an HTTP/1.1 chunked request body."""

    def __init__(self, raw):
        self.raw, self.buf, self.done = raw, bytearray(), False

    def _next_chunk(self) -> None:
        line = self.raw.readline(65537)
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while self.raw.readline(65537) not in (b"\r\n", b"\n", b""):  # trailers
                pass
            self.done = True
            return
        self.buf += self.raw.read(size)
        self.raw.readline(3)  # the CRLF after the chunk

    def read(self, n: int) -> bytes:
        while len(self.buf) < n and not self.done:
            self._next_chunk()
        if len(self.buf) < n:
            raise ValueError(f"request body ended {n - len(self.buf)} bytes early")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


def make_handler(llm, SamplingParams, path: str, dtype: str):
    from grpo_scale.engines import (Sampling, completion_of, read_tensors, reload_weights, sampling_params,
                                    sequence_logps)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):  # requests to the module's logger, not stderr lines of their own
            logger.debug("%s " + fmt, self.address_string(), *a)

        def _answer(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self) -> dict:
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"{}")

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                return self._answer(200, {"model": path, "dtype": dtype,
                                          "max_model_len": llm.llm_engine.model_config.max_model_len})
            self._answer(404, {"error": f"no GET {self.path}"})

        def do_POST(self):
            route = self.path.rstrip("/")
            try:
                if route == "/generate":
                    req = self._json()
                    s = Sampling(**req["sampling"])
                    seeds = req.get("seeds") or [None] * len(req["prompt_token_ids"])
                    if len(seeds) != len(req["prompt_token_ids"]):
                        raise ValueError("seeds and prompt_token_ids differ in length")
                    from vllm.inputs import TokensPrompt
                    prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids in req["prompt_token_ids"]]
                    params = [sampling_params(SamplingParams, s, req["stop_token_ids"], seed) for seed in seeds]
                    with lock:
                        outs = [completion_of(o) for o in llm.generate(prompts, params, use_tqdm=False)]
                    return self._answer(200, {"completion_ids": [o[0] for o in outs],
                                              "logprobs": [o[1] for o in outs]})
                if route == "/logprobs":
                    req = self._json()
                    if len(req["prompt_token_ids"]) != len(req["completion_ids"]):
                        raise ValueError("prompt_token_ids and completion_ids differ in length")
                    with lock:
                        lps = sequence_logps(llm, SamplingParams, req["prompt_token_ids"], req["completion_ids"])
                    return self._answer(200, {"logprobs": lps})
                if route == "/update_weights":
                    if "chunked" not in (self.headers.get("Transfer-Encoding") or ""):
                        raise ValueError("send the weights as a chunked stream (Transfer-Encoding: chunked)")
                    reader = ChunkedReader(self.rfile)
                    count = [0]

                    def weights():
                        for item in read_tensors(reader.read):
                            count[0] += 1
                            yield item
                    t0 = time.perf_counter()
                    with lock:
                        reload_weights(llm, weights())
                    return self._answer(200, {"tensors": count[0], "seconds": time.perf_counter() - t0})
                if route == "/reset_prefix_cache":
                    self._json()
                    with lock:
                        ok = llm.reset_prefix_cache()
                    return self._answer(200 if ok else 409, {"reset": ok})
                return self._answer(404, {"error": f"no POST {self.path}"})
            except (ValueError, KeyError, TypeError) as e:
                return self._answer(400, {"error": f"{type(e).__name__}: {e}"})
            except Exception as e:  # the server stays up for the next request
                logger.exception("request %s failed", self.path)
                return self._answer(500, {"error": f"{type(e).__name__}: {e}"})

    return Handler


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    t0 = time.perf_counter()
    llm, SamplingParams, path, dtype = build_engine(args)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(llm, SamplingParams, path, dtype))
    print(f"grpo_scale.vllm_serve: {args.model} ({dtype}) ready in {time.perf_counter() - t0:.0f}s on "
          f"http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
