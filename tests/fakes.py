"""Fake resources injected through `resources=`: a tiny random model instead of SmolLM2."""

from __future__ import annotations

from typing import Any

from resources.model_store import ModelStore
from selection.train.models import ModelSpec, build_tiny_llama
from tests.conftest import CHATML_TEMPLATE, make_tiny_tokenizer

TINY_MODEL = "tiny-random"


class TinyModelStore(ModelStore):
    """Every partition key resolves to a 2-layer random Llama with a byte-level tokenizer."""

    def spec(self, name: str) -> ModelSpec:
        return ModelSpec(name=name, source="tiny-random-llama", max_length=96, lora_r=4, lora_alpha=8, lora_dropout=0.0)

    def load(self, spec: ModelSpec, device: str) -> tuple[Any, Any]:
        tokenizer = make_tiny_tokenizer(chat_template=CHATML_TEMPLATE)
        model = build_tiny_llama(seed=0, vocab_size=len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        return model.to(device), tokenizer


def error_messages(error: BaseException | None) -> list[str]:
    """The message of an error and of everything that caused it, outermost first (Dagster wraps user errors)."""
    messages, seen = [], set()
    while error is not None and id(error) not in seen:  # a context chain can loop back on itself
        seen.add(id(error))
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return messages


def materialize_error(assets, resources, run_config=None, partition_key=None) -> str:
    """Every message of the error a materialization raised, joined by " | " ("" when it succeeded)."""
    import dagster as dg

    try:
        dg.materialize(assets, resources=resources, run_config=run_config, partition_key=partition_key)
    except Exception as error:  # noqa: BLE001 - Dagster wraps the user error; its causes are read
        return " | ".join(error_messages(error))
    return ""


def user_error_text(joined: str, limit: int = 200) -> str:
    """The user's own message out of `materialize_error`'s text, on one line (for fault tables)."""
    wrappers = ("Error occurred while executing", "Error executing resource_fn")
    parts = [p for p in joined.split(" | ") if p and not p.startswith(wrappers)]
    return " ".join((parts[0] if parts else joined).split())[:limit] or "run succeeded"


def run_check(defs, instance, asset: str, check: str, partition: str | None = None):
    """The evaluation of one asset check run on its own (as from the UI) against what is stored."""
    import dagster as dg

    key = dg.AssetCheckKey(dg.AssetKey(asset), check)
    partitions_def = defs.resolve_asset_graph().get(key).partitions_def
    job = dg.define_asset_job("run_check", selection=dg.AssetSelection.checks(key), partitions_def=partitions_def)
    # By tag: execute_in_process refuses a partition_key for a job that selects no asset.
    tags = {"dagster/partition": partition} if partition else None
    result = (
        dg.Definitions.merge(defs, dg.Definitions(jobs=[job]))
        .resolve_job_def("run_check")
        .execute_in_process(instance=instance, tags=tags, raise_on_error=False)
    )
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation
