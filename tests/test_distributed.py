"""The Celery deployment of the README ("Running shards in parallel"), run for real on this
machine: Postgres instance storage, a Redis broker, the daemon draining a queued backfill of
`train_gradients`, and two Celery workers standing for two GPU machines.

The shard features must be the bytes a single process computes, the influence scores and
the LESS selection made from them must match, and every shard must have its lineage row in
the one DuckDB file the two workers wrote concurrently.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pytest

from assets import ASSET_MODULES
from assets.partitions import DEFAULT_MODEL, model_shard_keys
from orchestration.jobs import TRAIN_GRADIENTS_JOB_NAME
from resources import build_resources
from resources.lineage import LOCK_ERROR_MARKERS
from selection.influence import scores as influence
from tests.fakes import TinyModelStore
from tests.test_pipeline_tiny import _pool_file, _targets_file

pytestmark = pytest.mark.distributed

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKERS = ("gpu-a", "gpu-b")
PREREQUISITES = ["raw_pool", "target_tasks", "warmup_checkpoints", "target_gradients"]
SELECTIONS = ["influence_scores", "less_selection"]
TIMEOUT_S = 600


def _ensure_services_installed() -> None:
    """Debian's postgresql and redis-server, and the `distributed` extra; a skip says why not."""
    if not (shutil.which("redis-server") and glob.glob("/usr/lib/postgresql/*/bin/initdb")):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("needs Debian's postgresql and redis-server: apt-get install them as root")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "postgresql", "redis-server"]):
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                pytest.skip(f"{' '.join(command)} failed (no network?): {done.stderr[-500:]}")
    if not (importlib.util.find_spec("dagster_celery") and importlib.util.find_spec("dagster_postgres")):
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "-e", f"{PROJECT_ROOT}[distributed]"],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            pytest.skip(f"pip install of the distributed extra failed (no network?): {done.stderr[-500:]}")
        # The extra pins dagster to its own release; this process has the old one loaded.
        if importlib.metadata.version("dagster") != dg.__version__:
            pytest.skip(
                f"installing the distributed extra moved dagster from {dg.__version__} to "
                f"{importlib.metadata.version('dagster')}; run the test again"
            )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port}: {log.read_text()[-3000:]}")


