"""`gopc train | eval | best`. Bad input ends in one line on stderr naming the field, and exit 2.
torch, Ray and MLflow are imported inside the commands that use them, so that a mistyped command line
is refused in a fraction of a second."""
from __future__ import annotations

import argparse
import glob
import os
import signal
import sys
import time

from gopc import config as C
from gopc import outcome as O
from gopc.console import quiet_libraries
from gopc.disk import DiskFull
from gopc.errors import ArgumentParser, GopcError
from gopc.runfolder import DIVERGENCE_FILE, check_free, diverged_at


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:  # "" or "," would otherwise fall back to train.seed without a word
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2")
    if min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} holds a negative seed; seeds are 0 or more")
    if len(set(seeds)) < len(seeds):  # the same seed twice would train twice into one folder
        raise argparse.ArgumentTypeError(f"{text!r} names a seed twice; give each seed once")
    return seeds


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return n


def _run_folder(path: str, option: str, free: bool = False) -> str:
    """A run folder as users name it: with ~, or its checkpoint.pt instead of the folder. `free`: no
    other run may be using it (checked first: a running run may not have written its checkpoint yet)."""
    path = os.path.expanduser(path)
    if os.path.basename(os.path.normpath(path)) == "checkpoint.pt" and os.path.isfile(path):
        path = os.path.dirname(path) or "."
    if free:
        check_free(path, option)
    if not os.path.isfile(os.path.join(path, "checkpoint.pt")):
        if (step := diverged_at(path)) is not None:  # a run, but one with no finite weights to go on from
            raise GopcError(f"{option}: {path} diverged at step {step}, before its first checkpoint, so it holds no "
                            "finite weights; train it again, e.g. with a stabilizer (stab.*) or a lower train.lr")
        raise GopcError(f"{option}: {path} holds no checkpoint.pt; give a run folder written by gopc train")
    return path


def _default_run_dir(cfg: C.Config, seed: int, stamp: str) -> str:
    """train.out_dir/KIND-sSEED-TIME-PID: the pid keeps apart two runs started in the same second on one machine."""
    return os.path.join(os.path.expanduser(cfg.train.out_dir), f"{cfg.model.kind}-s{seed}-{stamp}-{os.getpid()}")


def _check_new_run_folder(run_dir: str, option: str) -> None:
    """A new run never lands on an existing one: its checkpoint, config and evaluation would be replaced."""
    C.check_creatable(run_dir, option)
    check_free(run_dir, option)
    if os.path.isdir(run_dir) and any(os.path.exists(os.path.join(run_dir, f)) for f in RUN_FILES):
        raise GopcError(f"{option}: {run_dir} already holds a run; choose a new folder, or continue that run "
                        f"with gopc train --resume {run_dir}")


RUN_FILES = ("checkpoint.pt", "config.yaml", "mlflow_run_id", "eval")  # what makes a folder a run


def cmd_train(args) -> int:
    from gopc.evaluate import table
    from gopc.run_tracking import MlflowHooks, check_tracking, run_uri
    from gopc.train import Hooks, train

    run_id = resume_from = folder = None
    field = "--resume" if args.resume else "--out" if args.out else "train.out_dir"  # what named the run folder
    if args.resume:
        for option in ("config", "out", "seeds"):  # each would be ignored or contradict the run folder
            if getattr(args, option) is not None:
                raise GopcError(f"--{option}: cannot be combined with --resume, which continues the run folder "
                                f"with its own config.yaml; drop --{option} (change values with --set)")
        folder = _run_folder(args.resume, "--resume", free=True)
        resume_from, saved = os.path.join(folder, "checkpoint.pt"), os.path.join(folder, "config.yaml")
        cfg = C.load(saved, args.set, field="--resume")
        done = C.load(saved, field="--resume").train.steps
        if os.path.isfile(os.path.join(folder, "eval", "metrics.json")) and cfg.train.steps <= done:
            raise GopcError(f"--resume: {folder} completed its {done} steps; to train on, raise train.steps, "
                            f"e.g. --set train.steps={2 * done}")
        id_file = os.path.join(folder, "mlflow_run_id")
        run_id = open(id_file).read().strip() if os.path.exists(id_file) else None
        run_dirs = {cfg.train.seed: folder}
    else:
        cfg = C.load(args.config, args.set)
        seeds = args.seeds or [cfg.train.seed]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = os.path.expanduser(args.out) if args.out else None
        run_dirs = {seed: (os.path.join(out, f"seed-{seed}") if len(seeds) > 1 else out) if out else
                    _default_run_dir(cfg, seed, stamp) for seed in seeds}
        for run_dir in run_dirs.values():
            _check_new_run_folder(run_dir, field)
    uri = None
    if not args.no_mlflow:
        uri = run_uri(cfg, folder)
        check_tracking(uri, "mlflow.tracking_uri", run_id)

    outcomes = []
    for seed, run_dir in run_dirs.items():
        run_cfg = C.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "seed": seed}})
        hooks = Hooks() if args.no_mlflow else MlflowHooks(run_cfg, run_id=run_id, uri=uri)
        try:
            result = train(run_cfg, run_dir, hooks, resume_from=resume_from, progress=not args.quiet, field=field)
        except DiskFull as e:  # stopped, its last checkpoint kept: KILLED, as after a signal; later seeds do not start
            hooks.failed(resumable=True)
            then = (f"resume with: gopc train --resume {run_dir}" if e.resumable else
                    f"start it again (remove {run_dir} first, or choose another folder)")
            raise DiskFull(f"{e}: free space, then {then}", e.resumable) from None
        except BaseException:
            hooks.failed()  # its MLflow run ends FAILED, not RUNNING for ever
            raise
        if result.status == O.KILLED:  # a signal: the one line says how to go on; later seeds do not start
            print(f"gopc: {signal.Signals(result.signal).name} at step {result.step}: checkpoint saved; "
                  f"resume with: gopc train --resume {run_dir}", file=sys.stderr)
            return 128 + result.signal
        outcomes.append((seed, result))
        if result.status == O.DIVERGED:
            d = result.divergence
            first = min(run_cfg.train.ckpt_every, run_cfg.train.steps)  # a run's first checkpoint is due there
            kept = (f"last finite checkpoint {d.last_checkpoint}" if d.last_checkpoint else
                    f"no finite checkpoint (it diverged before the first one, due at step {first})")
            print(f"seed {seed}: diverged at step {d.step}: {d.quantity} went {d.value}"
                  f"{'' if d.frame is None else f' at frame {d.frame}'}; {kept}")
        else:
            print(f"seed {seed}: completed {result.step} steps, final loss {result.losses[-1]:.2f}"
                  if result.losses else f"seed {seed}: completed")
            print(table(result.eval, run_cfg.train.learned_margin))
        print(f"run folder: {run_dir}")
    if len(run_dirs) > 1:
        survivors = [s for s, r in outcomes if r.status == O.COMPLETED]
        learned = [s for s, r in outcomes if r.outcome == O.LEARNED]
        print(f"{len(survivors)} of {len(run_dirs)} seeds survived ({', '.join(map(str, survivors)) or 'none'}); "
              f"{len(run_dirs) - len(survivors)} diverged; {len(learned)} learned ({', '.join(map(str, learned)) or 'none'})"
              " (for intervals and a comparison with the baselines: sweeps/gopc2_study.py)")
    return 0


def cmd_eval(args) -> int:
    from gopc.checkpoint import load_checkpoint
    from gopc.data import build_datasets
    from gopc.evaluate import evaluate, table
    from gopc.models import build_model
    from gopc.train import pick_device

    folder = _run_folder(args.run, "run")
    cfg = C.load(os.path.join(folder, "config.yaml"), args.set, field="run")
    out_dir = os.path.join(folder, f"eval-{args.split}")
    C.check_creatable(out_dir, "run")
    model = build_model(cfg).to(pick_device(cfg.train.device))
    state = load_checkpoint(os.path.join(folder, "checkpoint.pt"), model, cfg, field="run")
    sequences = build_datasets(cfg.data)[args.split]
    if args.n is not None and args.n > len(sequences):  # it would quietly evaluate fewer
        raise GopcError(f"--n: {args.n} is more than the {len(sequences)} sequences of the {args.split} split "
                        f"(data.n_{args.split}); give at most {len(sequences)}")
    metrics, images = evaluate(model, sequences[: args.n or 200], cfg, out_dir)
    # a resumed run may have trained on past an old divergence: only a checkpoint up to it is its last finite one
    if (step := diverged_at(folder)) is not None and state["step"] <= step:
        print(f"{folder} diverged at step {step} ({os.path.join(folder, DIVERGENCE_FILE)}); evaluated its last "
              f"finite checkpoint, from step {state['step']}")
    print(table(metrics, cfg.train.learned_margin))
    print("images:", ", ".join(str(p) for p in images.values()))
    return 0


def cmd_best(args) -> int:
    from gopc.run_tracking import check_tracking, resolve_uri

    output = os.path.expanduser(args.output)
    if earlier := sorted(glob.glob(os.path.join(output, "best-*.yaml"))):  # never overwrite an export
        raise GopcError(f"--output: {output} already holds {os.path.basename(earlier[0])} from an earlier export; "
                        f"choose a new folder with -o, or remove those files")
    uri = resolve_uri(args.tracking_uri or os.environ.get("GOPC_TRACKING_URI", ""))
    db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    if db and not os.path.isfile(db):  # MLflow would create an empty database just to look in it
        raise GopcError(f"--sweep: no sweep named {args.sweep!r}: there is no MLflow database {db}; "
                        f"run from the sweep's folder or pass --tracking-uri")
    check_tracking(uri, "--tracking-uri", write=False)  # gopc best only reads: a read-only database will do
    C.check_creatable(output, "--output")
    from gopc.sweep.export import export_best  # after the checks: it imports Ray's and MLflow's heavy parts
    paths = export_best(args.sweep, args.top, output, uri, args.experiment, args.optuna_storage)
    if len(paths) < args.top:
        print(f"gopc best: --top {args.top}, but only {len(paths)} trial(s) trained to the end; exported those")
    for path in paths:
        print(path)
    return 0


def cmd_check_cluster(args) -> int:
    from gopc.cluster import check_cluster_file
    prepared = check_cluster_file(args.file)
    print(f"{args.file}: valid ({len(prepared['available_node_types'])} node types, head {prepared['head_node_type']})")
    return 0


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="gopc", description=__doc__)
    p.add_argument("--verbose", action="store_true", help="also show MLflow's and Ray's INFO lines")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one config (optionally over several seeds)")
    t.add_argument("--config", help="run YAML (see configs/); defaults apply to anything left out")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    t.add_argument("--out", help="run folder (default: train.out_dir/KIND-sSEED-TIME-PID)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    t.add_argument("--seeds", type=_seeds, help="re-run over these seeds, e.g. 0,1,2, and report survivors")
    t.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="evaluate a trained run and print the thesis tables")
    e.add_argument("run", help="run folder written by gopc train")
    e.add_argument("--split", choices=["val", "test"], default="test")
    e.add_argument("--n", type=_count, help="sequences to evaluate (default: 200, or the whole split if smaller)")
    e.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    e.set_defaults(func=cmd_eval)
    b = sub.add_parser("best", help="export a sweep's top configs as YAML for gopc train --config")
    b.add_argument("--sweep", required=True, help="sweep name (the MLflow parent run's sweep tag)")
    b.add_argument("--top", type=_count, default=3)
    b.add_argument("-o", "--output", default="best", help="folder for best-1.yaml, best-2.yaml, ...")
    b.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: sqlite mlflow.db here)")
    b.add_argument("--optuna-storage", default="", help="the sweep's Optuna study storage (default: "
                   "$GOPC_OPTUNA_STORAGE, else optuna.db beside the MLflow database, else here)")
    b.add_argument("--experiment", default="", help="MLflow experiment (default: the sweep name)")
    b.set_defaults(func=cmd_best)
    c = sub.add_parser("check-cluster", help="validate a Ray cluster launcher YAML offline, as `ray up` would")
    c.add_argument("file")
    c.set_defaults(func=cmd_check_cluster)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        quiet_libraries(args.verbose)
        return args.func(args)
    except GopcError as e:
        print(f"gopc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which stops cleanly on its own)
        print("gopc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
