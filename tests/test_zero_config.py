"""ZeroConfig validation and DeepSpeed-config parsing."""
import json

import pytest
import torch

from zerocore.zero.config import ZeroConfig


@pytest.mark.parametrize("kwargs,match", [
    ({"stage": 4}, "stage=4"),
    ({"lr": -1.0}, "lr=-1.0"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"bucket_size": 0}, "bucket_size"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
    ({"dtype": "int8"}, "dtype='int8'"),
    ({"offload_optimizer": "gpu"}, "offload_optimizer='gpu'"),
    ({"collective_strategy": "ring"}, "collective_strategy"),
])
def test_bad_options_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZeroConfig(**kwargs)


def test_unknown_and_unavailable_options():
    with pytest.raises(TypeError, match="unknown ZeroOptimizer option"):
        ZeroConfig.from_kwargs(stages=2)
    with pytest.raises(ValueError, match="needs nvme_path"):
        ZeroConfig(offload_optimizer="nvme")
    with pytest.raises(ValueError, match="buffer_count=0 must be a positive integer"):
        ZeroConfig(offload_optimizer="nvme", nvme_path="/x", buffer_count=0)
    with pytest.raises(ValueError, match="sub_group_size=1.5 must be a positive integer"):
        ZeroConfig(offload_optimizer="nvme", nvme_path="/x", sub_group_size=1.5)
    with pytest.raises(ValueError, match="offload_param='nvme' needs offload_optimizer='nvme' too"):
        ZeroConfig(stage=3, offload_param="nvme")
    with pytest.raises(ValueError, match="needs stage=3"):
        ZeroConfig(stage=2, offload_param="nvme", offload_optimizer="nvme", nvme_path="/x")


def test_nvme_options_from_deepspeed():
    cfg = ZeroConfig.from_deepspeed({"zero_optimization": {
        "stage": 3, "sub_group_size": 1e8,
        "offload_optimizer": {"device": "nvme", "nvme_path": "/local_nvme", "buffer_count": 6},
        "offload_param": {"device": "nvme", "nvme_path": "/local_nvme", "buffer_count": 7}}})
    assert (cfg.offload_optimizer, cfg.nvme_path, cfg.buffer_count, cfg.sub_group_size) == \
        ("nvme", "/local_nvme", 6, 100_000_000)
    assert (cfg.offload_param, cfg.param_buffer_count) == ("nvme", 7)


def test_messages_point_only_at_what_exists():
    with pytest.raises(ValueError) as e:
        ZeroConfig(stage=0)
    assert "use 1 (optimizer state partitioned), 2 (also gradients) or 3 (also parameters)" in str(e.value)
    with pytest.raises(ValueError) as e:
        ZeroConfig(offload_optimizer="gpu")
    assert "None, 'cpu' or 'nvme'" in str(e.value)
    with pytest.raises(ValueError, match="sync_module_states"):
        ZeroConfig(sync_module_states="yes")


def test_frozen_and_normalised():
    cfg = ZeroConfig(dtype="bf16", betas=[0.8, 0.9])
    assert cfg.dtype == torch.bfloat16 and cfg.betas == (0.8, 0.9)
    with pytest.raises(Exception):
        cfg.stage = 1
    assert cfg.updated(stage=1).stage == 1


def test_from_deepspeed(tmp_path):
    ds = {"zero_optimization": {"stage": 1, "reduce_bucket_size": 123, "overlap_comm": False,
                                "offload_optimizer": {"device": "cpu"}},
          "gradient_accumulation_steps": 4, "gradient_clipping": 1.0,
          "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}},
          "fp16": {"enabled": True, "initial_scale_power": 12, "hysteresis": 1}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = ZeroConfig.from_deepspeed(str(path))
    assert (cfg.stage, cfg.bucket_size, cfg.overlap_comm, cfg.offload_optimizer) == (1, 123, False, "cpu")
    assert (cfg.gradient_accumulation_steps, cfg.gradient_clipping, cfg.lr, cfg.betas) == (4, 1.0, 3e-4, (0.9, 0.95))
    assert cfg.dtype == torch.float16 and cfg.initial_scale_power == 12 and cfg.hysteresis == 1
    with pytest.raises(ValueError, match="optimizer type 'SGD'"):
        ZeroConfig.from_deepspeed({"optimizer": {"type": "SGD"}})
