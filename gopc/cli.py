"""`gopc train | eval | best`. Bad input ends in one line on stderr naming the field, and exit 2."""
from __future__ import annotations

import argparse
import os
import sys
import time

from gopc import config as C
from gopc.errors import GopcError


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:  # "" or "," would otherwise fall back to train.seed without a word
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2")
    return seeds


def cmd_train(args) -> int:
    from gopc.evaluate import table
    from gopc.tracking import MlflowHooks
    from gopc.train import Hooks, train

    run_id = resume_from = None
    if args.resume:
        resume_from = os.path.join(args.resume, "checkpoint.pt")
        if not os.path.isfile(resume_from):
            raise GopcError(f"--resume: {args.resume} holds no checkpoint.pt; give a run folder written by gopc train")
        cfg = C.load(os.path.join(args.resume, "config.yaml"), args.set)
        id_file = os.path.join(args.resume, "mlflow_run_id")
        run_id = open(id_file).read().strip() if os.path.exists(id_file) else None
    else:
        cfg = C.load(args.config, args.set)
    seeds = args.seeds or [cfg.train.seed]
    if args.resume and len(seeds) > 1:
        raise GopcError("--seeds: cannot be combined with --resume; resume one run at a time")
    outcomes = []
    for seed in seeds:
        run_cfg = C.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "seed": seed}})
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = args.resume or args.out or os.path.join(run_cfg.train.out_dir, f"{run_cfg.model.kind}-s{seed}-{stamp}")
        if args.out and len(seeds) > 1:
            run_dir = os.path.join(args.out, f"seed-{seed}")
        hooks = Hooks() if args.no_mlflow else MlflowHooks(run_cfg, run_id=run_id)
        result = train(run_cfg, run_dir, hooks, resume_from=resume_from, progress=not args.quiet)
        outcomes.append((seed, result))
        if result.status == "diverged":
            d = result.divergence
            print(f"seed {seed}: diverged at step {d.step}: {d.quantity} went {d.value}"
                  f"{'' if d.frame is None else f' at frame {d.frame}'}; last finite checkpoint {d.last_checkpoint}")
        else:
            print(f"seed {seed}: completed {result.step} steps, final loss {result.losses[-1]:.2f}"
                  if result.losses else f"seed {seed}: completed")
            print(table(result.eval, run_cfg.train.learned_margin))
        print(f"run folder: {run_dir}")
    if len(seeds) > 1:
        survivors = [s for s, r in outcomes if r.status == "completed"]
        learned = [s for s, r in outcomes if r.outcome == "learned"]
        print(f"{len(survivors)} of {len(seeds)} seeds survived ({', '.join(map(str, survivors)) or 'none'}); "
              f"{len(seeds) - len(survivors)} diverged; {len(learned)} learned ({', '.join(map(str, learned)) or 'none'})"
              " (for intervals and a comparison with the baselines: sweeps/gopc2_study.py)")
    return 0


def cmd_eval(args) -> int:
    import torch

    from gopc.data import build_datasets
    from gopc.evaluate import evaluate, table
    from gopc.models import build_model
    from gopc.train import pick_device

    ckpt = os.path.join(args.run, "checkpoint.pt")
    if not os.path.isfile(ckpt):
        raise GopcError(f"run: {args.run} holds no checkpoint.pt; give a run folder written by gopc train")
    cfg = C.load(os.path.join(args.run, "config.yaml"), args.set)
    model = build_model(cfg).to(pick_device(cfg.train.device))
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["model"])
    split = build_datasets(cfg.data)[args.split][: args.n]
    metrics, images = evaluate(model, split, cfg, os.path.join(args.run, f"eval-{args.split}"))
    print(table(metrics, cfg.train.learned_margin))
    print("images:", ", ".join(str(p) for p in images.values()))
    return 0


def cmd_best(args) -> int:
    from gopc.sweep.export import export_best
    from gopc.tracking import resolve_uri

    uri = resolve_uri(args.tracking_uri or os.environ.get("GOPC_TRACKING_URI", ""))
    db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    if db and not os.path.isfile(db):  # MLflow would create an empty database just to look in it
        raise GopcError(f"--sweep: no sweep named {args.sweep!r}: there is no MLflow database {db}; "
                        f"run from the sweep's folder or pass --tracking-uri")
    for path in export_best(args.sweep, args.top, args.output, args.tracking_uri, args.experiment):
        print(path)
    return 0


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes are bad input too: one line naming the argument, exit 2 (not usage + SystemExit)."""

    def error(self, message):
        raise GopcError(f"{message} (see {self.prog} --help)")


def cmd_check_cluster(args) -> int:
    from gopc.cluster import check_cluster_file
    prepared = check_cluster_file(args.file)
    print(f"{args.file}: valid ({len(prepared['available_node_types'])} node types, head {prepared['head_node_type']})")
    return 0


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gopc", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one config (optionally over several seeds)")
    t.add_argument("--config", help="run YAML (see configs/); defaults apply to anything left out")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    t.add_argument("--out", help="run folder (default: train.out_dir/KIND-sSEED-TIME)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    t.add_argument("--seeds", type=_seeds, help="re-run over these seeds, e.g. 0,1,2, and report survivors")
    t.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="evaluate a trained run and print the thesis tables")
    e.add_argument("run", help="run folder written by gopc train")
    e.add_argument("--split", choices=["val", "test"], default="test")
    e.add_argument("--n", type=int, default=200, help="sequences to evaluate")
    e.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    e.set_defaults(func=cmd_eval)
    b = sub.add_parser("best", help="export a sweep's top configs as YAML for gopc train --config")
    b.add_argument("--sweep", required=True, help="sweep name (the MLflow parent run's sweep tag)")
    b.add_argument("--top", type=int, default=3)
    b.add_argument("-o", "--output", default="best", help="folder for best-1.yaml, best-2.yaml, ...")
    b.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: sqlite mlflow.db here)")
    b.add_argument("--experiment", default="", help="MLflow experiment (default: the sweep name)")
    b.set_defaults(func=cmd_best)
    c = sub.add_parser("check-cluster", help="validate a Ray cluster launcher YAML offline, as `ray up` would")
    c.add_argument("file")
    c.set_defaults(func=cmd_check_cluster)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        return args.func(args)
    except GopcError as e:
        print(f"gopc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
