"""LoRA through peft, in one process: the merged final weights, the refusals that prevent silently wrong
gradients, continuing an adapter folder (its reference is the adapter as loaded), and resuming with other
LoRA settings. LoRA under every launch and with the other features is in test_matrix.py; LoRA
kill-and-resume in test_resume.py."""
import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from grpo_scale import lora
from grpo_scale.config import ConfigError, GRPOConfig, load_config
from grpo_scale.trainer import GRPOTrainer

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "grpo_scale" / "assets" / "tiny-math"
FAST = ["--eval_size", "4", "--eval_batch_size", "4", "--max_completion_length", "12", "--report_to", "none",
        "--per_device_train_batch_size", "8", "--num_generations", "4", "--learning_rate", "2e-3",
        "--temperature", "2.0", "--cpu_threads", "1", "--use_peft", "true"]


def tiny(tied: bool = True, seed: int = 0):
    """The embedded model's architecture, random weights; untied on request (the head its own matrix)."""
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(EMBEDDED)
    config.tie_word_embeddings = tied
    return AutoModelForCausalLM.from_config(config).eval()


def cfg_of(*args) -> GRPOConfig:
    return load_config(FAST + list(args))


def randomise_adapters(peft_model, seed: int = 1) -> None:
    """lora_B starts at zero (the adapter is a no-op): give every adapter weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_config_uses_trl_names_and_defaults():
    cfg = GRPOConfig()
    assert (cfg.use_peft, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
            cfg.lora_modules_to_save, cfg.lora_task_type) == (False, 16, 32, 0.05, None, None, "CAUSAL_LM")
    assert lora.lora_config(cfg_of("--lora_target_modules", "all-linear")).target_modules == "all-linear"
    assert lora.lora_config(cfg_of("--lora_target_modules", "q_proj,o_proj")).target_modules == {"q_proj", "o_proj"}
    default = lora.wrap(tiny(), cfg_of(), None, reference=False)
    wrapped = sorted({n.rsplit(".", 1)[-1] for n, m in default.named_modules() if hasattr(m, "lora_A")})
    assert wrapped == ["q_proj", "v_proj"]  # peft's default for the architecture
    for bad, msg in ((["--lora_r", "0"], "lora_r must be >= 1"), (["--lora_dropout", "1"], "lora_dropout"),
                     (["--lora_task_type", "SEQ_CLS"], "CAUSAL_LM")):
        with pytest.raises(ConfigError, match=msg):
            cfg_of(*bad)


@pytest.mark.parametrize("targets, to_save", [("all-linear", None), ("q_proj,v_proj,lm_head", None),
                                              ("q_proj", "lm_head")])
def test_merged_state_dict_is_peft_merge_and_leaves_the_model_as_it_was(targets, to_save):
    """The merged weights equal peft's own merge_and_unload, under the base model's names, and the live
    model is bit-for-bit what it was (the merge is undone by restoring, not subtracting)."""
    args = ["--lora_target_modules", targets] + (["--lora_modules_to_save", to_save] if to_save else [])
    peft_model = lora.wrap(tiny(tied=False), cfg_of(*args), None, reference=False)
    randomise_adapters(peft_model)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    merged = lora.merged_state_dict(peft_model)
    after = peft_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    want = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert merged.keys() == want.keys()
    assert max(float((merged[k] - want[k]).abs().max()) for k in want) <= 1e-6
    plain = tiny(tied=False)
    plain.load_state_dict(merged)
    ids = torch.randint(3, 263, (2, 11))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, peft_model.eval()(ids).logits, atol=1e-5)


@pytest.mark.parametrize("args, match", [
    (["--lora_target_modules", "q_proj,embed_tokens"], "ties its input and output embeddings"),
    (["--lora_modules_to_save", "lm_head"], "ties its input and output embeddings"),
    (["--lora_modules_to_save", "embed_tokens"], "ties its input and output embeddings"),
])
def test_tied_embeddings_with_an_adapter_on_them_are_refused(args, match):
    """Both models here tie their embeddings: merging an embedding adapter would change the head too."""
    with pytest.raises(ConfigError, match=match):
        lora.wrap(tiny(tied=True), cfg_of(*args), None, reference=False)


@pytest.mark.parametrize("args", [["--lora_target_modules", "q_proj,lm_head"], ["--lora_modules_to_save", "lm_head"]])
def test_fused_linear_with_a_trained_head_is_refused(args):
    """fused_linear multiplies by the head's weight itself: a LoRA head would lose its update. The same
    settings with the loss on logits (triton, eager) are accepted."""
    with pytest.raises(ConfigError, match="loss_impl fused_linear reads the output head's weight.*loss_impl triton"):
        lora.wrap(tiny(tied=False), cfg_of("--loss_impl", "fused_linear", *args), None, reference=False)
    lora.wrap(tiny(tied=False), cfg_of("--loss_impl", "triton", *args), None, reference=False)


def test_a_target_the_model_lacks_is_a_config_error():
    with pytest.raises(ConfigError, match="LoRA: .*no_such_proj"):
        lora.wrap(tiny(), cfg_of("--lora_target_modules", "no_such_proj"), None, reference=False)


def make_adapter(tmp_path) -> Path:
    """An adapter folder on the embedded model, with non-zero weights (as a finished LoRA run leaves)."""
    base = AutoModelForCausalLM.from_pretrained(EMBEDDED)
    peft_model = lora.wrap(base, cfg_of(), None, reference=False)
    randomise_adapters(peft_model, seed=3)
    out = tmp_path / "adapter"
    peft_model.save_pretrained(out)
    return out


def test_an_adapter_folder_needs_use_peft_and_a_base(tmp_path):
    adapter = make_adapter(tmp_path)
    with pytest.raises(ConfigError, match="is a LoRA adapter .*set use_peft true"):
        GRPOConfig(model_name_or_path=str(adapter), use_peft=False, output_dir=str(tmp_path / "o")).check_paths()
    GRPOConfig(model_name_or_path=str(adapter), use_peft=True, output_dir=str(tmp_path / "o")).check_paths()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="the base model of the adapter in .*gone is not a directory"):
        GRPOConfig(model_name_or_path=str(adapter), use_peft=True, output_dir=str(tmp_path / "o")).check_paths()


def test_continuing_an_adapter_starts_from_it_and_it_is_the_reference(tmp_path):
    """model_name_or_path an adapter folder: training starts from its weights, and with beta > 0 the
    reference log-probs are the adapter's as loaded (not the bare base), before and after steps."""
    from peft import PeftModel
    adapter = make_adapter(tmp_path)
    cfg = cfg_of("--model_name_or_path", str(adapter), "--beta", "0.04", "--max_steps", "2",
                 "--output_dir", str(tmp_path / "out"))
    trainer = GRPOTrainer(cfg)
    trainer.setup()
    start = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(EMBEDDED), adapter).eval()
    bare = AutoModelForCausalLM.from_pretrained(EMBEDDED).eval()
    trainer.grpo_step(trainer.generate_and_score())  # the adapter moves
    batch = trainer.generate_and_score()
    ro = batch["rollout"]
    with torch.no_grad():
        want = trainer._logps(start, ro)
        off = trainer._logps(bare, ro)
        policy = trainer._logps(trainer.model, ro)
    mask = ro.completion_mask.bool()
    assert float((batch["ref_logps"] - want)[mask].abs().max()) <= 1e-5
    assert float((off - want)[mask].abs().max()) > 1e-3          # the adapter is not a no-op
    assert float((policy - want)[mask].abs().max()) > 1e-4       # the trained copy moved; the reference did not
    trainer.grpo_step(batch)
    trainer.save(trainer.train())
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert not (tmp_path / "out" / "adapter" / lora.REF_ADAPTER).exists()  # the reference copy is not saved
    assert saved["r"] == 16


