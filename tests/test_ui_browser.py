"""The Dagster UI on a tiny run, as a user sees it: a real `dagster-webserver` serving the tiny code
location (tests/tiny_definitions.py) over a storage root and instance filled by one tiny refresh,
read through GraphQL and through headless Chromium (Debian's, driven by Playwright).

Screenshots go to `$UI_ARTIFACTS_DIR` (default tests/artifacts/ui/); with
`UPDATE_README_SCREENSHOT=1` the asset graph one also replaces docs/ui_asset_graph.png.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from assets import ALL_CHECKS
from resources import build_resources
from tests import tiny_definitions
from tests.fakes import TinyModelStore
from tests.test_pipeline_tiny import materialize_refresh, run_config

pytestmark = pytest.mark.ui

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LOCATION = "tests.tiny_definitions"
REPORT_ASSET = "comparison_report"
# Dagster draws asset nodes in full (whole names) only at zoom >= 0.6 (MINIMAL_SCALE in its UI).
FULL_NODE_ZOOM = 0.65


@dataclass
class UI:
    url: str
    dagster_home: Path


def artifacts_dir() -> Path:
    path = Path(os.environ.get("UI_ARTIFACTS_DIR") or PROJECT_ROOT / "tests" / "artifacts" / "ui")
    path.mkdir(parents=True, exist_ok=True)
    return path


def graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.load(response)
    assert not body.get("errors"), body["errors"]
    return body["data"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_location(url: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until the webserver answers and has loaded the code location; the server log on failure."""
    query = (
        "{ workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError { __typename "
        "... on PythonError { message } } } } } }"
    )
    deadline, state = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        assert server.poll() is None, f"dagster-webserver exited ({server.returncode}):\n{log.read_text()[-5000:]}"
        try:
            entries = graphql(url, query)["workspaceOrError"]["locationEntries"]
        except OSError as error:  # not listening yet
            state = str(error)
        else:
            loaded = {e["name"]: e["locationOrLoadError"] or {} for e in entries}.get(LOCATION, {})
            assert loaded.get("__typename") != "PythonError", f"{LOCATION} failed to load: {loaded['message']}"
            if loaded.get("__typename") == "RepositoryLocation":
                return
            state = f"location {LOCATION}: {loaded or 'not listed'}"
        time.sleep(0.5)
    pytest.fail(f"dagster-webserver not ready after {timeout:.0f} s ({state}):\n{log.read_text()[-5000:]}")


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory):
    """One tiny refresh into a fresh storage root and instance, then the webserver over both."""
    tmp = tmp_path_factory.mktemp("ui")
    home, dagster_home = tmp / "home", tmp / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")  # no phone-home from tests
    # The code location's resources, with the root the webserver will get from $INSTRUCT_SELECT_HOME.
    resources = {
        **build_resources(home=str(home), env="ci"),
        "model_store": TinyModelStore(cache_dir=str(home / "cache")),
    }
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        materialize_refresh([*tiny_definitions.ASSETS, *ALL_CHECKS], resources, run_config.__wrapped__(tmp), instance)

    url, log = f"http://127.0.0.1:{free_port()}", tmp / "webserver.log"
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "INSTRUCT_SELECT_HOME": str(home)}
    with log.open("w") as out:
        server = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("dagster-webserver")),
                "-h",
                "127.0.0.1",
                "-p",
                url.rsplit(":", 1)[1],
                "-m",
                LOCATION,
                "-d",
                str(PROJECT_ROOT),
            ],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown ends its code server too
        )
    try:
        wait_for_location(url, server, log)
        graphql(url, "mutation { setNuxSeen }")  # else a "Join the Dagster community" dialog covers every page
        yield UI(url=url, dagster_home=dagster_home)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_graphql_lists_every_definition(ui: UI) -> None:
    repo = tiny_definitions.defs.get_repository_def()
    graph = repo.asset_graph
    expected = {
        "assets": {key.to_user_string() for key in graph.get_all_asset_keys()},
        "asset checks": {f"{key.asset_key.to_user_string()}:{key.name}" for key in graph.asset_check_keys},
        "partitions": {
            f"{key.to_user_string()} {partition}"
            for key in graph.get_all_asset_keys()
            if graph.get(key).partitions_def
            for partition in graph.get(key).partitions_def.get_partition_keys()
        },
        "jobs": {job.name for job in repo.get_all_jobs()},
        "schedules": {schedule.name for schedule in repo.schedule_defs},
        "sensors": {sensor.name for sensor in repo.sensor_defs},
    }
    data = graphql(
        ui.url,
        """{ repositoriesOrError { __typename ... on RepositoryConnection { nodes {
        location { name } jobs { name } schedules { name } sensors { name }
        assetNodes { assetKey { path } partitionKeys assetChecksOrError { ... on AssetChecks { checks { name } } } }
    } } } }""",
    )["repositoriesOrError"]
    (repository,) = [r for r in data["nodes"] if r["location"]["name"] == LOCATION]
    nodes = {"/".join(node["assetKey"]["path"]): node for node in repository["assetNodes"]}
    shown = {
        "assets": set(nodes),
        "asset checks": {
            f"{key}:{check['name']}"
            for key, node in nodes.items()
            for check in (node["assetChecksOrError"] or {}).get("checks", [])
        },
        "partitions": {f"{key} {partition}" for key, node in nodes.items() for partition in node["partitionKeys"]},
        **{kind: {item["name"] for item in repository[kind]} for kind in ("jobs", "schedules", "sensors")},
    }
    differences = {
        kind: {"missing": sorted(expected[kind] - shown[kind]), "unexpected": sorted(shown[kind] - expected[kind])}
        for kind in expected
        if expected[kind] != shown[kind]
    }
    assert not differences, f"the UI's GraphQL API disagrees with {LOCATION}.defs: {differences}"
    assert expected["assets"] and expected["asset checks"] and expected["partitions"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed here when missing and we may (no browser download by Playwright)."""
    if shutil.which("chromium") is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode:
                pytest.skip(f"chromium not installed: `{' '.join(command)}` failed: {done.stderr.strip()[-500:]}")
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium not found (on Debian, as root: apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def browser(chromium: str):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[dev]')")
    playwright = sync_api.sync_playwright().start()
    try:
        # Chromium refuses its sandbox as root; containers often have a tiny /dev/shm.
        launched = playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
    except sync_api.Error as error:
        playwright.stop()
        pytest.skip(f"Playwright cannot start {chromium}: {error}")
    yield launched
    launched.close()
    playwright.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def graph_box(page) -> dict | None:
    """The asset graph's <svg>: its size in graph units, and the part of it its pane shows (page pixels)."""
    return page.evaluate("""() => {
        const svg = [...document.querySelectorAll('svg[width][height]')]
            .sort((a, b) => b.getAttribute('width') - a.getAttribute('width'))[0];
        if (!svg) return null;
        const r = svg.getBoundingClientRect();
        const pane = (svg.closest('[tabindex="-1"]') || svg.parentElement).getBoundingClientRect();
        return {width: +svg.getAttribute('width'), height: +svg.getAttribute('height'),
                left: Math.max(r.left, pane.left), top: Math.max(r.top, pane.top),
                right: Math.min(r.right, pane.right), bottom: Math.min(r.bottom, pane.bottom)};
    }""")


# Every line of text drawn in the graph's nodes and group boxes.
GRAPH_TEXTS_JS = (
    "[...document.querySelectorAll('svg foreignObject > *')].flatMap(e => e.innerText.split('\\n')).map(s => s.trim())"
)


# `page` before `ui`: without a browser the tests skip before the tiny run.
def test_asset_graph_page_shows_every_asset(page, ui: UI) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    expected = {
        key.to_user_string() for key in tiny_definitions.defs.get_repository_def().asset_graph.get_all_asset_keys()
    }
    shot = artifacts_dir() / "asset_graph.png"
    try:
        page.goto(f"{ui.url}/asset-groups")
        page.get_by_text("Materialize all").wait_for()
        # "Expand all groups" (the graph settings menu's shortcut): collapsed groups show no asset names.
        page.keyboard.press("Alt+KeyE")
        page.wait_for_url(re.compile(r"expanded="))
        # A window large enough for the whole graph at full-node zoom (the page zooms to fit its width);
        # the reload keeps the expanded groups (they are in the URL).
        box = graph_box(page)
        page.set_viewport_size(
            {
                "width": int(box["left"] + box["width"] * FULL_NODE_ZOOM) + 40,
                "height": int(box["top"] + box["height"] * FULL_NODE_ZOOM) + 80,
            }
        )
        page.reload()
        # Every name drawn, and every node's live status loaded (nodes read "Loading..." until then).
        with contextlib.suppress(PlaywrightTimeout):  # the assertions below say what is wrong
            page.wait_for_function(
                f"names => {{ const shown = {GRAPH_TEXTS_JS}; return names.every(n => shown.includes(n))"
                " && !shown.some(s => s.startsWith('Loading')); }",
                arg=sorted(expected),
                timeout=30_000,
            )
        shown = page.evaluate(f"() => {GRAPH_TEXTS_JS}")
        missing = expected - set(shown)
        assert not missing, f"the asset graph page does not show {sorted(missing)}"
        assert not any(s.startswith("Loading") for s in shown), "the asset graph's nodes never loaded their status"
    finally:
        box = graph_box(page)  # None when the graph never drew: then the whole page
        clip = box and {
            "x": box["left"],
            "y": box["top"],
            "width": box["right"] - box["left"],
            "height": box["bottom"] - box["top"],
        }
        page.screenshot(path=shot, clip=clip if clip and clip["width"] > 0 and clip["height"] > 0 else None)
    if os.environ.get("UPDATE_README_SCREENSHOT") == "1":
        (PROJECT_ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, PROJECT_ROOT / "docs" / "ui_asset_graph.png")


def test_comparison_report_page_shows_its_report(page, ui: UI) -> None:
    with dg.DagsterInstance.from_config(str(ui.dagster_home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(REPORT_ASSET))
    assert event is not None, f"the tiny run did not materialize {REPORT_ASSET}"
    materialization = event.asset_materialization
    markdown = [key for key, value in materialization.metadata.items() if isinstance(value, dg.MarkdownMetadataValue)]
    assert markdown, f"{REPORT_ASSET} has no markdown metadata to show"
    texts = [
        value.value
        for value in materialization.metadata.values()
        if isinstance(value, (dg.TextMetadataValue, dg.PathMetadataValue))
    ]
    shots = artifacts_dir()
    try:
        page.goto(f"{ui.url}/assets/{REPORT_ASSET}")
        page.get_by_text("Latest materialization").wait_for()
        for text in [materialization.partition, *materialization.metadata, *texts]:
            page.get_by_text(text, exact=True).first.wait_for(timeout=10_000)  # its error names the missing text
        page.screenshot(path=shots / "comparison_report.png", full_page=True)

        page.get_by_text("Show Markdown").first.click()
        dialog = page.get_by_role("dialog")
        headings = re.findall(r"^#+\s+(.+?)\s*$", materialization.metadata[markdown[0]].value, re.MULTILINE)
        dialog.get_by_role("heading", name=headings[-1], exact=True).wait_for()
        shown = {heading.inner_text().strip() for heading in dialog.get_by_role("heading").all()}
        assert not set(headings) - shown, f"the rendered report lacks the headings {sorted(set(headings) - shown)}"
    finally:
        page.screenshot(path=shots / "comparison_report_markdown.png", full_page=True)
