"""Train a causal LM with GRPO.

On one CPU or GPU, the embedded demo model (configs/tiny-math.yaml):

    python train.py

On 2 processes with DeepSpeed ZeRO-2 (CPU or GPUs; set num_processes in the YAML to your GPU count):

    accelerate launch --config_file accelerate_configs/zero2.yaml train.py
    accelerate launch --config_file accelerate_configs/zero3.yaml train.py --config configs/qwen2.5-0.5b-math.yaml

Multi-node: accelerate_configs/multinode.yaml, run once per node with --machine_rank set.
Any config field can be overridden: ``train.py --config FILE --max_steps 10 --learning_rate 1e-5``.
Checkpoints every ``--save_steps N``; continue a killed run with ``--resume_from_checkpoint latest``.
"""
import os
import sys

from grpo_scale.config import ConfigError, actions, help_text, load_config, parse_cli, print_config


def _error(message: str) -> None:
    """Print an error once per distinct message across all ranks, naming the rank that raised it: the
    first rank to report a message claims it in the launcher's key-value store (every rank of a launch
    reaches it, on any node, without a collective); a rank that cannot reach the store prints anyway."""
    rank, world = os.environ.get("RANK"), int(os.environ.get("WORLD_SIZE", "1"))
    if rank is None or world == 1:
        print(f"error: {message}", file=sys.stderr)
        return
    if _first_to_say(message):
        print(f"error (rank {rank}): {message}", file=sys.stderr, flush=True)


def _store(timeout: float):
    """The launcher's key-value store (torchrun's rendezvous store, which every rank of a launch reaches on
    any node before and without a process group); None for one process, or a launcher without that store
    (it exists once the process group does)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or "MASTER_ADDR" not in os.environ:
        return None
    from datetime import timedelta

    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.distributed_c10d._get_default_store()
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # no store to reach until the process group
        return None
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout))


def _agreed(problem: str | None) -> str | None:
    """Every rank's outcome of the checks before start-up, through the launcher's store: None when all
    passed, else the problem (each rank's, named, when they differ), the same on every rank, so all stop
    instead of waiting for the rank that stopped."""
    try:
        store = _store(timeout=300)
    except Exception:  # no store: this rank's own outcome
        return problem
    if store is None:
        return problem
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    prefix = f"grpo_scale/checks/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    keys = [f"{prefix}{r}" for r in range(world)]
    try:
        store.set(f"{prefix}{rank}", problem or "")
        store.wait(keys)  # a rank that died before its checks: the store's timeout, then this rank's outcome
        outcomes = [store.get(k).decode() for k in keys]
    except Exception:
        return problem
    failed = [(r, e) for r, e in enumerate(outcomes) if e]
    if not failed:
        return None
    if len(failed) == world and len({e for _, e in failed}) == 1:
        return failed[0][1]
    return "; ".join(f"rank {r}: {e}" for r, e in failed)


def _first_to_say(message: str) -> bool:
    import hashlib
    import re
    # the same error on every rank may carry each rank's own timing ("saved ... (0.5 s after the signal)"
    # on one, 0.6 s on another): durations do not make it another message
    same = re.sub(r"\d+(?:\.\d+)? s\b", "# s", message)
    key = "grpo_scale/error/" + hashlib.sha256(same.encode()).hexdigest()
    try:
        store = _store(timeout=10)
        return store is None or store.add(key, 1) == 1
    except Exception:  # no store to agree through: better twice than not at all
        return True


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 configuration or input problem (nothing trained, or a reward function that
    raised on every item for reward_fail_steps rollouts), 3 stopped by itself after too many non-finite
    steps (a checkpoint was saved), 4 stopped by SIGTERM, SIGUSR1 or SIGINT (a checkpoint was saved and
    OUTPUT_DIR/preempted written; see grpo_scale.preemption), 5 a checkpoint could not be written (disk
    full, unwritable folder: the previous checkpoints are intact). --help, --print_config and --check exit 0
    (--check: 2 when it finds a problem)."""
    argv = sys.argv[1:] if argv is None else argv
    todo = actions(argv)
    try:
        if "help" in todo:
            print(help_text(argv))
            return 0
        if "print_config" in todo:
            print(print_config(argv))
            return 0
        cfg = load_config(argv)
        if "check" in todo:
            return check(cfg, argv)
        # Checks that need no model, before the heavy imports: the launcher has set WORLD_SIZE. The files
        # checked may differ between nodes, so all ranks agree on the outcome before any waits on another.
        problem = None
        try:
            cfg.check_world(int(os.environ.get("WORLD_SIZE", "1")))
            cfg.check_paths()
        except ConfigError as e:
            problem = str(e)
        problem = _agreed(problem)
        if problem:
            raise ConfigError(problem)
        from grpo_scale.trainer import GRPOTrainer
        trainer = GRPOTrainer(cfg)
        trainer.setup()
    except ConfigError as e:
        _error(str(e))
        return 2
    from grpo_scale.checkpoint import CheckpointError
    from grpo_scale.preemption import EXIT_SAVE_FAILED, EXIT_STOPPED
    from grpo_scale.trainer import RewardFailed, TrainingAborted, TrainingStopped
    try:
        summary = trainer.train()
        trainer.save(summary)
    except CheckpointError as e:  # every rank raised it alike (see grpo_scale.checkpoint.agree_written)
        _error(str(e))
        trainer.acc.end_training()
        _shutdown(trainer)
        return EXIT_SAVE_FAILED
    except TrainingAborted as e:
        _error(str(e))
        trainer.acc.end_training()
        _shutdown(trainer)
        return EXIT_STOPPED if isinstance(e, TrainingStopped) else 2 if isinstance(e, RewardFailed) else 3
    if trainer.acc.is_main_process:
        before, after = summary["eval_accuracy_before"], summary["eval_accuracy_after"]
        accuracy = (f"held-out accuracy {before:.3f} -> {after:.3f}" if before is not None and after is not None
                    else "no held-out accuracy (no answer column)")
        print(f"done: {summary['steps']} steps in {summary['wall_seconds']:.0f}s; {accuracy}; outputs in "
              f"{cfg.output_dir}")
    _shutdown(trainer)
    return 0


def check(cfg, argv) -> int:
    """``--check``: everything that can be checked without loading a model (the config's rules, the
    batch split over --num_processes N, the model folder, data files and their rows, the reward
    functions and the columns they need, the output folder), so a launch does not start W ranks to
    fail. Raises ConfigError for the first problem."""
    _, overrides = parse_cli(argv)
    try:
        world = int(overrides.get("num_processes", os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ConfigError(f"--num_processes expects a number, got {overrides['num_processes']!r}") from None
    cfg.check_world(world)
    from grpo_scale.trainer import GRPOTrainer
    GRPOTrainer(cfg).check_inputs(world)
    for note in getattr(cfg, "notes", []):
        print(f"note: {note}")
    print(f"ok: the config, files, data and reward functions check out for {world} process(es); "
          f"outputs go to {cfg.output_dir}")
    return 0


def _shutdown(trainer=None) -> None:
    """Tear the process group down before the interpreter exits: left to exit handlers, a gloo or
    DeepSpeed communication thread can abort a rank after all work is done (a spurious non-zero exit).
    A vLLM engine in this process is shut down first (its own teardown destroys the process group)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    engine = getattr(trainer, "engine", None)
    if engine is not None:
        engine.close()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
