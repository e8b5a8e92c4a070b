"""Typed configuration: dataclasses with defaults, validated on construction, YAML round-trip.

Every section is a dataclass; `LLMModulesConfig.from_dict` rejects unknown keys and wrong types with the
dotted key's name, collecting all problems into one message. Saved beside every checkpoint, so a model is
rebuilt from that file alone.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import UserError, collect

DTYPES = ("float32", "bfloat16", "float16")
BENCHMARK_TRAIN = ("facts", "gsm8k")  # benchmarks with a train split that data.benchmarks can read


@dataclass
class ModelSpec:
    """One Hugging Face causal LM: by hub id / local path, or by an inline config dict (random weights)."""

    name_or_path: Optional[str] = None
    config: Optional[dict] = None  # inline HF config, e.g. {model_type: qwen2, hidden_size: 64, ...}
    # Config fields changed on top of the named model's config (e.g. max_position_embeddings for a random GPT-Neo).
    overrides: dict = field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    revision: Optional[str] = None
    gguf_file: Optional[str] = None  # a GGUF file inside name_or_path (transformers dequantizes it)

    def problems(self, where: str) -> list[str]:
        if (self.name_or_path is None) == (self.config is None):
            return [f"{where}: give exactly one of `name_or_path` (hub id or local path) or `config` (inline dict)"]
        if self.config is not None and "model_type" not in self.config:
            return [f"{where}.config: needs a `model_type` (e.g. qwen2, llama, gpt_neo, gpt2, gemma3_text)"]
        return []

    @property
    def identity(self) -> str:
        """What names this model for checkpoint compatibility checks."""
        if self.name_or_path is not None:
            name = f"{self.name_or_path}" + (f"@{self.revision}" if self.revision else "")
        else:
            name = "inline:" + yaml.safe_dump(self.config, sort_keys=True).replace("\n", " ").strip()
        if self.overrides:
            name += " overrides:" + yaml.safe_dump(self.overrides, sort_keys=True).replace("\n", " ").strip()
        return name


@dataclass
class LargeConfig(ModelSpec):
    # Index into the large model's hidden states: 0 = embeddings, L = last layer; -1 = the last hidden state.
    layer: int = -1
    # coupling: prompt: several hidden states read at once (e.g. [14, -1]: a middle layer, where factual recall
    # peaks, and the last), each normalized on its own and concatenated along the width; replaces `layer`.
    layers: Optional[list] = None

    @property
    def read_layers(self) -> tuple[int, ...]:
        """The hidden states the large model gives: `layers`, else (`layer`,)."""
        return tuple(self.layers) if self.layers else (self.layer,)

    def problems(self, where: str) -> list[str]:
        out = super().problems(where)
        if self.layers is None:
            return out
        if len(self.layers) < 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers):
            out.append(f"{where}.layers: {self.layers!r} must list two or more layer indices (e.g. [14, -1]); for "
                       f"one, set {where}.layer")
        elif len(set(self.layers)) != len(self.layers):
            out.append(f"{where}.layers: {self.layers!r} names a layer twice")
        if self.layer != -1:
            out.append(f"{where}.layer: {self.layer} and {where}.layers: {self.layers!r} both given; "
                       f"{where}.layers replaces {where}.layer: remove one")
        return out


@dataclass
class SmallConfig(ModelSpec):
    # Load the small model's pretrained weights (True) or build it from its config with random weights (False, as
    # the paper's code does for GPT-Neo-125M).
    pretrained: bool = False
    gradient_checkpointing: bool = False


@dataclass
class BridgeConfig:
    num_layers: int = 2
    num_heads: int = 8
    adapter_dim: int = 256
    dropout: float = 0.1
    gate: Literal["learned", "fixed", "none"] = "learned"
    gate_value: float = 0.5  # used when gate == "fixed"
    # "paper": x = x + layer(x), where layer already returns g*a + (1-g)*x (the reference's double residual);
    # "plain": x = layer(x).
    residual: Literal["paper", "plain"] = "paper"
    seed: int = 0  # seeds the random initialization of the bridge, the new LM head and a random small model
    every: int = 4  # coupling: prompt: a gated cross-attention layer after every `every`-th small block
    # "paper": random bridge, small model and head (the paper). "large": start at the large model's own predictions
    # (identity small blocks, a truncated read-out of its states, its head refitted; warm_start.py), applied when a
    # training run starts; coupling: stream with large.layer: -1 only.
    init: Literal["paper", "large"] = "paper"

    def problems(self, where: str) -> list[str]:
        out = []
        if self.num_layers < 0:
            out.append(f"{where}.num_layers: {self.num_layers} must be >= 0")
        if self.num_heads < 1:
            out.append(f"{where}.num_heads: {self.num_heads} must be >= 1")
        if self.adapter_dim < 1:
            out.append(f"{where}.adapter_dim: {self.adapter_dim} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"{where}.dropout: {self.dropout} must be in [0, 1)")
        if self.every < 1:
            out.append(f"{where}.every: {self.every} must be >= 1")
        if not 0.0 <= self.gate_value <= 1.0:
            out.append(f"{where}.gate_value: {self.gate_value} must be in [0, 1]")
        return out


@dataclass
class DataConfig:
    """Where training text comes from and how it becomes (input_ids, labels)."""

    # A local .json / .jsonl / .parquet file, or a Hugging Face dataset id (users with hub access).
    path: Optional[str] = None
    hub_subset: Optional[str] = None  # e.g. "main" for openai/gsm8k
    hub_split: str = "train"
    # reasoning-gym generators (offline): task names, examples per task, generator seed.
    reasoning_gym_tasks: list = field(default_factory=list)
    reasoning_gym_size: int = 200
    # Held out by template: these reasoning-gym tasks form the validation set (none of their items is trained on).
    reasoning_gym_val_tasks: list = field(default_factory=list)
    # Held-out data: an explicit file / dataset, else a fixed seeded fraction of the training records.
    val_path: Optional[str] = None
    val_fraction: float = 0.05
    seed: int = 0
    format: Literal["paper", "chat_template"] = "paper"
    # "paper" = the paper's system prompt (prompts.py), "" = none, anything else is used verbatim.
    system_prompt: str = "paper"
    loss_on: Literal["assistant", "all"] = "assistant"
    max_length: int = 4096  # longer examples are filtered out (counted), as in the paper
    max_examples: Optional[int] = None
    skip_bad: bool = False
    # reasoning-gym's gsm_symbolic and GSM8K test are evaluation data; training on them needs this explicit switch.
    allow_test_derived: bool = False
    # Benchmark train splits as training data (tasks.py): "facts" (questions about the train subjects; the held-out
    # subjects are `eval --task facts`), "gsm8k" (gsm8k/train), read from `benchmark_dir` (None: $LLM_MODULES_DATA,
    # else ../shared/data; "hub": the usual dataset ids).
    benchmarks: list = field(default_factory=list)
    benchmark_dir: Optional[str] = None
    # The answer of a facts training record: "object" (the missing words alone, as the question asks) or "sentence"
    # (the sentence completed, "Rio de Janeiro is part of Brazil.", the form the large model answers in).
    facts_answer: Literal["object", "sentence"] = "object"

    def problems(self, where: str) -> list[str]:
        out = []
        if not 0.0 <= self.val_fraction < 1.0:
            out.append(f"{where}.val_fraction: {self.val_fraction} must be in [0, 1)")
        if self.max_length < 2:
            out.append(f"{where}.max_length: {self.max_length} must be >= 2")
        if self.max_examples is not None and self.max_examples < 1:
            out.append(f"{where}.max_examples: {self.max_examples} must be >= 1")
        unknown = [b for b in self.benchmarks if b not in BENCHMARK_TRAIN]
        if unknown:
            out.append(f"{where}.benchmarks: {', '.join(map(repr, unknown))} not one of {', '.join(BENCHMARK_TRAIN)}")
        return out


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    epochs: int = 1
    max_steps: Optional[int] = None  # optimizer steps; stops early when reached
    batch_size: int = 4
    grad_accum: int = 1
    lr_bridge: float = 1e-4
    lr_small: float = 5e-5  # 0 = the small model frozen where it starts (its head too unless lr_head is set)
    # Two stages, as LLaVA trains its projector before the language model: the small model (and the head that trains
    # with it) stays where it starts until this step, the bridge training alone, then trains with its own warm-up and
    # schedule over the remaining steps. 0 = one stage. One process only (DDP fixes what trains when it wraps).
    small_from_step: int = 0
    # The new LM head's learning rate: None = lr_small (the paper: one group with the small model); 0 = frozen where
    # it starts (no gradient, no optimizer state; still saved), e.g. at the warm start's read-out of the large model.
    lr_head: Optional[float] = None
    # The prompt coupling's tanh gates (one scalar alpha per memory layer, starting closed at 0): None = lr_bridge.
    # Adam moves a scalar by about its learning rate per step, so this rate bounds how fast a gate can open.
    lr_gate: Optional[float] = None
    weight_decay: float = 0.01
    warmup_steps: int = 10
    schedule: Literal["cosine", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # fp32 is the fast choice on CPUs without bf16 units
    eval_every: int = 100
    save_every: int = 100
    # Keep the checkpoints of step 0 and of every multiple of keep_every (learning curves; weights only once they are
    # not among the latest two); None = the latest two only.
    keep_every: Optional[int] = None
    # False: the checkpoint of a run's last step (max_steps, or an early stop) holds no optimizer state (two thirds of
    # its size under AdamW): quicker to write, but the finished run cannot be continued with more steps.
    save_final_optimizer: bool = True
    patience: Optional[int] = 5  # validations without improvement before stopping; None = never stop early
    seed: int = 0
    feature_cache: Literal["off", "auto"] = "off"
    feature_dtype: Literal["float16", "bfloat16"] = "float16"
    feature_cache_dir: Optional[str] = None  # None = <weights cache>/features, shared by runs (keyed by fingerprint)
    tensorboard: bool = False
    skip_nonfinite: int = 0
    num_threads: Optional[int] = None
    # Distillation (the baseline arm): weight w of the KL to the large model's own next-token distribution,
    # loss = (1 - w) * CE + w * T^2 * KL; the teacher's states come from the feature cache. 0 = off.
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    # A falling (or rising) weight: distill_weight up to step distill_decay_from, then linear to distill_weight_end
    # at the last step (max_steps, the learning-rate schedule's horizon too). None = distill_weight throughout.
    distill_weight_end: Optional[float] = None
    distill_decay_from: int = 0
    # The training loss through the head 512 positions at a time (losses.chunked_cross_entropy): the (N, V) logits
    # are never held whole (at V = 151,936 and 4,096 positions, 2.5 GB in fp32); the head's matmul runs once more.
    chunked_loss: bool = False

    def problems(self, where: str) -> list[str]:
        out = []
        if self.chunked_loss and (self.distill_weight > 0 or (self.distill_weight_end or 0) > 0):
            out.append(f"{where}.chunked_loss: distillation (distill_weight > 0) needs the head's logits at every "
                       "target position; set chunked_loss: false")
        for name in ("epochs", "batch_size", "grad_accum", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                out.append(f"{where}.{name}: {getattr(self, name)} must be >= 1")
        if self.keep_every is not None and self.keep_every < 1:
            out.append(f"{where}.keep_every: {self.keep_every} must be >= 1 (or null)")
        if self.max_steps is not None and self.max_steps < 0:
            out.append(f"{where}.max_steps: {self.max_steps} must be >= 0")
        if not 0.0 <= self.distill_weight <= 1.0:
            out.append(f"{where}.distill_weight: {self.distill_weight} must be in [0, 1]")
        if self.distill_weight_end is not None and not 0.0 <= self.distill_weight_end <= 1.0:
            out.append(f"{where}.distill_weight_end: {self.distill_weight_end} must be in [0, 1] (or null)")
        if self.distill_weight_end is not None and self.distill_weight == 0:
            out.append(f"{where}.distill_weight_end: set, but distillation is off (distill_weight: 0); "
                       "distill_weight is the weight the schedule starts from")
        if self.distill_decay_from < 0:
            out.append(f"{where}.distill_decay_from: {self.distill_decay_from} must be >= 0")
        if self.distill_temperature <= 0:
            out.append(f"{where}.distill_temperature: {self.distill_temperature} must be > 0")
        if self.lr_head is not None and self.lr_head < 0:
            out.append(f"{where}.lr_head: {self.lr_head} must be >= 0 (or null: lr_small)")
        if self.lr_gate is not None and self.lr_gate < 0:
            out.append(f"{where}.lr_gate: {self.lr_gate} must be >= 0 (or null: lr_bridge)")
        for name in ("lr_bridge", "lr_small", "weight_decay", "max_grad_norm", "warmup_steps", "skip_nonfinite",
                     "small_from_step"):
            if getattr(self, name) < 0:
                out.append(f"{where}.{name}: {getattr(self, name)} must be >= 0")
        return out


@dataclass
class LLMModulesConfig:
    large: LargeConfig = field(default_factory=LargeConfig)
    small: SmallConfig = field(default_factory=SmallConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    # Tokenizer of the large model: None = the large model's own (name_or_path); "byte-level" = a 259-entry
    # byte tokenizer built offline (tests, tiny-random); or any hub id / local path.
    tokenizer: Optional[str] = None
    # Output vocabulary of the new LM head; None = len(tokenizer), or the large config's vocab_size.
    vocab_size: Optional[int] = None
    # "stream": the paper's coupling (the small model reads only the bridge output, position by position);
    # "none": the small model alone with its own token embeddings over the same vocabulary (the baseline arm);
    # "prompt": the large model reads the prompt once, the small model (own tokenizer, embeddings and head) decodes
    # alone, attending to that memory through gated cross-attention every `bridge.every` blocks.
    coupling: Literal["stream", "none", "prompt"] = "stream"
    # coupling: prompt: the small model's tokenizer (None = the small model's own, from small.name_or_path).
    small_tokenizer: Optional[str] = None
    data: DataConfig = field(default_factory=lambda: DataConfig())
    train: TrainConfig = field(default_factory=lambda: TrainConfig())

    def __post_init__(self) -> None:
        problems = self.large.problems("large") + self.small.problems("small") + self.bridge.problems("bridge")
        problems += self.data.problems("data") + self.train.problems("train")
        if self.vocab_size is not None and self.vocab_size < 1:
            problems.append(f"vocab_size: {self.vocab_size} must be >= 1")
        if self.bridge.init == "large":  # the large model's own prediction, read from its last state by the bridge
            if self.coupling != "stream":
                problems.append(f"bridge.init: large needs coupling: stream (the paper's bridge), not {self.coupling!r}")
            if self.large.layer != -1:
                problems.append(f"bridge.init: large needs large.layer: -1 (the state the large model's head reads), "
                                f"not {self.large.layer}")
        if self.large.layers is not None and self.coupling != "prompt":
            problems.append(f"large.layers: only coupling 'prompt' reads several layers, not {self.coupling!r}; "
                            "set large.layer instead")
        if self.train.lr_gate is not None and self.coupling != "prompt":
            problems.append(f"train.lr_gate: only coupling 'prompt' has tanh gates, not {self.coupling!r}; "
                            "leave it unset")
        collect(problems, "invalid config")

    # ---- dict / YAML round-trip -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "LLMModulesConfig":
        if not isinstance(d, dict):
            raise UserError(f"{where}: expected a mapping with sections large/small/bridge, got {type(d).__name__}")
        problems: list[str] = []
        kwargs = _build_fields(cls, d, "", problems)
        collect(problems, f"invalid config ({where})")
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> "LLMModulesConfig":
        return cls.from_dict(load_yaml(path), where=str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save_yaml(self, path: Union[str, Path]) -> None:
        from .files import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **sections: Any) -> "LLMModulesConfig":
        """A copy with some sections or fields changed, e.g. cfg.replace(bridge={"gate": "fixed"})."""
        d = self.to_dict()
        for k, v in sections.items():
            d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
        return type(self).from_dict(d)


def load_yaml(path: Union[str, Path]) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"config file {p} is not valid YAML: {e}") from None
    return d if d is not None else {}


# ---- generic typed construction -----------------------------------------------------------------------
def _type_name(t: Any) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _check_value(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_value(value, inner, key, problems)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            problems.append(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {type(value).__name__}")
            return None
        return tp(**_build_fields(tp, value, key + ".", problems))
    base = origin or tp
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is list and isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        problems.append(f"{key}: expected {_type_name(base)}, got {type(value).__name__} {value!r}")
    return value


def _build_fields(cls: type, d: dict, prefix: str, problems: list[str]) -> dict:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            problems.append(f"{prefix}{k}: unknown key; allowed: {', '.join(sorted(names))}")
    out = {}
    for k, v in d.items():
        if k in names:
            out[k] = _check_value(v, hints[k], prefix + k, problems)
    return out


# ---- config + dotted overrides --------------------------------------------------------------------------------
def parse_overrides(pairs: list[str]) -> list[tuple[str, object]]:
    """["--train.lr_bridge", "1e-4", ...] -> [("train.lr_bridge", 1e-4)]; values are read as YAML scalars."""
    out, i = [], 0
    while i < len(pairs):
        key = pairs[i]
        if not key.startswith("--") or len(key) < 3:
            raise UserError(f"unrecognized argument {key!r}; overrides look like --section.key VALUE "
                            "(e.g. --train.lr_bridge 1e-4) or --key VALUE for a top-level key (e.g. --coupling none)")
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(pairs):
                raise UserError(f"override {key} needs a value")
            raw, i = pairs[i + 1], i + 2
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string; a number is what is meant
        out.append((key[2:], value))
    return out


def load_config(path: str, overrides: list[tuple[str, object]] = (), **train: object) -> "LLMModulesConfig":
    """A YAML config with dotted overrides applied and the non-None `train` fields set."""
    d = load_yaml(path)
    for key, value in overrides:
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override --{key}: {p} is not a section")
        node[leaf] = value
    for k, v in train.items():
        if v is not None:
            d.setdefault("train", {})[k] = v
    return LLMModulesConfig.from_dict(d, where=path)
