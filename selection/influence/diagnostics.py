"""Is a gradient feature matrix informative? Cheap summary statistics of stored features.

Cosine influence only ranks examples when their features point in different directions.
When the warmup checkpoint is barely trained (a few optimizer steps, so Adam's second
moment is tiny and ``m / sqrt(v)`` saturates) every example's feature ends up close to
one shared direction: scores then mostly reflect that direction, not the example. The
statistics, computed on the L2-normalized rows:

- ``mean_feature_norm``: norm of the mean row over all rows. Isotropic features give
  about ``1 / sqrt(n_rows)``; features sharing one direction give close to 1.
- ``mean_pairwise_cosine``: mean cosine over distinct pairs of a seeded sample of at
  most ``sample_size`` rows (about 0 when isotropic).
- ``saturated_share``: share of coordinates within 10% of their row's largest absolute
  value, averaged over the sample (1 for sign-like rows, near 0 for Gaussian-like ones).

``collapsed``: ``mean_feature_norm > COLLAPSE_MEAN_NORM`` with at least
``MIN_ROWS_TO_JUDGE`` rows (with fewer, even isotropic rows have a large mean).

Train and target (val) features are judged apart. The pool's common directions removed before the
cosine (``selection.influence.directions``) are fitted on train rows only: they centre the train
features but can leave the target features collapsed, so an influence run measures its target
features as scored (after the removal) and is never called informative while they are collapsed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from selection.influence import influence_store

COLLAPSE_MEAN_NORM = 0.5
# Isotropic unit rows have E|mean|^2 = 1/n (+ pairwise terms of variance ~2/(n^2 dim)): at 8 rows
# 0.125, half the threshold's 0.5^2 = 0.25 and 4 standard deviations below it already at 32 dims,
# while rows with mean pairwise cosine c have |mean|^2 = 1/n + (1 - 1/n) c (0.76 at c = 0.72). So a
# target set of 8-10 val rows can be judged; below 8 the 1/n term alone nears the threshold (1/4 at 4).
MIN_ROWS_TO_JUDGE = 8
SATURATION_FRACTION = 0.9
DEFAULT_SAMPLE_SIZE = 512
_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class FeatureDiagnostics:
    n_rows: int
    dim: int
    mean_feature_norm: float | None  # None without rows
    mean_pairwise_cosine: float | None  # None with fewer than two rows
    saturated_share: float | None
    n_sampled: int
    collapsed: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for logs and metadata."""
        if self.mean_feature_norm is None:
            return "no rows"
        cosine = "n/a" if self.mean_pairwise_cosine is None else f"{self.mean_pairwise_cosine:.2f}"
        return (
            f"mean-feature norm {self.mean_feature_norm:.2f} over {self.n_rows} rows, mean pairwise cosine "
            f"{cosine} ({self.n_sampled} sampled), saturated share {self.saturated_share:.2f}"
        )


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def feature_diagnostics(blocks: Any, sample_size: int = DEFAULT_SAMPLE_SIZE, seed: int = 0) -> FeatureDiagnostics:
    """Diagnostics of a ``[n, dim]`` feature matrix given whole, as a view supporting contiguous row
    slices (e.g. features with the common directions removed, read chunk by chunk), or as row blocks
    (e.g. the memory-mapped shards of a store); see the module docstring. One pass, in chunks."""
    if sample_size < 2:
        raise ValueError(f"sample_size must be >= 2, got {sample_size}")
    parts: Sequence[Any] = [blocks] if hasattr(blocks, "shape") else list(blocks)
    if any(len(part.shape) != 2 for part in parts):
        raise ValueError("features must be 2-d [rows, dim] arrays")
    dims = {part.shape[1] for part in parts}
    if len(dims) > 1:
        raise ValueError(f"feature blocks differ in dim: {sorted(dims)}")
    dim = dims.pop() if dims else 0
    n_rows = sum(part.shape[0] for part in parts)
    if n_rows == 0:
        return FeatureDiagnostics(0, dim, None, None, None, 0, False)
    chosen = np.sort(np.random.default_rng(seed).choice(n_rows, size=min(n_rows, sample_size), replace=False))
    total = np.zeros(dim, dtype=np.float64)
    sampled = []
    offset = 0
    for part in parts:
        for start in range(0, part.shape[0], _CHUNK_ROWS):
            block = _unit_rows(part[start : start + _CHUNK_ROWS])
            total += block.sum(axis=0, dtype=np.float64)
            lo = offset + start
            inside = chosen[(chosen >= lo) & (chosen < lo + len(block))] - lo
            if inside.size:
                sampled.append(block[inside])
        offset += part.shape[0]
    mean_norm = float(np.linalg.norm(total / n_rows))
    sample = np.concatenate(sampled)
    m = sample.shape[0]
    # Sum of all pairwise cosines from the norm of the sum: no m x m matrix.
    summed = sample.sum(axis=0, dtype=np.float64)
    self_similarity = float(np.sum(np.einsum("ij,ij->i", sample, sample, dtype=np.float64)))
    cosine = float((summed @ summed - self_similarity) / (m * (m - 1))) if m > 1 else None
    magnitude = np.abs(sample)
    row_max = magnitude.max(axis=1, keepdims=True)
    nonzero = row_max[:, 0] > 0
    saturated = (magnitude >= SATURATION_FRACTION * row_max).mean(axis=1)
    saturated_share = float(saturated[nonzero].mean()) if nonzero.any() else 0.0
    collapsed = n_rows >= MIN_ROWS_TO_JUDGE and mean_norm > COLLAPSE_MEAN_NORM
    return FeatureDiagnostics(n_rows, dim, mean_norm, cosine, saturated_share, m, collapsed)


