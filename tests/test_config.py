"""Config loading: YAML + CLI overrides, type conversion, and every cross-field rule's message."""
import dataclasses
from pathlib import Path

import pytest

from grpo_scale.config import ConfigError, GRPOConfig, load_config, markdown_table, parse_cli

ROOT = Path(__file__).resolve().parent.parent


def test_default_config_is_the_embedded_one():
    cfg = load_config([])
    assert cfg.model_name_or_path == "embedded:tiny-math"
    assert Path(cfg.resolved_model_path).name == "tiny-math"


def test_cli_overrides_yaml_and_converts_types():
    cfg = load_config(["--max_steps", "7", "--learning_rate=3e-5", "--bf16", "--task_mix",
                       "arithmetic=0.7,polynomial=0.3", "--task_level", "1,2", "--delta", "null",
                       "--reward_funcs", "correctness", "--reward_weights", "2.0"])
    assert cfg.max_steps == 7 and cfg.learning_rate == 3e-5 and cfg.bf16 is True
    assert cfg.task_mix == {"arithmetic": 0.7, "polynomial": 0.3} and cfg.task_level == [1, 2]
    assert cfg.delta is None and cfg.reward_funcs == ["correctness"] and cfg.reward_weights == [2.0]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_starts_with_its_launch_command(path):
    cfg = load_config(["--config", str(path)])
    assert cfg.output_dir
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name} must start with a comment"
    assert "accelerate launch" in path.read_text().split("\n\n")[0] or "train.py" in path.read_text().split("\n\n")[0]


@pytest.mark.parametrize("path", sorted((ROOT / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_accelerate_config_parses(path):
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig
    data = yaml.safe_load(path.read_text())
    assert "mixed_precision" not in data, "precision belongs to the training config"
    cluster = ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader accepts it
    assert cluster.distributed_type == "DEEPSPEED" and cluster.deepspeed_config["zero_stage"] in (2, 3)


@pytest.mark.parametrize("argv, message", [
    (["--learning_rate", "-1"], "learning_rate must be > 0"),
    (["--epsilon_low", "1.5"], "epsilon must be in (0, 1)"),
    (["--num_generations", "1"], "num_generations must be >= 2"),
    (["--loss_type", "ppo"], "loss_type must be one of"),
    (["--importance_sampling_level", "seq"], "importance_sampling_level must be"),
    (["--scale_rewards", "std"], "scale_rewards must be group, batch or none"),
    (["--delta", "1.1"], "delta must be > 1 + epsilon_high"),
    (["--bf16", "--fp16"], "bf16 and fp16 are both true"),
    (["--task_level", "5"], "task_level must be levels among"),
    (["--task_mix", "geometry=1"], "unknown task"),
    (["--reward_weights", "1,2,3"], "reward_weights has 3 entries but reward_funcs has 2"),
    (["--num_iterations", "2", "--max_steps", "3"], "max_steps (3) is not a multiple of num_iterations (2)"),
    (["--num_iterations", "4", "--max_steps", "3"], "would stop at step 4; set max_steps to 4"),
    (["--max_steps", "ten"], "max_steps expects int"),
    (["--bf16", "maybe"], "bf16 expects bool"),
    (["--learing_rate", "1e-5"], "did you mean 'learning_rate'"),
    (["--config", "no/such/file.yaml"], "config file not found"),
    (["stray"], "unexpected argument"),
])
def test_bad_values_name_the_field_and_the_fix(argv, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(argv)
    assert message in str(e.value)


def test_global_batch_must_split_into_groups():
    with pytest.raises(ConfigError, match="not divisible by num_generations"):
        GRPOConfig(per_device_train_batch_size=6, num_generations=4).check_world(1)
    GRPOConfig(per_device_train_batch_size=2, num_generations=4).check_world(2)  # a group spans 2 ranks


def test_broken_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: 3\nlearning_rate: [1e-5\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+"):
        load_config(["--config", str(bad)])


def test_unknown_yaml_field_names_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("num_generation: 4\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown field 'num_generation'; did you mean 'num_generations'"):
        load_config(["--config", str(f)])


def test_every_field_has_help_and_the_table_lists_it():
    table = markdown_table()
    for f in dataclasses.fields(GRPOConfig):
        assert f.metadata.get("help"), f.name
        assert f"`{f.name}`" in table


def test_parse_cli_bare_flag_and_equals():
    assert parse_cli(["--config", "a.yaml", "--bf16", "--seed=3"]) == ("a.yaml", {"bf16": "true", "seed": "3"})


def test_the_readme_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, "regenerate it: python -m grpo_scale.config --markdown"


def test_the_configuration_loads_without_torch():
    """The loss family's rules are checked without torch (bf16 given: its default asks torch for a GPU)."""
    import subprocess
    import sys
    code = ("import sys; from grpo_scale.config import GRPOConfig, ConfigError\n"
            "try: GRPOConfig(loss_type='cispo', bf16=False)\n"
            "except ConfigError as e: print('cispo reads epsilon_high' in str(e), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "False"], out.stdout + out.stderr
