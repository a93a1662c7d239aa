"""Peak memory of `train_gradients` against pool size: it must stay flat.

For each pool size, in a fresh storage root: one process ingests a synthetic pool and
trains the warmup checkpoint (same warmup size for every pool), then a fresh process
materializes the real `train_gradients` asset (one shard holding the whole pool, so
streaming alone has to keep memory flat) and reports its peak RSS. A third process runs
the in-memory way the asset used before (read and tokenize the whole pool, then compute)
for the same pool, to show what streaming saves. A tiny random Llama (tests/fakes.py)
stands in for SmolLM2 so that 20,000 examples take about a minute; the model is the same
size for every pool, so any growth comes from the pipeline.

    .venv/bin/python bench/gradient_memory.py [--sizes 2000,20000]

The last line is one JSON object: peak RSS per size for both ways, and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARMUP_EXAMPLES = 200
DIM = 8192


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_pool(path: Path, size: int) -> None:
    """Distinct short prompt/completion pairs (they fit the tiny model's 96 tokens)."""
    words = ["sort", "add", "poem", "map", "list", "sum", "city", "tree", "code", "math"]
    with open(path, "w") as handle:
        for i in range(size):
            prompt = f"{words[i % 10]} {i} {words[(i // 10) % 10]}?"
            handle.write(json.dumps({"prompt": prompt, "completion": f"ok {i * 7 % 1000} {words[i % 7]}"}) + "\n")


def run_config(pool_file: Path, size: int) -> dict:
    return {
        "ops": {
            "raw_pool": {"config": {"sources": [{"path": str(pool_file)}]}},
            "warmup_checkpoints": {"config": {"fraction": WARMUP_EXAMPLES / size, "epochs": 1, "batch_size": 8}},
            "train_gradients": {"config": {"dims": [DIM], "mode": "fast", "chunk_size": 512}},
        }
    }


def phase(name: str, home: Path, size: int) -> dict:
    """Run one phase in a fresh process (its peak RSS is its own) and return its JSON report."""
    env = {**os.environ, "INSTRUCT_SELECT_HOME": str(home), "INSTRUCT_SELECT_GRADIENT_SHARDS": "1"}
    command = [sys.executable, __file__, "--phase", name, "--home", str(home), "--sizes", str(size)]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])


def _materialize(home: Path, size: int, asset: str, partition: str | None) -> dict:
    import dagster as dg

    from assets import ALL_CHECKS, ASSET_MODULES
    from resources import build_resources
    from tests.fakes import TinyModelStore

    assets = [*dg.load_assets_from_modules(ASSET_MODULES), *ALL_CHECKS]
    resources = {**build_resources(home=str(home), env="ci"), "model_store": TinyModelStore(cache_dir=str(home))}
    config = run_config(home / "pool.jsonl", size)
    selection = dg.AssetSelection.assets(asset)
    names = {"raw_pool"} if asset == "raw_pool" else {asset}
    rss_before = peak_rss_mb()
    started = time.perf_counter()
    result = dg.materialize(
        assets,
        selection=selection,
        resources=resources,
        partition_key=partition,
        run_config={"ops": {k: v for k, v in config["ops"].items() if k in names}},
    )
    metadata = result.asset_materializations_for_node(asset)[0].metadata
    return {
        "seconds": time.perf_counter() - started,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
        **{k: v.value for k, v in metadata.items() if k in ("n_computed", "n_examples", "n_stored")},
    }


def run_phase(name: str, home: Path, size: int) -> dict:
    from assets.partitions import DEFAULT_MODEL

    if name == "setup":
        write_pool(home / "pool.jsonl", size)
        _materialize(home, size, "raw_pool", None)
        return _materialize(home, size, "warmup_checkpoints", DEFAULT_MODEL)
    if name == "streamed":
        return _materialize(home, size, "train_gradients", f"{DEFAULT_MODEL}|00-of-01")
    if name == "in_memory":
        return in_memory(home)
    raise ValueError(f"unknown phase {name!r}")


