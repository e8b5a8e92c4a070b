"""The frozen-feature cache: equal to live features within the storage dtype, never stale, resumable."""
import shutil

import pytest
import torch

import llm_modules.backbones as backbones
import llm_modules.features as features
from llm_modules.__main__ import main
from llm_modules.config import load_config
from llm_modules.data import build_datasets, collate
from llm_modules.model import LLMModules
from llm_modules.train import train

TINY = "configs/tiny-random.yaml"


def _setup(tmp_path, *over):
    cfg = load_config(TINY, [("train.feature_cache", "auto"), ("train.feature_cache_dir", str(tmp_path / "fc")),
                             *over], output_dir=str(tmp_path / "run"))
    model = LLMModules.from_config(cfg).eval()
    data = build_datasets(cfg.data, model.tokenizer, log=lambda *a: None)
    return cfg, model, data


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_cached_loss_equals_live_loss(tmp_path, dtype, tol):
    cfg, model, data = _setup(tmp_path, ("train.feature_dtype", dtype))
    cache = features.prepare(model.large, cfg, data, log=lambda *a: None)
    idx = [0, 3, 5, 7]
    batch = collate([data.train[i] for i in idx], model.tokenizer.pad_token_id)
    live = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
    source = cache["train"].batch(idx, batch["input_ids"].shape[1])
    cached = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], source_states=source).loss
    live, cached = float(live.detach()), float(cached.detach())
    assert abs(live - cached) < tol, (live, cached)
    assert live != cached  # really read from the (lossy) cache
    # The stored states are the live ones rounded to the storage dtype.
    ids = torch.tensor([data.train[3].input_ids])
    states = model.source_states(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])[0]
    torch.testing.assert_close(cache["train"].get(3).float(), states.to(features.DTYPES[dtype]).float())


def test_training_from_cache_never_loads_the_large_model(tmp_path, monkeypatch, capsys):
    cfg, model, data = _setup(tmp_path, ("train.max_steps", 3))
    train(cfg, resume=False)  # builds the cache with the large model, then trains from it
    real = backbones.load_backbone

    def no_large(spec, **kw):
        assert kw["where"] != "large", "the large model was loaded although the cache is complete"
        return real(spec, **kw)

    monkeypatch.setattr("llm_modules.model.load_backbone", no_large)
    progress = train(cfg, resume=False)
    assert progress.step == 3
    assert "the large model is not loaded" in capsys.readouterr().out


def test_any_change_gives_another_cache(tmp_path):
    cfg, model, data = _setup(tmp_path)
    base = features.prepare(model.large, cfg, data, log=lambda *a: None)["train"].directory
    cfg2, model2, data2 = _setup(tmp_path, ("data.system_prompt", "Be brief."))  # formatting changes the ids
    assert features.available(cfg2, data2) is None
    cfg3, model3, data3 = _setup(tmp_path, ("large.layer", 1))  # another tapped layer
    assert features.available(cfg3, data3) is None
    cfg4, _, data4 = _setup(tmp_path, ("train.feature_dtype", "bfloat16"))
    assert features.available(cfg4, data4) is None
    assert features.available(cfg, data)["train"].directory == base


def test_interrupted_build_resumes_and_never_reads_half_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(features, "SHARD_EXAMPLES", 8)
    cfg, model, data = _setup(tmp_path)
    calls = []
    real_save = features.save_tensors

    def dying_save(path, tensors, metadata=None):
        calls.append(path.name)
        if len(calls) == 3:
            (path.parent / (path.name + ".tmp")).write_bytes(b"half")  # what a kill mid-write could leave
            raise KeyboardInterrupt
        real_save(path, tensors, metadata)

    monkeypatch.setattr(features, "save_tensors", dying_save)
    with pytest.raises(KeyboardInterrupt):
        features.build_split(model.large, cfg, data.train, "train", log=lambda *a: None)
    assert features.available(cfg, data) is None  # incomplete: not used
    computed = []
    real_compute = features._compute
    monkeypatch.setattr(features, "_compute", lambda m, layer, ex, first, *a: computed.append(first) or real_compute(
        m, layer, ex, first, *a))
    monkeypatch.setattr(features, "save_tensors", real_save)
    split = features.build_split(model.large, cfg, data.train, "train", log=lambda *a: None)
    assert computed[0] == 16 and 0 not in computed and 8 not in computed  # shards 0 and 1 were kept
    assert all(split.get(i).shape[0] == len(data.train[i].input_ids) for i in range(len(data.train)))


def test_too_little_disk_stops_before_any_work(tmp_path, monkeypatch):
    cfg, model, data = _setup(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 100))
    with pytest.raises(features.UserError, match="needs .* GiB but .* free"):
        features.build_split(model.large, cfg, data.train, "train", log=lambda *a: None)
    assert not list((tmp_path / "fc").rglob("shard-*"))


def test_cache_features_cli(tmp_path, capsys):
    code = main(["cache-features", "--config", TINY, "--train.feature_cache_dir", str(tmp_path / "fc")])
    assert code == 0
    out = capsys.readouterr().out
    assert "train:" in out and "val:" in out
