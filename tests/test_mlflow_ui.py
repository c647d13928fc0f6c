"""The MLflow UI as a researcher opens it after the smoke sweep: a real `mlflow ui` on loopback, read in
headless Chromium (Debian's chromium, driven by Playwright). What a user must see: the failed icon on
diverged trials, the parent run's description, predictions in the Image grid, and the sweep's saved
view grouping the trials by a stabilizer. The runs table's screenshot goes to docs/ when
GOPC_UPDATE_DOCS=1 (the README shows it)."""
import os
import shutil
import sys

import pytest
from playwright.sync_api import expect

from browser import DOCS, served
from gopc.sweep.parent_run import view_link
from gopc.outcome import MLFLOW_STATUS

GREEN, RED = "rgb(39, 124, 67)", "rgb(200, 45, 76)"  # MLflow 3.17's finished / failed-or-killed icons


@pytest.fixture(scope="module")
def ui(smoke):
    """`mlflow ui` over the smoke sweep's database, and a headless Chromium page."""
    folder, settings, client = smoke
    uri = f"sqlite:///{folder}/mlflow.db"  # settings resolve "" against the test's folder, not the sweep's
    command = lambda port: [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,  # noqa: E731
                            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job runner
    with served(command, "/health", folder, {"width": 1700, "height": 760}, env) as (base, page):
        yield base, page, client, (uri, folder, settings.name)


def open_runs(page, url):
    """The runs table in the UI's model-training mode (its default is the GenAI pages)."""
    page.goto(url + ("&" if "?" in url else "?") + "workflowType=machine_learning")
    try:
        page.locator(".ag-row").first.wait_for()
    except Exception:
        page.screenshot(path="/tmp/open_runs_failed.png")
        raise


def unfold(page, parent, trials):
    """Show the parent's nested trials (the UI remembers a parent unfolded, so only if they are hidden)."""
    child = page.locator(f'.ag-row[row-id="{trials[0].info.run_id}"]')
    if not child.count():
        page.locator(f'.ag-row[row-id="{parent.info.run_id}"] [col-id="attributes.`Run Name`"] [role=img]').first.click()
    child.first.wait_for()


def trials_and_parent(client):
    exp = client.get_experiment_by_name("gopc2_stability")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags["role"] == "parent"]
    return exp, parent, [r for r in runs if r.data.tags["role"] == "trial"]


def test_each_trial_shows_its_outcome_by_its_icon(ui):
    base, page, client, (uri, folder, sweep) = ui
    exp, parent, trials = trials_and_parent(client)
    open_runs(page, f"{base}/#/experiments/{exp.experiment_id}/runs")
    unfold(page, parent, trials)
    for run in trials:
        icon = page.locator(f'.ag-row[row-id="{run.info.run_id}"] [col-id=runDateAndNestInfo] .anticon').first
        color = icon.evaluate("e => getComputedStyle(e).color")
        assert color == (GREEN if MLFLOW_STATUS[run.data.tags["status"]] == "FINISHED" else RED), run.data.tags["status"]
    assert {"diverged"} <= {r.data.tags["status"] for r in trials}  # a failed icon was among them


def test_the_parent_run_states_its_result(ui):
    base, page, client, (uri, folder, sweep) = ui
    exp, parent, _ = trials_and_parent(client)
    page.goto(f"{base}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}")
    first = parent.data.tags["mlflow.note.content"].split(".")[0]  # "6 trials: 2 collapsed, 3 diverged, ..."
    page.get_by_text(first).first.wait_for()


def test_the_image_grid_shows_each_validations_predictions(ui):
    base, page, client, (uri, folder, sweep) = ui
    exp, parent, trials = trials_and_parent(client)
    open_runs(page, f"{base}/#/experiments/{exp.experiment_id}/runs")
    unfold(page, parent, trials)
    page.locator("input[value=CHART]").locator("xpath=..").click(force=True)  # the chart view
    page.get_by_role("button", name="Add chart").first.click()
    page.get_by_role("menuitem", name="Image grid").click()
    dialog = page.get_by_role("dialog")
    try:
        dialog.get_by_text("Images", exact=True).last.click()
        page.get_by_role("option", name="predictions/inference").click(force=True)
    except Exception:
        page.screenshot(path="/tmp/grid_failed.png")
        raise
    page.keyboard.press("Escape")  # closes the list, not the dialog
    dialog.get_by_role("slider").first.focus()
    page.keyboard.press("ArrowRight")  # the first validation's step
    images = dialog.locator('img[src*="get-artifact?path=images"]')
    validated = [r for r in trials if "val/prior/mse" in r.data.metrics]  # diverged ones too, if before it
    assert validated
    expect(images).to_have_count(len(validated))  # one per trial that validated, as they load
    assert all(images.nth(i).evaluate("e => e.complete && e.naturalWidth > 0") for i in range(images.count()))


def test_the_sweeps_saved_view_groups_the_trials_by_a_stabilizer(ui):
    """The view the sweep saved answers "which stabilizer keeps GOPC-2 finite": per stab.out_act value, the
    group's average of `diverged` is its divergence rate."""
    base, page, client, (uri, folder, sweep) = ui
    exp, parent, trials = trials_and_parent(client)
    open_runs(page, f"{base}/{view_link(uri, parent.info.run_id, sweep)}")
    page.get_by_role("button", name="Close").click()  # the assistant's panel: room for the table
    for column in ("diverged", "learned", "val/prior/skill_mse"):
        page.locator(".ag-header-cell", has_text=column).first.wait_for()
    for value in {r.data.params["stab.out_act"] for r in trials}:
        group = page.locator(".ag-row", has_text=f"Group: {value}").first
        index = group.get_attribute("row-index")
        cell = page.locator(f'.ag-row[row-index="{index}"] [col-id="metrics.`diverged`"]').first
        runs = [r for r in trials if r.data.params["stab.out_act"] == value]
        rate = sum(r.data.tags["status"] == "diverged" for r in runs) / len(runs)
        assert float(cell.inner_text().split()[0].rstrip(".")) == pytest.approx(rate, abs=1e-3), value
    shot = os.path.join(folder, "mlflow_runs.png")
    page.screenshot(path=shot)
    if os.environ.get("GOPC_UPDATE_DOCS") == "1":
        shutil.copy(shot, os.path.join(DOCS, "mlflow_runs.png"))