def test_resuming_with_other_lora_settings_is_refused(tmp_path):
    out = tmp_path / "out"
    args = ["--max_steps", "1", "--save_steps", "1", "--eval_size", "0", "--output_dir", str(out)]
    trainer = GRPOTrainer(cfg_of(*args))
    trainer.setup()
    trainer.save(trainer.train())
    for other, what in ((["--lora_r", "8"], "of another shape"), (["--lora_target_modules", "q_proj"], "unexpected")):
        resumed = GRPOTrainer(cfg_of(*args, "--max_steps", "2", "--resume_from_checkpoint", "latest", *other))
        with pytest.raises(ConfigError, match=f"not this run's LoRA adapter.*{what}"):
            resumed.setup()


@pytest.mark.parametrize("config", ["llama-3.2-1b-math-lora.yaml", "smollm2-135m-math-lora.yaml"])
def test_the_llama_lora_configs_wrap_every_decoder_linear_and_not_the_tied_head(config):
    """The LoRA configs of Llama-architecture models (Llama 3.2, SmolLM2) on Llama's architecture (small,
    random, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = load_config(["--config", str(ROOT / "configs" / config)])
    assert cfg.use_peft and cfg.lora_target_modules == ["all-linear"]
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                         tie_word_embeddings=True))
    peft_model = lora.wrap(model, cfg, None, reference=False)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
