"""The Dagster UI in a real browser (Debian's chromium driven by Playwright, headless, kept
off the network): the asset graph with every family group, an asset's metadata with its
plot, its checks, and a materialization launched from the UI that succeeds.

Screenshots go to test-artifacts/browser/ (or $ALIGNFOUNDRY_TEST_ARTIFACTS).
"""

import os
import re
import time
from pathlib import Path

import httpx
import pytest
from dagster_dev import REPO, dagster_dev

CHROMIUM = Path("/usr/bin/chromium")
# Headless, and no background connections: this machine's network is closed.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
]
RUNS = "{ runsOrError(limit: 5) { ... on Runs { results { runId status jobName } } } }"
FAMILY_GROUPS = (
    "seeds",
    "responses",
    "trace",
    "ultraprompt",
    "personaknob",
    "personaatlas",
    "medad",
    "quality",
)

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (make browser installs it)"
)


def docs_shot(page, name: str) -> None:
    """With ALIGNFOUNDRY_SCREENSHOTS set (to docs/screenshots), also keep a screenshot
    for the README."""
    target = os.environ.get("ALIGNFOUNDRY_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(target) / name))


def artifacts() -> Path:
    out = Path(os.environ.get("ALIGNFOUNDRY_TEST_ARTIFACTS", REPO / "test-artifacts")) / "browser"
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_ids(url: str) -> set[str]:
    runs = httpx.post(f"{url}/graphql", json={"query": RUNS}, timeout=10).json()
    return {r["runId"] for r in runs["data"]["runsOrError"]["results"]}


def wait_for_run(url: str, before: set[str], timeout_s: float = 180) -> dict:
    """The run launched from the UI (one not in `before`: the launch is asynchronous, so
    the newest run may still be the one made beforehand), once it has finished."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = httpx.post(f"{url}/graphql", json={"query": RUNS}, timeout=10).json()
        new = [r for r in runs["data"]["runsOrError"]["results"] if r["runId"] not in before]
        if new and new[0]["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            return new[0]
        time.sleep(1)
    raise AssertionError("the run launched from the UI did not finish")


def test_a_person_uses_the_ui(cli_env, tmp_path):
    from dagster import DagsterInstance
    from playwright.sync_api import expect, sync_playwright

    from pipelines.definitions import build_definitions

    shots = artifacts()
    # A family with a plot and Data Docs to look at: the responses slice, made beforehand.
    made = (
        build_definitions(cli_env["ALIGNFOUNDRY_HOME"])
        .resolve_job_def("responses")
        .execute_in_process(
            instance=DagsterInstance.from_config(cli_env["DAGSTER_HOME"]),
            run_config={"ops": {"judged_responses_assets": {"config": {"limit": 4}}}},
        )
    )
    assert made.success
    docs_url = next(
        e.metadata["data_docs_url"].value
        for e in made.get_asset_check_evaluations()
        if e.asset_check_key.name == "responses_curated_integrity_suite"
    )
    with dagster_dev(cli_env) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        try:
            # the asset graph, with every family group
            page.goto(f"{url}/asset-groups")
            skip = page.get_by_role("button", name="Skip")  # the newsletter prompt
            skip.click(timeout=20_000)
            for group in FAMILY_GROUPS:
                expect(page.get_by_text(group, exact=True).first).to_be_visible(timeout=20_000)
            page.screenshot(path=str(shots / "1-asset-graph.png"))
            docs_shot(page, "lineage.png")

            # launch a materialization from the asset page
            page.goto(f"{url}/assets/seed_personas")
            before = run_ids(url)
            page.locator("button", has_text="Materialize").first.click()
            page.get_by_role("button", name="Confirm").click()  # seed_personas_rejected comes too
            run = wait_for_run(url, before)
            assert run["status"] == "SUCCESS", run

            # the run page says it succeeded
            page.goto(f"{url}/runs/{run['runId']}")
            expect(page.get_by_text(re.compile("Success")).first).to_be_visible(timeout=20_000)
            page.screenshot(path=str(shots / "2-run.png"))

            # the asset's metadata: counts and a plot
            page.goto(f"{url}/assets/seed_personas?view=events")
            expect(page.get_by_text("rows_in", exact=True).first).to_be_visible(timeout=20_000)
            expect(page.get_by_text("kept", exact=True).first).to_be_visible()
            page.screenshot(path=str(shots / "3-metadata.png"), full_page=True)
            page.get_by_text("[Show Markdown]").first.click()
            plot = page.locator("img[src^='data:image/png;base64,']").first
            expect(plot).to_be_visible(timeout=20_000)
            box = plot.bounding_box()
            assert box and box["width"] > 100 and box["height"] > 50
            page.screenshot(path=str(shots / "4-plot.png"))
            page.keyboard.press("Escape")

            # its checks, evaluated by the run
            page.goto(f"{url}/assets/seed_personas?view=checks")
            for check in ("seed_personas_accounted", "seed_personas_integrity_suite"):
                expect(page.get_by_text(check).first).to_be_visible(timeout=20_000)
            expect(page.get_by_text(re.compile("Passed|Succeeded")).first).to_be_visible()
            page.screenshot(path=str(shots / "5-checks.png"), full_page=True)

            # a family's plot: the curated responses' diversity
            page.goto(f"{url}/assets/responses_curated?view=events")
            expect(page.get_by_text("diversity", exact=True).first).to_be_visible(timeout=20_000)
            docs_shot(page, "asset.png")
            row = page.locator("tr").filter(has=page.get_by_text("diversity", exact=True))
            row.get_by_text("[Show Markdown]").first.click()
            plot = page.locator("img[alt='responses_curated: diversity']").first
            expect(plot).to_be_visible(timeout=20_000)
            assert (plot.bounding_box() or {}).get("width", 0) > 300
            page.screenshot(path=str(shots / "6-family-plot.png"))
            docs_shot(page, "plot.png")
            page.keyboard.press("Escape")

            # the suite check's Data Docs link opens offline, and so does the index
            assert docs_url.startswith("file://")
            page.goto(docs_url)
            suite_link = page.get_by_role("link", name="responses_curated.integrity")
            expect(suite_link.first).to_be_visible(timeout=20_000)
            expect(page.get_by_text("Status: Succeeded").first).to_be_visible()
            page.screenshot(path=str(shots / "7-data-docs-page.png"), full_page=True)
            index = Path(cli_env["ALIGNFOUNDRY_HOME"]) / "data_docs" / "index.html"
            page.goto(index.as_uri())
            link = page.get_by_role("link", name="responses_curated.integrity")
            expect(link.first).to_be_visible(timeout=20_000)
            link.first.click()
            expect(page.get_by_text("Evaluated Expectations").first).to_be_visible(timeout=20_000)
            page.screenshot(path=str(shots / "8-data-docs-index-link.png"))
        except Exception:
            page.screenshot(path=str(shots / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
