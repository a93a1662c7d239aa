"""`make demo`'s profiles: lookup, run config that fits the jobs, and LESS's recipe outside them."""

from __future__ import annotations

import dataclasses

import dagster as dg
import pytest

from assets.partitions import DEFAULT_MODEL
from assets.run_tags import profile_of_run
from orchestration.definitions import defs
from orchestration.demo import main as demo_main
from orchestration.jobs import PREPARE_JOB_NAME, SELECT_AND_EVALUATE_JOB_NAME, refresh_steps
from orchestration.profiles import PROFILES, Profile, get_profile
from resources import build_resources


def test_profile_lookup_and_unknown_name(capsys) -> None:
    assert get_profile("quick").name == "quick" and get_profile("full").name == "full"
    with pytest.raises(ValueError, match="unknown demo profile 'fast'; valid profiles: quick, full"):
        get_profile("fast")
    assert demo_main(["fast"]) == 2  # before anything runs
    assert "valid profiles: quick, full" in capsys.readouterr().err


def check_profile_run_config(profile: Profile) -> None:
    from assets.warmup import WarmupConfig
    from selection.train import preflight

    store_config = {"cache_dir": build_resources()["model_store"].cache_dir}
    for job_name, _, _ in refresh_steps(DEFAULT_MODEL):
        dg.validate_run_config(defs.resolve_job_def(job_name), profile.run_config(job_name, store_config))
    from assets.finetune import FinetuneConfig
    from selection.train.training import LESS_TRAINING_CONFIG

    warmup = WarmupConfig(**profile.ops[PREPARE_JOB_NAME].get("warmup_checkpoints", {}))
    values = profile.values()
    pool_size = values["raw_pool.default_pool_size"]
    preflight.check_warmup_schedule(
        round(warmup.fraction * pool_size), warmup.batch_size, warmup.epochs, warmup.warmup_ratio, pool_size=pool_size
    )
    # Finetuning on a selection must take a step at lr > 0 too (its first step is a warmup step at lr 0).
    finetune = FinetuneConfig(**profile.ops[SELECT_AND_EVALUATE_JOB_NAME]["finetuned_checkpoints"])
    budget = values.get("less_selection.budget", round(0.05 * pool_size))
    preflight.check_warmup_schedule(budget, finetune.batch_size, finetune.epochs, LESS_TRAINING_CONFIG.warmup_ratio)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_run_config_fits_the_jobs_and_passes_the_warmup_preflight(name: str) -> None:
    """A profile's config must stay valid as asset configs change, and its warmup must not be refused
    for a zero-lr epoch at its pool size (both would only show minutes into `make demo`)."""
    check_profile_run_config(PROFILES[name])


def _with_warmup(profile: Profile, **values) -> Profile:
    prepare = profile.ops[PREPARE_JOB_NAME]
    warmup = {**prepare["warmup_checkpoints"], **values}
    ops = {**profile.ops, PREPARE_JOB_NAME: {**prepare, "warmup_checkpoints": warmup}}
    return dataclasses.replace(profile, ops=ops)


def test_profile_check_refuses_an_unknown_field_and_a_zero_lr_warmup() -> None:
    with pytest.raises(dg.DagsterInvalidConfigError):
        check_profile_run_config(_with_warmup(PROFILES["quick"], no_such_field=1))
    # LESS's 32-example steps on the quick pool's warmup slice: one step per epoch, the first at lr 0.
    with pytest.raises(ValueError, match="average learning rate of 0"):
        check_profile_run_config(_with_warmup(PROFILES["quick"], batch_size=32))


def test_profile_values_and_tags_record_every_setting() -> None:
    quick = PROFILES["quick"]
    recorded = profile_of_run(quick.tags())
    assert recorded["name"] == "quick" and recorded["values"] == quick.values()
    assert recorded["values"]["model_store.max_length"] == 256
    assert recorded["values"]["raw_pool.default_pool_size"] == 60
    # Every asset (or the model spec) a profile configures says why it departs from LESS, except
    # values that are not LESS recipe choices (pool, test rows, kMQ generation length).
    not_recipe = {"raw_pool", "evaluation", "kmq_iterative_selection"}
    for profile in PROFILES.values():
        configured = {key.split(".")[0] for key in profile.values()} - not_recipe
        assert configured <= set(profile.why), profile.name
    assert profile_of_run({}) is None


def test_plain_defaults_are_less_recipe() -> None:
    """Without run config the graph trains as LESS: a change back to the demo's lr 1e-4 or batch 8 fails here."""
    from assets.finetune import FinetuneConfig
    from assets.warmup import WarmupConfig
    from selection.train.models import ModelSpec, default_model_spec

    for config in (WarmupConfig(), FinetuneConfig()):
        assert (config.epochs, config.learning_rate, config.batch_size) == (4, 2e-5, 32), type(config).__name__
    assert WarmupConfig().fraction == 0.05 and WarmupConfig().warmup_ratio == 0.03
    spec = default_model_spec()
    assert (spec.lora_r, spec.lora_alpha, spec.lora_dropout, spec.max_length) == (128, 512, 0.1, 2048)
    assert spec.lora_target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert ModelSpec(name="m", source="s").max_length == 2048


def test_model_store_overrides_change_the_spec_and_cap_at_the_context(tmp_path) -> None:
    import json

    from resources.model_store import ModelStore

    folder = tmp_path / "short-context"  # a local model folder: only its config is read
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    models_file = tmp_path / "models.json"
    models_file.write_text(json.dumps([{"name": "short", "source": str(folder)}]))
    plain = ModelStore(cache_dir=str(tmp_path), models_file=str(models_file)).spec("short")
    assert plain.max_length == 1024  # LESS's 2048, capped by the model's context
    small = ModelStore(
        cache_dir=str(tmp_path), models_file=str(models_file), max_length=256, lora_r=8, lora_alpha=32
    ).spec("short")
    assert (small.max_length, small.lora_r, small.lora_alpha) == (256, 8, 32)
    assert small.fingerprint() != plain.fingerprint()  # its own checkpoints and caches
