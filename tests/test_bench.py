"""The benchmarks run and print their tables. No speed is asserted here: figures come from the scripts
themselves (docs/performance.md), never from timed tests."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkout_files() -> set[str]:
    """The checkout's top-level names and whatever MLflow's default artifact folder holds."""
    return set(os.listdir(ROOT)) | {os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, "mlruns")) for f in fs}


def run_bench(script: str, timeout: float = 120, args=()) -> str:
    before = checkout_files()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--smoke", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert checkout_files() == before, checkout_files() ^ before  # run from the checkout, it leaves nothing there
    return proc.stdout


def rows(out: str, first: str) -> list[str]:
    return [line for line in out.splitlines() if line.split()[:1] == [first]]


def test_step_prints_one_timed_row_per_model():
    out = run_bench("step.py")
    assert out.startswith("device: ")
    assert re.search(r"^model\s+batch\s+s/step\s+batches/s\s+seq/s\s+vs 1080Ti\s+vs target$", out, re.M)
    for label in ("GOPC-1", "VAE-1", "GOPC-2*"):
        (row,) = rows(out, label)
        assert len(row.split()) == 7, row  # timed, not "diverged at ..." or "out of memory"
    assert "GOPC-2*: stabilized" in out
    assert "fast vs eager: not available" in out


def test_guard_cost_prints_the_ratio():
    out = run_bench("guard_cost.py")
    assert re.search(r"^variant\s+ms/step", out, re.M)
    for variant in ("guard", "no check", "no guard"):
        assert re.search(rf"^{variant}\s+[\d.]+\s", out, re.M), variant
    assert re.search(r"^check alone: [\d.]+ ms per call", out, re.M)
    assert len(re.findall(r"^guard cost ratio \(.+\): -?[\d.]+% of a step, -?[\d.]+ ms", out, re.M)) == 2


@pytest.mark.parametrize("law", ["bounce", "smooth", "stochastic"])
def test_data_gen_prints_a_rate_per_law(law, data_gen_out):
    (row,) = rows(data_gen_out, law)
    assert len(row.split()) == 4 and float(row.split()[2]) > 0, row


@pytest.fixture(scope="module")
def data_gen_out():
    out = run_bench("data_gen.py")
    assert re.search(r"^law\s+s/call\s+seq/s", out, re.M)
    return out


def test_overhead_prints_every_variant_against_the_bare_loop():
    # seven Tuner.fit runs of one tiny trial each, on a Ray instance of its own: a minute, more when loaded
    out = run_bench("overhead.py", timeout=900)
    assert re.search(r"^variant\s+steps\s+fit s\s+spread\s+steps/s\s+vs bare\s+CPU s\s+CPU vs bare\s+objective$", out, re.M)
    for variant in ("bare Ray Tune \\+ Optuna", "service", "service, no validation", "service, no grids",
                    "service, no checkpoint", "service, no MLflow", "service, none of the four"):
        assert re.search(rf"^{variant}\s+4(\s+[\d.]+){{7}}$", out, re.M), variant
    line = re.search(r"^service overhead: (-?[\d.]+)% fewer steps/s than the bare loop \((within|over) the 10% target\); "
                     r"(-?[\d.]+)% fewer steps per CPU second$", out, re.M)
    assert line, out
    # the summary is the service row's ratios to the bare loop (3 decimals, the percentages 1): no speed asserted
    (service,) = [row.split() for row in out.splitlines() if re.match(r"service\s+4\s", row)]
    slower, cpu_slower = float(line[1]), float(line[3])
    assert slower == pytest.approx(100 * (1 - float(service[5])), abs=0.11), (line[0], service)
    assert cpu_slower == pytest.approx(100 * (1 - float(service[7])), abs=0.11), (line[0], service)
    assert line[2] == ("within" if slower <= 10 else "over") or abs(slower - 10) < 0.11, line[0]


def test_search_efficiency_prints_each_searcher():
    out = run_bench("search_efficiency.py", timeout=900)
    for name in ("service", "plain", "random"):
        (row,) = [line for line in out.splitlines() if line.split()[:2] == ["0", name]]
        assert re.search(r"\s[lcdse]{3}\s+\{'", row), row  # three trials, each with an outcome, then Optuna's states
        assert len(rows(out, name)) == 1  # its summary line
    line = re.search(r"^trials to the first learned config, service / random: ([\d.]+) \((meets|misses) the target of 0.5\)$",
                     out, re.M)
    assert line, out
    # the ratio of the summary rows' means (1 decimal each): no efficiency asserted, only the arithmetic and the word
    mean = {name: float(rows(out, name)[0].split()[1]) for name in ("service", "random")}
    ratio = float(line[1])
    assert ratio == pytest.approx(mean["service"] / mean["random"], rel=0.1, abs=0.01), (line[0], mean)
    assert line[2] == ("meets" if ratio <= 0.5 else "misses"), line[0]


def test_packing_prints_a_row_per_pack_with_each_trials_peak_memory():
    out = run_bench("packing.py", timeout=600)  # two service sweeps of tiny trials, packs of 1 and 2
    assert re.search(r"^trials\s+gpu each\s+seq/s total\s+seq/s a trial\s+vs 1 trial\s+peak MB a trial\s+diverged$", out, re.M)
    for k in ("1", "2"):
        (row,) = rows(out, k)
        cells = row.split()
        assert cells[1] == "-" and float(cells[2]) > 0 and 50 < float(cells[5]) < 20_000 and cells[6] == "0", row
    assert re.search(r"^best: [\d.]+ sequences/s in total with [12] trial\(s\) \(the target of 1,500 is for an H100\)$", out, re.M)


def test_scale_runs_every_trial_through_the_service_and_prints_its_costs_per_n():
    out = run_bench("scale.py", timeout=900)  # N = 8 trials of 1 s, 4 at once, through both loops
    assert re.search(r"^\s+N\s+ideal s\s+bare s\s+/ideal\s+service s\s+/ideal\s+svc/bare\s+over s/trial", out, re.M)
    n = 8
    (row,) = [line for line in out.splitlines() if line.split()[:1] == [str(n)]]
    c = row.split()
    ideal, bare, service = float(c[1]), float(c[2]), float(c[4])
    assert ideal == n * 1.0 / 4 and bare >= ideal and service >= ideal, row
    ask_p50, tell_p50 = (float(x.split("/")[0]) for x in (c[9], c[10]))
    assert ask_p50 > 0 and tell_p50 > 0 and float(c[11]) > 0, row  # asked, told and logged for every trial
    assert float(c[13]) > 0 and float(c[14]) > 0, row  # optuna.db and mlflow.db
    assert int(c[16]) == n, row  # every trial's MLflow run ended with its outcome
    assert float(c[17]) >= 0 and float(c[18]) > 0, row  # the saved view's query and gopc best, timed


@pytest.mark.cluster
def test_placement_packs_four_trials_on_each_logical_gpu_and_never_five():
    # 2 logical nodes shaped as cluster/gpu.yaml's gpu_worker (ray.cluster_utils.Cluster), 12 trials asking for
    # the sweep's own resources (cpu 1, gpu 0.25)
    out = run_bench("scale.py", timeout=900, args=["--placement"])
    assert "trials that ran: 12, on 2 nodes;" in out, out
    assert re.search(r"the logical GPUs they were given: \['0'\] \(2 node x GPU\)", out), out
    assert len(re.findall(r"^node \w+: at most 4 trials on its GPU at once$", out, re.M)) == 2, out
    assert "most trials on one GPU at once: 4 (configured: 4); fewest at a node's fullest: 4" in out, out
