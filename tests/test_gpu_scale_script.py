"""`bench/gpu_scale.py`, the paper-scale GPU check, must stay runnable on a GPU machine that has
only torch, transformers, peft, numpy (and the usual image packages) and this repository: its
`--tiny` path runs the same code on the CPU, and what it imports is checked here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Packages the pipeline installs that a GPU image with torch, transformers and peft need not have.
PIPELINE_ONLY = {"dagster", "dagster_webserver", "duckdb", "gguf", "datasets", "playwright", "pydantic"}
RUN_AND_LIST_IMPORTS = """
import atexit, json, runpy, sys
listing = lambda: "IMPORTED " + json.dumps(sorted({m.split(".")[0] for m in sys.modules}))
atexit.register(lambda: print(listing(), file=sys.stderr))
sys.argv = ["bench/gpu_scale.py", "--tiny"]
runpy.run_path("bench/gpu_scale.py", run_name="__main__")
"""


def imported_top_level(stderr: str) -> set[str]:
    line = next(line for line in stderr.splitlines() if line.startswith("IMPORTED "))
    return set(json.loads(line.removeprefix("IMPORTED ")))


@pytest.mark.slow
def test_gpu_scale_tiny_runs_the_whole_check_without_pipeline_only_packages() -> None:
    done = subprocess.run(
        [sys.executable, "-c", RUN_AND_LIST_IMPORTS], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == "gpu_scale" and result["tiny"] and result["lora_r"] == 128
    assert result["examples_per_s"] > 0 and result["ours_over_floor"] > 0 and not result["oom_retries"]
    assert sum(result["batch_sizes"]) == result["n_examples"] > 0
    fidelity = result["fidelity"]
    assert result["projection_mode"] == "device" and set(result["by_mode"]) == {"device", "fast"}
    assert all(figures["examples_per_s"] > 0 and figures["over_floor"] > 0 for figures in result["by_mode"].values())
    # The default recipe in every mode, and LESS's loss and transform in the first.
    assert result["recipe"] == "default" and set(result["by_pass"]) == {
        "device/default",
        "fast/default",
        "device/less-paper",
    }
    assert result["by_pass"]["device/less-paper"]["loss_tokens"] == "response"
    assert result["by_pass"]["device/default"]["loss_tokens"] == "sequence"
    assert set(result["floor_seconds_by_loss"]) == {"response", "sequence"}
    assert set(fidelity["projection_seconds"]) == {"exact0", "exact1", "device0", "fast0"}
    for pair in ("device_vs_exact", "fast_vs_exact", "exact_vs_exact"):
        assert -1 <= fidelity[f"{pair}_spearman"] <= 1 and 0 <= fidelity[f"{pair}_overlap"] <= 1
    assert not imported_top_level(done.stderr) & PIPELINE_ONLY


def test_import_listing_reads_the_wrapper_line() -> None:
    assert imported_top_level('noise\nIMPORTED ["dagster", "torch"]\n') == {"dagster", "torch"}
    with pytest.raises(StopIteration):
        imported_top_level("no listing\n")