def scored_entry(epoch: int, result: FeatureDiagnostics) -> dict[str, Any]:
    """What an influence run records of one checkpoint's features as scored (``influence_runs``)."""
    return {
        "epoch": epoch,
        "n_rows": result.n_rows,
        "mean_feature_norm": result.mean_feature_norm,
        "mean_pairwise_cosine": result.mean_pairwise_cosine,
        "collapsed": result.collapsed,
    }


def _figures(norm: float | None, cosine: float | None, n_rows: int) -> str:
    norm_text = "n/a" if norm is None else f"{norm:.2f}"
    cosine_text = "n/a" if cosine is None else f"{cosine:.2f}"
    return f"mean-feature norm {norm_text}, mean pairwise cosine {cosine_text} over {n_rows} rows"


@dataclass(frozen=True)
class SideCollapse:
    """Whether one side's (train or target) features were collapsed as the scores used them."""

    kind: str  # "train" or "target"
    collapsed: bool | None  # None: nothing was measured
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"collapsed": self.collapsed, "detail": self.detail}


@dataclass(frozen=True)
class CollapseAssessment:
    informative: bool | None
    reason: str
    train: SideCollapse
    target: SideCollapse

    def metadata(self) -> dict[str, Any]:
        """Train and target collapse, reported apart (None: not measured)."""
        return {
            "train_features_collapsed": self.train.collapsed,
            "train_collapse": self.train.detail,
            "target_features_collapsed": self.target.collapsed,
            "target_collapse": self.target.detail,
        }


def _scored_side(kind: str, entries: Sequence[dict[str, Any]], how: str) -> SideCollapse:
    bad = [e for e in entries if e["collapsed"]]
    shown = bad[0] if bad else max(entries, key=lambda e: e["mean_feature_norm"] or 0.0)
    verdict = f"collapsed in {len(bad)} of {len(entries)} checkpoints" if bad else "not collapsed"
    figures = _figures(shown["mean_feature_norm"], shown["mean_pairwise_cosine"], shown["n_rows"])
    detail = f"{kind} features as scored{how}: {verdict} (epoch {shown['epoch']}: {figures})"
    return SideCollapse(kind, bool(bad), detail)


def _stored_side(kind: str, rows: Sequence[tuple], note: str = "") -> SideCollapse:
    bad = [row for row in rows if row[7]]
    shown = bad[0] if bad else rows[0]
    _, epoch, shard, _, n_rows, norm, cosine, _ = shown
    where = f"epoch {epoch}{f' shard {shard}' if shard else ''}"
    verdict = f"collapsed in {len(bad)} of {len(rows)} stores" if bad else "not collapsed"
    return SideCollapse(
        kind, bool(bad), f"{kind} features as stored: {verdict} ({where}: {_figures(norm, cosine, n_rows)}){note}"
    )


def assess_collapse(
    con: Any,
    model: str,
    warmup_run_key: str,
    key: influence_store.FeatureKey,
    dropped_directions: int = 0,
    scored: dict[str, Any] | None = None,
) -> CollapseAssessment:
    """Whether the features behind an influence run are informative, train and target judged apart.

    ``scored`` is what the run measured on the features as it scored them (``{"train": [...],
    "target": [...]}`` of :func:`scored_entry`; train only when directions were removed, since
    otherwise the stored train features are what was scored). Without it (runs recorded before it
    was measured) the stored diagnostics of those features stand in.

    The target side as scored is collapsed -> never informative: the directions are fitted on train
    rows, so removing them does not de-collapse the targets. The train side: as stored with no
    directions removed; as scored when they were; a run without train measurements as scored that
    removed directions is taken to have removed the shared direction (it is fitted on those rows).
    ``informative`` is None when nothing was measured."""
    rows = influence_store.latest_diagnostics(con, model, warmup_run_key, key)
    scored = scored or {}
    train_rows = [row for row in rows if row[0] == "train"]
    target_rows = [row for row in rows if row[0] == "target"]
    removal = f" (after removing the pool's mean and top {dropped_directions} directions)" if dropped_directions else ""

    if scored.get("target"):
        target = _scored_side("target", scored["target"], removal)
    elif target_rows:
        note = (
            "; the directions removed before the cosine were not measured on them (rematerialize influence_scores)"
            if dropped_directions
            else ""
        )
        target = _stored_side("target", target_rows, note)
    else:
        target = SideCollapse("target", None, "target features: no diagnostics recorded")

    if dropped_directions and scored.get("train"):
        train = _scored_side("train", scored["train"], removal)
    elif train_rows and not dropped_directions:
        train = _stored_side("train", train_rows)
    elif train_rows:
        stored = _stored_side("train", train_rows)
        note = (
            f"; the influence run removed the pool's mean and top {dropped_directions} directions, fitted on "
            "these rows, before the cosine (not measured as scored)"
        )
        train = SideCollapse("train", False, stored.detail + note)
    else:
        train = SideCollapse("train", None, "train features: no diagnostics recorded")

    if train.collapsed is None and target.collapsed is None:
        return CollapseAssessment(
            None, "no feature diagnostics recorded for these features; rematerialize train_gradients", train, target
        )
    bad = [row for row in rows if row[7]]
    if bad:
        kind, epoch, shard, steps, n_rows, norm, cosine, _ = bad[0]
        where = f"{kind} features of epoch {epoch}{f' shard {shard}' if shard else ''}"
        cosine_text = "n/a" if cosine is None else f"{cosine:.2f}"
        found = (
            f"{len(bad)} of {len(rows)} feature sets collapsed onto one direction as stored, e.g. {where}: "
            f"mean-feature norm {norm:.2f} (> {COLLAPSE_MEAN_NORM}), mean pairwise cosine {cosine_text} over "
            f"{n_rows} rows after {steps} warmup optimizer steps"
        )
    else:
        found = f"none of {len(rows)} feature sets collapsed as stored"
    sides = f"{train.detail}; {target.detail}"
    if target.collapsed:
        return CollapseAssessment(
            False,
            f"{found}; {sides}. The target features collapsed onto one direction, so every pool example's "
            "scores follow that shared direction, whatever the train side; the common directions removed at "
            "scoring are fitted on train rows and do not take it out. Give more (or more varied) val examples "
            "or train the warmup longer and recompute the features",
            train,
            target,
        )
    if train.collapsed:
        return CollapseAssessment(
            False,
            f"{found}; {sides}. Scores then rank mostly by that shared direction. Train the warmup longer "
            "(more examples, epochs or a smaller batch_size) and recompute the features, or remove the "
            "common directions (influence_scores' dropped_directions)",
            train,
            target,
        )
    return CollapseAssessment(True, f"{found}; {sides}", train, target)


def collapsed_feature_reason(
    con: Any,
    model: str,
    warmup_run_key: str,
    key: influence_store.FeatureKey,
    dropped_directions: int = 0,
    scored: dict[str, Any] | None = None,
) -> tuple[bool | None, str]:
    """``(informative, reason)`` of :func:`assess_collapse`."""
    result = assess_collapse(con, model, warmup_run_key, key, dropped_directions, scored)
    return result.informative, result.reason
