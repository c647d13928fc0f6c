"""The Optuna study as a user opens it in optuna-dashboard after the smoke sweep: a real `optuna-dashboard` on
loopback, read in headless Chromium (Debian's chromium, driven by Playwright), as test_mlflow_ui.py reads
MLflow. What a user must see: the history chart scaled to the real objectives (no penalty), a diverged
trial that says so, the objective by its name, and a trial's note with its MLflow link beside its
prediction grids. The study page's screenshot goes to docs/ when GOPC_UPDATE_DOCS=1 (the README shows it)."""
import os
import shutil
import sys

import optuna
import pytest

from browser import DOCS, served
from gopc.sweep.notes import artifact_dir



@pytest.fixture(scope="module")
def dashboard(smoke):
    """`optuna-dashboard` over the smoke sweep's study and artifacts, and a headless Chromium page."""
    folder, settings, client = smoke
    storage = f"sqlite:///{folder}/optuna.db"  # the default: beside mlflow.db
    study = optuna.load_study(study_name=settings.name, storage=storage)
    # wsgiref: one process (its default, gunicorn, forks workers); the console script of this environment
    command = lambda port: [os.path.join(os.path.dirname(sys.executable), "optuna-dashboard"), storage,  # noqa: E731
                            "--artifact-dir", artifact_dir(storage), "--server", "wsgiref",
                            "--host", "127.0.0.1", "--port", str(port), "--quiet"]
    with served(command, "/api/studies", folder, {"width": 1600, "height": 1000}) as (base, page):
        yield base, page, study, client, folder


def y_range(page, title: str) -> list[float]:
    """The y range plotly laid out for the chart whose y axis is titled `title`, once it is drawn (the
    charts render one after another: waited for, not read at once)."""
    return page.wait_for_function("""t => { const e = [...document.querySelectorAll('.js-plotly-plot')]
        .find(e => e._fullLayout && (e._fullLayout.yaxis.title || {}).text === t);
        return e && e._fullLayout.yaxis.range; }""", arg=title).json_value()


def open_trial(page, base, study, number):
    page.goto(f"{base}/dashboard/studies/{study._study_id}/trials")
    page.get_by_text(f"Trial {number}", exact=True).first.click()
    page.get_by_role("heading", name=f"Trial {number} (trial_id=").wait_for()


def test_the_history_is_scaled_to_the_real_objectives_and_named(dashboard):
    base, page, study, client, folder = dashboard
    page.goto(f"{base}/dashboard/studies/{study._study_id}")
    page.get_by_role("heading", name="History").wait_for()
    low, high = y_range(page, "prior/mse")  # the history's axis: the objective by its name, not "Objective 0"
    values = [t.value for t in study.trials if t.value is not None]
    assert max(values) <= high <= 1.5 * max(values), (low, high, values)  # plotly's margin, no 1e6 penalty
    shot = os.path.join(folder, "optuna_dashboard.png")
    page.screenshot(path=shot, full_page=True)
    if os.environ.get("GOPC_UPDATE_DOCS") == "1":
        shutil.copy(shot, os.path.join(DOCS, "optuna_dashboard.png"))


def test_a_diverged_trial_says_it_diverged(dashboard):
    base, page, study, client, folder = dashboard
    trial = next(t for t in study.trials if t.user_attrs.get("status") == "diverged")
    open_trial(page, base, study, trial.number)
    page.get_by_role("heading", name=f"Trial {trial.number}: diverged").wait_for()  # the note's title
    page.get_by_text(f"Diverged at step {trial.user_attrs['diverged_step']}").wait_for()
    page.get_by_text("status diverged").first.wait_for()  # the user attrs


def test_a_trials_note_links_its_mlflow_run_beside_its_prediction_grids(dashboard):
    base, page, study, client, folder = dashboard
    trial = next(t for t in study.trials if t.user_attrs.get("status") in ("learned", "collapsed", "stopped early"))
    run_id = trial.user_attrs["mlflow_run_id"]
    assert client.get_run(run_id).data.tags["trial_id"] == trial.user_attrs["tune_trial_id"]
    open_trial(page, base, study, trial.number)
    page.get_by_role("heading", name=f"Trial {trial.number}: {trial.user_attrs['status']}").wait_for()
    link = page.locator(f'a[href$="/runs/{run_id}"]')
    assert link.first.get_attribute("href").startswith("http://127.0.0.1:5000/#/experiments/")  # `mlflow ui`'s address
    images = page.locator('img[src*="/artifacts/"]')
    images.first.scroll_into_view_if_needed()
    images.first.wait_for()
    assert images.count() == 2  # inference.png and rollout.png of its last validation
    page.wait_for_function("() => [...document.querySelectorAll('img[src*=\"/artifacts/\"]')]"
                           ".every(e => e.complete && e.naturalWidth > 0)")


def test_a_trial_note_noted_again_shorter_reads_back_as_optuna_dashboard_reads_it(tmp_path):
    from optuna_dashboard._note import get_note, note_ver_key

    from gopc.sweep.notes import save_trial_note
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db")
    a, b = study.ask(), study.ask()
    save_trial_note(a, "x" * 5000)  # three of the dashboard's chunks
    save_trial_note(b, "the other trial")
    save_trial_note(a, "noted again")  # a resumed driver notes a trial again: the old chunks must not show
    assert (get_note(a), get_note(b)) == ("noted again", "the other trial")
    assert study._storage.get_study_system_attrs(study._study_id)[note_ver_key(a._trial_id)] == 2  # the dashboard's editor checks the version
