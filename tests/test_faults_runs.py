"""Reliability scenarios of runs and lineage: a killed run never blocks the next one, and no
lineage row is lost, nor missing for a run that failed."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pytest

from orchestration.runs import (
    WORKER_TAG,
    WorkerCheckingRunLauncher,
    guarded_executor,
    release_dead_runs,
    worker_alive,
    worker_identity,
)
from resources.lineage import LineageStore
from resources.process import die_with_parent, parent_death_signal

PROJECT_ROOT = Path(__file__).resolve().parents[1]
POOL = "accelerator"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- the step process dies with its run worker -------------------------------------------


def _step_like_child(pid_file: str, protect: bool) -> None:
    if protect:
        die_with_parent()
    Path(pid_file).write_text(f"{os.getpid()} {parent_death_signal()}")
    time.sleep(120)


def _run_worker_like(pid_file: str, protect: bool) -> None:
    child = mp.get_context("spawn").Process(target=_step_like_child, args=(pid_file, protect))
    child.start()
    child.join()


def _orphan_survives(tmp_path: Path, protect: bool) -> tuple[bool, int]:
    """Start worker -> step (both multiprocessing children), SIGKILL the worker: does the step live on?"""
    pid_file = tmp_path / f"step-{protect}.pid"
    worker = mp.get_context("spawn").Process(target=_run_worker_like, args=(str(pid_file), protect))
    worker.start()
    deadline = time.monotonic() + 60
    while not pid_file.exists() or len(pid_file.read_text().split()) < 2:
        assert time.monotonic() < deadline, "the step-like process did not start"
        time.sleep(0.05)
    step_pid, signal_number = map(int, pid_file.read_text().split())
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and worker_alive(worker_identity(step_pid)) is not False:
        time.sleep(0.05)
    survived = worker_alive(worker_identity(step_pid)) is not False
    if survived:
        os.kill(step_pid, signal.SIGKILL)
    return survived, signal_number


@pytest.mark.faults
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux-only")
def test_step_process_dies_when_its_run_worker_is_killed(tmp_path: Path, record_property) -> None:
    record_property("scenario", "kill -9 a run worker while its step subprocess computes")
    record_property("expected", "the step subprocess dies too (no orphan holding the GPU)")
    unprotected, _ = _orphan_survives(tmp_path, protect=False)
    protected, signal_number = _orphan_survives(tmp_path, protect=True)
    record_property("observed", f"without guard orphan survives={unprotected}; with guard survives={protected}")
    assert unprotected, "the check cannot tell: an unguarded child died as well"
    assert signal_number == signal.SIGKILL
    assert not protected
    # A process not started by multiprocessing (a run worker, pytest) is left alone.
    assert die_with_parent() is False and parent_death_signal() == 0


# --- a dead run is released: failed, slot freed, failed lineage row -----------------------


@dg.asset(pool=POOL, partitions_def=dg.StaticPartitionsDefinition(["a", "b"]))
def pooled(lineage: LineageStore) -> None:
    pass


def _started_run(
    instance: dg.DagsterInstance, job: dg.JobDefinition, worker: str, partition: str, claim: bool = True
) -> dg.DagsterRun:
    """A STARTED run of `pooled` whose step holds the pool slot, as a killed run leaves it."""
    from dagster._core.events import DagsterEvent

    run = instance.create_run_for_job(
        job, tags={WORKER_TAG: worker, "dagster/partition": partition}, asset_selection=frozenset({pooled.key})
    )
    instance.report_dagster_event(
        DagsterEvent(dg.DagsterEventType.RUN_START.value, job_name=run.job_name), run_id=run.run_id
    )
    if claim:
        assert instance.event_log_storage.claim_concurrency_slot(POOL, run.run_id, "pooled").is_claimed
    return instance.get_run_by_id(run.run_id)


@pytest.mark.faults
def test_dead_run_is_failed_with_its_slot_freed_and_a_failed_lineage_row(tmp_path: Path, record_property) -> None:
    record_property("scenario", "a run worker died (kill -9) holding the accelerator pool slot")
    record_property("expected", "next run start marks it failed, frees the slot, writes a failed lineage row")
    lineage = LineageStore(db_path=str(tmp_path / "lineage.duckdb"))
    job = dg.Definitions(assets=[pooled], resources={"lineage": lineage}).resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        instance.event_log_storage.set_concurrency_slots(POOL, 2)
        dead = _started_run(instance, job, worker_identity(_dead_pid()), "a")
        live = _started_run(instance, job, worker_identity(), "b")
        elsewhere = _started_run(instance, job, f"not-{socket.gethostname()}:{_dead_pid()}:1", "b", claim=False)
        blocked_before = instance.event_log_storage.claim_concurrency_slot(POOL, "rerun", "pooled").is_claimed
        launcher = WorkerCheckingRunLauncher()
        health = {run.run_id: launcher.check_run_worker_health(run).status.value for run in (dead, live, elsewhere)}

        released = release_dead_runs(instance, lineage)
        status = {run.run_id: instance.get_run_by_id(run.run_id).status for run in (dead, live, elsewhere)}
        holders = {slot.run_id for slot in instance.event_log_storage.get_concurrency_info(POOL).claimed_slots}
        claimed_after = instance.event_log_storage.claim_concurrency_slot(POOL, "rerun", "pooled").is_claimed
        again = release_dead_runs(instance, lineage)
    with duckdb.connect(lineage.db_path, read_only=True) as con:
        rows = con.execute("SELECT run_id, asset_key, partition_key, status, metrics FROM lineage").fetchall()
    record_property(
        "observed",
        f"released {len(released)} of 3 (dead/live/other host); dead run "
        f"{status[dead.run_id].value}; slot holders {len(holders)}; lineage {[r[3] for r in rows]}",
    )
    assert released == [dead.run_id] and again == []
    assert status == {
        dead.run_id: dg.DagsterRunStatus.FAILURE,
        live.run_id: dg.DagsterRunStatus.STARTED,
        elsewhere.run_id: dg.DagsterRunStatus.STARTED,
    }
    assert dead.run_id not in holders and live.run_id in holders
    assert not blocked_before and claimed_after  # the rerun waited for the dead run's slot, then got it
    assert [r[:4] for r in rows] == [(dead.run_id, "pooled", "a", "failed")]
    assert "is gone" in json.loads(rows[0][4])["error"]
    assert health == {dead.run_id: "FAILED", live.run_id: "RUNNING", elsewhere.run_id: "RUNNING"}


def test_worker_identity_tells_a_reused_pid_apart() -> None:
    host, pid, ticks = worker_identity().rsplit(":", 2)
    assert worker_alive(worker_identity()) is True
    assert worker_alive(f"{host}:{pid}:{int(ticks) + 1}") is False  # same pid, another process
    assert worker_alive(f"{host}:{_dead_pid()}:") is False
    assert worker_alive(None) is None and worker_alive("garbage") is None


# --- a step that raises leaves a failed lineage row ---------------------------------------


@dg.asset
def breaks(lineage: LineageStore) -> None:
    raise RuntimeError("disk full")


@dg.asset(deps=[breaks])
def after_breaks(lineage: LineageStore) -> None:
    pass


def failing_job() -> dg.JobDefinition:
    lineage = LineageStore(db_path=os.environ["FAULTS_LINEAGE_DB"])
    defs = dg.Definitions(
        assets=[breaks, after_breaks],
        resources={"lineage": lineage},
        executor=guarded_executor,
        jobs=[dg.define_asset_job("failing", selection=[breaks, after_breaks])],
    )
    return defs.resolve_job_def("failing")


@pytest.mark.faults
def test_failed_step_gets_a_failed_lineage_row(tmp_path: Path, monkeypatch, record_property) -> None:
    record_property("scenario", "an asset raises during its step")
    record_property("expected", "a failed lineage row for it and for the downstream asset it blocked")
    db_path = tmp_path / "lineage.duckdb"
    monkeypatch.setenv("FAULTS_LINEAGE_DB", str(db_path))
    with dg.instance_for_test() as instance:
        result = dg.execute_job(
            dg.reconstructable(failing_job), instance, run_config={"execution": {"config": {"in_process": {}}}}
        )
        assert not result.success
    with duckdb.connect(str(db_path), read_only=True) as con:
        rows = con.execute("SELECT asset_key, status, metrics FROM lineage ORDER BY asset_key").fetchall()
    record_property("observed", ", ".join(f"{a}={s}" for a, s, _ in rows) or "no lineage rows")
    assert [(a, s) for a, s, _ in rows] == [("after_breaks", "failed"), ("breaks", "failed")]
    assert "disk full" in json.loads(rows[1][2])["error"]


# --- lineage is never lost under concurrent writers on a fresh root ----------------------


def _ingest_worker(worker: int, roots, barrier, results) -> None:
    from assets.pool import raw_pool
    from resources import build_resources

    for root in iter(roots.get, None):
        pool = Path(root) / f"pool-{worker}.jsonl"
        pool.write_text(
            "".join(json.dumps({"prompt": f"w{worker} q{i}", "completion": f"a{i}"}) + "\n" for i in range(5))
        )
        barrier.wait()
        try:
            result = dg.materialize(
                [raw_pool],
                resources=build_resources(home=root, env="ci"),
                instance=dg.DagsterInstance.ephemeral(),
                run_config={"ops": {"raw_pool": {"config": {"sources": [{"path": str(pool)}]}}}},
                raise_on_error=False,
            )
            results.put((root, worker, result.run_id if result.success else "failed"))
        except Exception as error:  # noqa: BLE001  reported, so one bad trial does not hang the others on the barrier
            results.put((root, worker, f"error: {error!r}"))


@pytest.mark.faults
@pytest.mark.slow
def test_simultaneous_ingests_on_a_fresh_root_lose_no_lineage_row(tmp_path: Path, record_property) -> None:
    n_workers, n_trials = 8, 20
    record_property("scenario", f"{n_workers} simultaneous raw_pool ingests on a fresh storage root, {n_trials} times")
    record_property("expected", f"all {n_workers * n_trials} runs succeed, each with its lineage row")
    ctx = mp.get_context("spawn")
    barrier, roots, results = ctx.Barrier(n_workers), ctx.Queue(), ctx.Queue()
    workers = [ctx.Process(target=_ingest_worker, args=(w, roots, barrier, results)) for w in range(n_workers)]
    for worker in workers:
        worker.start()
    problems, found = [], 0
    try:
        for trial in range(n_trials):
            root = tmp_path / f"trial-{trial}"
            root.mkdir()
            for _ in workers:
                roots.put(str(root))
            outcomes = [results.get(timeout=600) for _ in workers]
            run_ids = {run_id for _, _, run_id in outcomes}
            problems += [o for o in outcomes if o[2] == "failed" or o[2].startswith("error")]
            with duckdb.connect(str(root / "lineage.duckdb"), read_only=True) as con:
                stored = {
                    r[0] for r in con.execute("SELECT run_id FROM lineage WHERE asset_key = 'raw_pool'").fetchall()
                }
            found += len(stored & run_ids)
            problems += [("missing lineage", run_id) for run_id in run_ids - stored]
    finally:
        for _ in workers:
            roots.put(None)
        for worker in workers:
            worker.join(timeout=60)
    record_property("observed", f"{found} of {n_workers * n_trials} lineage rows found; problems: {problems[:3]}")
    assert not problems
    assert found == n_workers * n_trials


def test_old_lineage_file_gets_the_status_column(tmp_path: Path) -> None:
    db_path = tmp_path / "lineage.duckdb"
    with duckdb.connect(str(db_path)) as con:
        con.execute(
            "CREATE TABLE lineage (run_id VARCHAR NOT NULL, asset_key VARCHAR NOT NULL, partition_key VARCHAR, "
            "code_version VARCHAR, started_at TIMESTAMPTZ NOT NULL, finished_at TIMESTAMPTZ NOT NULL, "
            "inputs JSON NOT NULL, outputs JSON NOT NULL, metrics JSON NOT NULL)"
        )
        con.execute("INSERT INTO lineage VALUES ('old', 'raw_pool', NULL, NULL, now(), now(), '{}', '{}', '{}')")
    store = LineageStore(db_path=str(db_path))
    with store.connect() as con:
        assert con.execute("SELECT run_id, status FROM lineage").fetchall() == [("old", "success")]
    from datetime import datetime

    from resources.lineage import LineageRecord

    with pytest.raises(ValueError, match="not one of"):
        store.record(LineageRecord("r", "raw_pool", None, None, datetime.now(UTC), status="oops"))


# --- the whole scenario: kill -9 a shard run from the CLI, rerun it ----------------------

SHARD = "smollm2-135m-instruct|00-of-04"
GRADIENT_CONFIG = {"dims": [64], "mode": "fast", "seed": 0, "shard_size": 4}


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _features(home: Path) -> dict[str, bytes]:
    """Every stored feature row of the shard, by example id."""
    (folder,) = [p for p in (home / "gradients").rglob("00-of-04") if p.is_dir()]
    rows = {}
    for ids_file in sorted(folder.glob("shard-*.json")):
        features = np.load(ids_file.with_suffix(".npy"))
        rows.update(
            {example_id: features[i].tobytes() for i, example_id in enumerate(json.loads(ids_file.read_text())["ids"])}
        )
    return rows


def _materialize_shard_cli(env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [
            str(Path(sys.executable).with_name("dagster")),
            "asset",
            "materialize",
            "-m",
            "tests.tiny_definitions",
            "--select",
            "train_gradients",
            "--partition",
            SHARD,
            "--config-json",
            json.dumps({"ops": {"train_gradients": {"config": GRADIENT_CONFIG}}}),
        ],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and PR_SET_PDEATHSIG")
def test_killed_shard_run_never_blocks_the_rerun(tmp_path: Path, record_property) -> None:
    record_property("scenario", "kill -9 `dagster asset materialize` of a train_gradients shard mid-step, rerun it")
    record_property(
        "expected", "step dies; rerun starts < 60 s, same bytes as uninterrupted; killed run failed + lineage row"
    )
    home, dagster_home = tmp_path / "home", tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(PROJECT_ROOT / "dagster_home" / "dagster.yaml", dagster_home / "dagster.yaml")  # pool limit 1
    env = {
        **os.environ,
        "INSTRUCT_SELECT_HOME": str(home),
        "DAGSTER_HOME": str(dagster_home),
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    pool = tmp_path / "pool.jsonl"
    pool.write_text(
        "".join(
            json.dumps(
                {
                    "instruction": f"Task {i}: item {i * 7} " + "y" * (i % 13),
                    "input": "",
                    "output": f"Answer {i} " + "x" * (i % 9),
                }
            )
            + "\n"
            for i in range(400)
        )
    )
    setup = (
        "import dagster as dg, sys; from tests.tiny_definitions import ASSETS, RESOURCES; "
        "by = {a.key.to_user_string(): a for a in ASSETS}; "
        "ok = dg.materialize([by['raw_pool'], by['warmup_checkpoints']], resources=RESOURCES, "
        "instance=dg.DagsterInstance.get(), partition_key='smollm2-135m-instruct', run_config={'ops': {"
        f"'raw_pool': {{'config': {{'sources': [{{'path': {str(pool)!r}}}]}}}}, "
        "'warmup_checkpoints': {'config': {'fraction': 0.02, 'epochs': 1, 'batch_size': 4}}}}).success; "
        "sys.exit(0 if ok else 1)"
    )
    subprocess.run([sys.executable, "-c", setup], cwd=PROJECT_ROOT, env=env, check=True, capture_output=True)
    reference = tmp_path / "reference"
    shutil.copytree(home, reference)

    killed = _materialize_shard_cli(env)
    deadline = time.monotonic() + 300
    while not list((home / "gradients").rglob("00-of-04/shard-*.npy")):  # the step is computing
        assert killed.poll() is None, killed.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the shard run never started computing"
        time.sleep(0.05)
    step_processes = _descendants(killed.pid)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    deadline = time.monotonic() + 15
    while {p for p in step_processes if Path(f"/proc/{p}").exists()} and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = {p for p in step_processes if Path(f"/proc/{p}").exists()}
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)
    assert step_processes and not orphans, f"step processes {orphans} outlived their killed run worker"

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        (killed_run,) = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": SHARD}))
        assert killed_run.status == dg.DagsterRunStatus.STARTED  # what the kill leaves behind
        assert instance.event_log_storage.get_concurrency_info(POOL).claimed_slots

    rerun_started = time.monotonic()
    rerun = _materialize_shard_cli(env)
    try:
        output, _ = rerun.communicate(timeout=600)
    finally:
        rerun.kill()
    rerun_s = time.monotonic() - rerun_started
    assert rerun.returncode == 0, output[-4000:]
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        killed_run = instance.get_run_by_id(killed_run.run_id)
        (new_run,) = [
            r
            for r in instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": SHARD}))
            if r.run_id != killed_run.run_id
        ]
        run_start = instance.all_logs(new_run.run_id, of_type=dg.DagsterEventType.RUN_START)[0].timestamp
        step_start = instance.all_logs(new_run.run_id, of_type=dg.DagsterEventType.STEP_START)[0].timestamp
        blocked = [e for e in instance.all_logs(new_run.run_id) if "blocked by limit" in (e.message or "")]

    # The uninterrupted reference: the same shard in a copy of the storage taken before the kill.
    reference_env = {**env, "INSTRUCT_SELECT_HOME": str(reference), "DAGSTER_HOME": str(tmp_path / "dagster_home_ref")}
    (tmp_path / "dagster_home_ref").mkdir()
    shutil.copy(PROJECT_ROOT / "dagster_home" / "dagster.yaml", tmp_path / "dagster_home_ref" / "dagster.yaml")
    reference_run = _materialize_shard_cli(reference_env)
    reference_output, _ = reference_run.communicate(timeout=600)
    assert reference_run.returncode == 0, reference_output[-4000:]
    resumed, uninterrupted = _features(home), _features(reference)

    with duckdb.connect(str(home / "lineage.duckdb"), read_only=True) as con:
        rows = con.execute(
            "SELECT run_id, partition_key, status FROM lineage WHERE asset_key = 'train_gradients'"
        ).fetchall()
    record_property(
        "observed",
        f"orphans {len(orphans)}; rerun step started {step_start - run_start:.0f} s after "
        f"its run ({rerun_s:.0f} s in all); same bytes {resumed == uninterrupted}; killed run "
        f"{killed_run.status.value}; lineage {sorted(r[2] for r in rows)}",
    )
    assert step_start - run_start < 60 and not blocked
    assert killed_run.status == dg.DagsterRunStatus.FAILURE
    assert sorted(rows) == sorted([(killed_run.run_id, SHARD, "failed"), (new_run.run_id, SHARD, "success")])
    assert resumed and resumed == uninterrupted