@contextlib.contextmanager
def _postgres() -> Iterator[str]:
    """A throwaway server on a free loopback port; its URL. Postgres refuses to run as root."""
    bin_dir = Path(max(glob.glob("/usr/lib/postgresql/*/bin/initdb"))).parent
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="instruct-select-pg-"))  # not under pytest's root-only tmp folder
    if as_user:
        shutil.chown(data, "postgres")
    port = _free_port()
    pg_ctl = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run(
            [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                *pg_ctl,
                "-l",
                str(data / "server.log"),
                "-w",
                "start",
                "-o",
                f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@contextlib.contextmanager
def _process_group(command: list[str], env: dict, log: Path) -> Iterator[subprocess.Popen]:
    """A process in a session of its own, ended with everything it started (run workers, celery)."""
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        # What outlives its leader (a code server that keeps retrying Postgres) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _materialize(home: Path, names: list[str], ops: dict, partition_key: str) -> None:
    """One in-process run of `names` in the storage root `home`."""
    assets = dg.load_assets_from_modules(ASSET_MODULES)
    resources = {
        **build_resources(home=str(home), env="ci"),
        "model_store": TinyModelStore(cache_dir=str(home / "cache")),
    }
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            assets,
            selection=names,
            resources=resources,
            instance=instance,
            run_config={"ops": {name: ops[name] for name in names}},
            partition_key=partition_key,
        )
    assert result.success, (names, partition_key)


def _train_features(home: Path) -> dict[str, bytes]:
    """Every train feature shard and its commit record, by path under the gradient store root."""
    root = home / "gradients"
    files = sorted(p for p in root.rglob("shard-*") if "/train/" in p.as_posix())
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def _scores_and_selection(home: Path) -> tuple[list[str], np.ndarray, list[tuple]]:
    (out_dir,) = (home / "scores").glob("*/*")
    scores, ids = influence.load_scores(out_dir)
    with duckdb.connect(str(home / "lineage.duckdb"), read_only=True) as con:
        selected = con.execute(
            "SELECT method, target, example_id, rank, score FROM selections ORDER BY method, target, rank"
        ).fetchall()
    return ids, np.asarray(scores), selected


def _wait_for_runs(instance: dg.DagsterInstance, n: int, watched: dict[str, tuple[subprocess.Popen, Path]]) -> list:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        for name, (process, log) in watched.items():
            assert process.poll() is None, f"{name} exited: {log.read_text()[-3000:]}"
        runs = instance.get_runs(filters=dg.RunsFilter(job_name=TRAIN_GRADIENTS_JOB_NAME))
        if len(runs) == n and all(run.is_finished for run in runs):
            return runs
        assert time.monotonic() < deadline, f"runs not finished: {[(r.run_id, r.status) for r in runs]}"
        time.sleep(1)


def _wait_for_workers_ready(workers: dict[str, tuple[subprocess.Popen, Path]]) -> None:
    """Until every Celery worker's log says it is ready (`celery@<name> ready.`)."""
    deadline = time.monotonic() + TIMEOUT_S
    waiting = set(workers)
    while waiting:
        for name in sorted(waiting):
            process, log = workers[name]
            assert process.poll() is None, f"{name} exited: {log.read_text()[-3000:]}"
            if log.exists() and f"{name}@" in log.read_text() and " ready." in log.read_text():
                waiting.discard(name)
        assert time.monotonic() < deadline, f"workers not ready: {sorted(waiting)}"
        time.sleep(1)


def _celery_workers(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """Step key -> the Celery worker that ran it (the `train_gradients` step and each asset
    check are steps of their own), from the engine events dagster-celery writes."""
    return {
        event.step_key: event.dagster_event.engine_event_data.metadata["Celery worker"].value
        for event in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
        if event.step_key and "Celery worker" in event.dagster_event.engine_event_data.metadata
    }


def test_backfill_on_two_celery_workers_matches_one_process(
    tmp_path: Path, monkeypatch, capsys, record_property
) -> None:
    _ensure_services_installed()
    # Import the Celery integration only now: without the extra the rest of the suite still collects.
    from orchestration.distributed import BROKER_ENV_VAR
    from tests.distributed_definitions import GRADIENT_CONFIG

    home, reference, dagster_home = tmp_path / "home", tmp_path / "reference", tmp_path / "dagster_home"
    dagster_home.mkdir()
    ops = {
        "raw_pool": {"config": {"sources": [{"path": str(_pool_file(tmp_path / "pool.jsonl", 40))}]}},
        "target_tasks": {"config": {"files": [{"path": str(_targets_file(tmp_path / "targets.jsonl"))}], "n_val": 2}},
        "warmup_checkpoints": {"config": {"fraction": 0.4, "epochs": 2, "batch_size": 4, "learning_rate": 1e-3}},
        "target_gradients": {"config": GRADIENT_CONFIG},
        "train_gradients": {"config": GRADIENT_CONFIG},
        "influence_scores": {"config": {"dim": GRADIENT_CONFIG["dims"][0], "mode": "fast", "seed": 0}},
        "less_selection": {"config": {"budget": 5}},
    }
    _materialize(home, PREREQUISITES, ops, DEFAULT_MODEL)
    shutil.copytree(home, reference)
    shards = [str(key) for key in model_shard_keys(DEFAULT_MODEL)]

    started = time.monotonic()
    with _postgres() as postgres_url:
        monkeypatch.setenv("DAGSTER_POSTGRES_URL", postgres_url)  # this process reads the instance too
        redis_port = _free_port()
        broker_url = f"redis://127.0.0.1:{redis_port}/0"
        shutil.copy(PROJECT_ROOT / "deploy" / "dagster.yaml", dagster_home / "dagster.yaml")
        workspace = dagster_home / "workspace.yaml"
        workspace.write_text(
            "load_from:\n  - python_module:\n      module_name: tests.distributed_definitions\n"
            f"      working_directory: {PROJECT_ROOT}\n"
        )
        env = {
            **os.environ,
            "DAGSTER_HOME": str(dagster_home),
            "INSTRUCT_SELECT_HOME": str(home),
            "DAGSTER_POSTGRES_URL": postgres_url,
            BROKER_ENV_VAR: broker_url,
            "PYTHONPATH": str(PROJECT_ROOT),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            # Two workers share this machine's cores: one thread each, as the tiny tests run.
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        # The schema first, once: processes starting together would race to create its tables.
        subprocess.run(
            [str(BIN / "dagster"), "instance", "migrate"], cwd=PROJECT_ROOT, env=env, check=True, capture_output=True
        )
        with contextlib.ExitStack() as stack:
            redis_log = tmp_path / "redis.log"
            redis = stack.enter_context(
                _process_group(
                    [
                        "redis-server",
                        "--port",
                        str(redis_port),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(tmp_path),
                    ],
                    env,
                    redis_log,
                )
            )
            _wait_for_port(redis_port, redis, redis_log)
            watched = {}
            for name in WORKERS:
                log = tmp_path / f"{name}.log"
                watched[name] = (
                    stack.enter_context(
                        _process_group(
                            [
                                str(BIN / "dagster-celery"),
                                "worker",
                                "start",
                                "-A",
                                "dagster_celery.app",
                                "-y",
                                str(PROJECT_ROOT / "deploy" / "celery.yaml"),
                                "-n",
                                name,
                                "--",
                                "--concurrency=1",
                            ],
                            env,
                            log,
                        )
                    ),
                    log,
                )
            log = tmp_path / "daemon.log"
            watched["daemon"] = (
                stack.enter_context(
                    _process_group([str(BIN / "dagster-daemon"), "run", "-w", str(workspace)], env, log)
                ),
                log,
            )
            # Both workers must be consuming before the shards are queued, or the first one up takes them all.
            _wait_for_workers_ready({name: watched[name] for name in WORKERS})
            backfill = subprocess.run(
                [
                    str(BIN / "dagster"),
                    "job",
                    "backfill",
                    "-w",
                    str(workspace),
                    "-j",
                    TRAIN_GRADIENTS_JOB_NAME,
                    "--partitions",
                    ",".join(shards),
                    "--noprompt",
                ],
                cwd=PROJECT_ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            assert backfill.returncode == 0, backfill.stdout[-3000:] + backfill.stderr[-3000:]
            with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
                runs = _wait_for_runs(instance, len(shards), watched)
                failed = {
                    run.tags["dagster/partition"]: run.status
                    for run in runs
                    if run.status != dg.DagsterRunStatus.SUCCESS
                }
                assert not failed, (failed, [log.read_text()[-3000:] for _, log in watched.values()])
                steps_on = {run.tags["dagster/partition"]: _celery_workers(instance, run.run_id) for run in runs}
                ran_on = {shard: steps["train_gradients"] for shard, steps in steps_on.items()}
                run_ids = {run.tags["dagster/partition"]: run.run_id for run in runs}
                messages = [event.message or "" for run in runs for event in instance.all_logs(run.run_id)]
            worker_logs = "\n".join(log.read_text() for _, log in watched.values()).lower()
    distributed_s = time.monotonic() - started

    # The same shards, one after another in this process, in a copy of the storage root.
    for shard in shards:
        _materialize(reference, ["train_gradients"], ops, shard)
    for root in (home, reference):
        _materialize(root, SELECTIONS, ops, DEFAULT_MODEL)

    with duckdb.connect(str(home / "lineage.duckdb"), read_only=True) as con:
        lineage = con.execute(
            "SELECT partition_key, run_id, status FROM lineage WHERE asset_key = 'train_gradients'"
        ).fetchall()
    shown = "\n".join(f"  {shard}  {ran_on[shard]}  run {run_ids[shard][:8]}" for shard in shards)
    with capsys.disabled():  # shown under -q too: which machine ran which shard
        print(f"\ntrain_gradients backfill on Celery ({distributed_s:.0f} s):\n{shown}")
    record_property("shards", shown)

    # Every step ran on a Celery worker, and both workers took steps. Which worker takes which
    # step is Celery's choice (the first idle one), so the train steps alone may all land on one.
    assert all("train_gradients" in steps for steps in steps_on.values()), steps_on
    assert {worker.split("@")[0] for steps in steps_on.values() for worker in steps.values()} == set(WORKERS), steps_on
    distributed, single = _train_features(home), _train_features(reference)
    assert distributed and distributed.keys() == single.keys()
    assert [path for path in distributed if distributed[path] != single[path]] == []
    ids, scores, selected = _scores_and_selection(home)
    reference_ids, reference_scores, reference_selected = _scores_and_selection(reference)
    assert ids == reference_ids and np.array_equal(scores, reference_scores)
    assert selected and selected == reference_selected
    assert sorted(lineage) == sorted((shard, run_ids[shard], "success") for shard in shards)
    assert not [m for m in messages if any(marker in m.lower() for marker in LOCK_ERROR_MARKERS)]
    assert not [marker for marker in LOCK_ERROR_MARKERS if marker in worker_logs]
