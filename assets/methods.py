"""One asset per selection method registered in `selection.registry`, made by the skin of the input it consumes."""

from collections.abc import Callable, Sequence

import dagster as dg

from assets import baselines, diversity, selections
from selection import registry

SKINS: dict[registry.Input, Callable[[registry.SelectionMethod], dg.AssetsDefinition]] = {
    registry.Input.INFLUENCE_SCORES: selections.from_influence_scores,
    registry.Input.HIDDEN_STATES: baselines.from_hidden_states,
    registry.Input.CLUSTERS: diversity.from_clusters,
    registry.Input.CLUSTERS_WITH_FEEDBACK: diversity.from_clusters_with_feedback,
    registry.Input.POOL: baselines.from_pool,
}


def selection_assets(methods: Sequence[registry.SelectionMethod]) -> list[dg.AssetsDefinition]:
    return [SKINS[method.consumes](method) for method in methods]


SELECTION_ASSETS = selection_assets(registry.METHODS)