def in_memory(home: Path) -> dict:
    """The earlier way: every conversation and its tokens in memory at once, then compute."""
    import torch

    from resources.lineage import LineageStore
    from resources.settings import LINEAGE_DB_FILE
    from selection.data import pool_store, tokenization
    from selection.influence import datastore, projection
    from selection.influence.gradients import PerExampleGradients
    from selection.train import models
    from tests.fakes import TinyModelStore

    torch.set_num_threads(1)
    store = TinyModelStore(cache_dir=str(home))
    spec = store.spec("tiny")
    model, tokenizer = store.load(spec, "cpu")
    peft_model = models.add_lora(model, spec)
    engine = PerExampleGradients(peft_model)
    rss_before = peak_rss_mb()
    started = time.perf_counter()
    with LineageStore(db_path=str(home / LINEAGE_DB_FILE)).connect() as con:
        _, ids, conversations = pool_store.read_pool(con)
    tokenized, _ = tokenization.tokenize_many(tokenizer, conversations, spec.max_length)
    target = projection.make_projector("fast", engine.dim, DIM, 0, engine.names_hash)
    features = datastore.FeatureStore(home / "in_memory_store", "tiny", "x", "target", target)
    computed = datastore.compute_features(
        peft_model, list(zip(ids, tokenized)), target, features, pad_token_id=tokenizer.pad_token_id
    )
    return {
        "seconds": time.perf_counter() - started,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
        "n_computed": computed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,20000", help="comma-separated pool sizes")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.phase:
        import torch

        torch.set_num_threads(1)  # the same for every phase; the tiny model gains nothing from threads
        print(json.dumps(run_phase(args.phase, Path(args.home), sizes[0])))
        return
    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix=f"gradmem-{size}-") as tmp:
            home = Path(tmp)
            phase("setup", home, size)
            streamed = phase("streamed", home, size)
            in_mem = phase("in_memory", home, size)
        rows.append({"size": size, "streamed": streamed, "in_memory": in_mem})
        print(
            f"pool {size:>7}: streamed asset peak {streamed['peak_rss_mb']:.0f} MB "
            f"({streamed['n_computed']} computed, {streamed['seconds']:.0f} s); in-memory peak "
            f"{in_mem['peak_rss_mb']:.0f} MB ({in_mem['seconds']:.0f} s)",
            flush=True,
        )
    first, last = rows[0], rows[-1]
    growth = last["size"] / first["size"]
    result = {
        "sizes": sizes,
        "streamed_peak_rss_mb": [r["streamed"]["peak_rss_mb"] for r in rows],
        "in_memory_peak_rss_mb": [r["in_memory"]["peak_rss_mb"] for r in rows],
        "pool_size_ratio": growth,
        "streamed_peak_ratio": last["streamed"]["peak_rss_mb"] / first["streamed"]["peak_rss_mb"],
        "in_memory_peak_ratio": last["in_memory"]["peak_rss_mb"] / first["in_memory"]["peak_rss_mb"],
        "streamed_growth_mb_per_10k": (last["streamed"]["peak_rss_mb"] - first["streamed"]["peak_rss_mb"])
        / (last["size"] - first["size"])
        * 10_000
        if len(rows) > 1
        else 0.0,
        "in_memory_growth_mb_per_10k": (last["in_memory"]["peak_rss_mb"] - first["in_memory"]["peak_rss_mb"])
        / (last["size"] - first["size"])
        * 10_000
        if len(rows) > 1
        else 0.0,
        "runs": rows,
    }
    print(
        f"pool x{growth:.0f}: streamed peak x{result['streamed_peak_ratio']:.2f} "
        f"({result['streamed_growth_mb_per_10k']:+.0f} MB per 10K examples), in-memory peak "
        f"x{result['in_memory_peak_ratio']:.2f} ({result['in_memory_growth_mb_per_10k']:+.0f} MB per 10K)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
