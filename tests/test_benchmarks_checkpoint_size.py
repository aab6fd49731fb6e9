"""benchmarks.checkpoint_size: the meta-device count against a real tiny model's checkpoint, and --quick end to end."""

from __future__ import annotations

import json

import torch

import benchmarks.checkpoint_size as cs
import benchmarks.sd3_model as sd3
from lit_diffac.frozen_weights import strip_frozen


def test_meta_count_equals_a_real_tiny_models_saved_checkpoint(tmp_path):
    computed = cs.sd3_lora_sizes(sd3.TINY_SD3, serialize=False)
    module, options = sd3.build_sd3_module(sd3.TINY_SD3, device="cpu")  # same configs, real random weights
    assert options["backbone"]["lora_rank"] == 32 and options["reward_dtype"] == torch.bfloat16  # the SD3.5 recipe
    backbone = module.backbone
    policy = backbone.policy_parameters()
    trainable = [*policy, *backbone.critic_parameters()]

    # LoRA: peft's own count of the adapter = the count from the matched Linear layers = the meta count
    from peft.utils import get_peft_model_state_dict

    peft_count = sum(t.numel() for t in get_peft_model_state_dict(backbone.denoiser, adapter_name="policy").values())
    assert peft_count == cs.lora_params_arithmetic(backbone.denoiser) == computed["lora"]["params"] > 0
    assert computed["lora"]["params_arithmetic"] == peft_count
    assert all(p.dtype == torch.float32 for p in policy)

    # the whole state dict (before) and what lit_diffac.frozen_weights keeps (after), as torch.save writes them
    full = module.state_dict()
    kept = dict(full)
    strip_frozen(kept, module, trainable)
    assert cs.tensor_bytes(full) == computed["before"]["state_dict_bytes"]
    assert cs.tensor_bytes(kept) == computed["after"]["state_dict_bytes"]
    assert len(kept) == computed["after"]["state_dict_keys"] < len(full) == computed["before"]["state_dict_keys"]
    assert not any(k.startswith("rewards.") or (k.startswith("backbone.") and "lora_" not in k) for k in kept)

    # real AdamW states (one step) of the actor (LoRA) and the critic (value head)
    states = []
    for params in (trainable, list(module.value_head.parameters())):
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        states.append(optimizer.state_dict())
    assert cs.tensor_bytes(states) == computed["after"]["optimizer_bytes"]

    after_file, before_file = tmp_path / "after.ckpt", tmp_path / "before.ckpt"
    torch.save({"state_dict": kept, "optimizer_states": states}, after_file)
    torch.save({"state_dict": full, "optimizer_states": states}, before_file)
    for path, expected in ((after_file, computed["after"]["bytes"]), (before_file, computed["before"]["bytes"])):
        size = path.stat().st_size  # tensor bytes + the pickle / zip records of each tensor
        assert expected <= size <= expected * 1.02 + 1_000_000, (path.name, size, expected)


def test_quick_run_writes_results_with_the_expected_keys(tmp_path):
    out = tmp_path / "checkpoint_size_quick"
    assert cs.main(["--quick", "--iterations", "1", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["command"].startswith("python -m benchmarks.checkpoint_size --quick")
    assert {"platform", "cpu_count", "torch"} <= result["machine"].keys()
    assert {"date", "runtime_s", "toy", "sd35m", "notes"} <= result.keys()

    (row,) = result["toy"]["rows"]  # toy DiT recipe at batch 2, 1 iteration, critic replay checkpointed
    assert row["iterations"] == 1 and "--model.init_args.batch_size=2" in row["overrides"]
    after, before = row["after"], row["before"]
    sections = after["sections_bytes"]
    assert set(sections) == {"state_dict", "optimizer_states", "critic_replay", "other_tensors", "rest_of_file"}
    assert sum(sections.values()) == after["file_bytes"]
    assert sections["critic_replay"] > 0 and sections["optimizer_states"] > 0 and row["frozen_keys_removed"] > 0
    assert before["state_dict_bytes"] > sections["state_dict"] and before["file_bytes"] > after["file_bytes"]
    assert abs(before["file_bytes_from_sections"] - before["file_bytes"]) < 0.01 * before["file_bytes"]
    assert row["after_over_before"] == round(after["file_bytes"] / before["file_bytes"], 4)
    replay = row["critic_replay"]
    assert replay["capacity_iterations"] == 32 and replay["entries_in_checkpoint"] == 1
    assert replay["full_bytes_computed"] == 32 * replay["bytes_per_iteration"]

    sd = result["sd35m"]
    assert {"lora", "value_head", "components", "after", "before", "after_over_before"} <= sd.keys()
    assert sd["after"]["bytes"] < sd["before"]["bytes"] and sd["after"]["serialized"]["file_bytes"] > 0
    assert sd["lora"]["params"] == sd["lora"]["params_arithmetic"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| run |" in md and "after / before" in md
