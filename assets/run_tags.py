"""Run tags the assets read: the demo profile a run was launched with (set by orchestration.profiles)."""

from __future__ import annotations

import json
from typing import Any

PROFILE_TAG = "instruct_select/profile"
PROFILE_VALUES_TAG = "instruct_select/profile_values"


def describe_profile(profile: dict[str, Any]) -> str:
    """One line: the profile's name and every value it sets."""
    return f"{profile['name']} profile: " + ", ".join(f"{key}={value}" for key, value in profile["values"].items())


def profile_of_run(tags: dict[str, str]) -> dict[str, Any] | None:
    """{"name", "values", "why"} of the profile a run was launched with (its tags), None without one."""
    if PROFILE_TAG not in tags:
        return None
    return {"name": tags[PROFILE_TAG], **json.loads(tags.get(PROFILE_VALUES_TAG, "{}"))}
