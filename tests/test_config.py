"""Typed config: defaults, YAML round-trip, and every problem named by its dotted key."""
import pytest

from llm_modules import LLMModulesConfig, UserError


def test_shipped_configs_load_and_roundtrip(tmp_path):
    for name in ("tiny-random", "paper"):
        cfg = LLMModulesConfig.from_yaml(f"configs/{name}.yaml")
        cfg.save_yaml(tmp_path / f"{name}.yaml")
        assert LLMModulesConfig.from_yaml(tmp_path / f"{name}.yaml") == cfg


def test_minimal_config_gets_defaults():
    cfg = LLMModulesConfig.from_dict({"large": {"name_or_path": "Qwen/Qwen2-1.5B"},
                                      "small": {"name_or_path": "EleutherAI/gpt-neo-125M"}})
    assert (cfg.bridge.num_layers, cfg.bridge.adapter_dim, cfg.bridge.gate, cfg.bridge.residual) == (
        2, 256, "learned", "paper")
    assert (cfg.train.lr_bridge, cfg.train.lr_small, cfg.data.max_length) == (1e-4, 5e-5, 4096)
    assert cfg.small.pretrained is False and cfg.large.layer == -1


def test_all_problems_reported_together_with_keys():
    with pytest.raises(UserError) as e:
        LLMModulesConfig.from_dict({
            "large": {"config": {"model_type": "qwen2"}, "lr": 1},
            "small": {"name_or_path": 3},
            "bridge": {"gate": "maybe", "num_layers": "2"},
            "train": {"batch_size": 0},
            "lare": {},
        })
    msg = str(e.value)
    for part in ["lare: unknown key", "large.lr: unknown key", "small.name_or_path: expected str, got int",
                 "bridge.gate: 'maybe' is not one of", "bridge.num_layers: expected int, got str"]:
        assert part in msg, part


def test_value_checks():
    with pytest.raises(UserError, match="give exactly one of"):
        LLMModulesConfig.from_dict({"large": {}, "small": {"name_or_path": "x"}})
    with pytest.raises(UserError, match="train.batch_size: 0 must be >= 1"):
        LLMModulesConfig.from_dict({"large": {"name_or_path": "x"}, "small": {"name_or_path": "y"},
                                    "train": {"batch_size": 0}})
    with pytest.raises(UserError, match="bridge.dropout"):
        LLMModulesConfig.from_dict({"large": {"name_or_path": "x"}, "small": {"name_or_path": "y"},
                                    "bridge": {"dropout": 1.5}})


def test_missing_or_broken_yaml(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        LLMModulesConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("large: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        LLMModulesConfig.from_yaml(bad)


def test_paper_config_spells_out_every_field():
    import yaml

    raw = yaml.safe_load(open("configs/paper.yaml"))
    full = LLMModulesConfig.from_yaml("configs/paper.yaml").to_dict()

    def missing(r, f, pre=""):
        out = []
        for k, v in f.items():
            if k not in r:
                out.append(pre + k)
            elif isinstance(v, dict) and isinstance(r[k], dict) and k not in ("config", "overrides"):
                out += missing(r[k], v, pre + k + ".")
        return out

    assert missing(raw, full) == []
