"""``adaptune`` command line.

Every user error (bad YAML, unknown key, out-of-range value, missing file or column, a model
that cannot load) prints one line per error to stderr and exits with code 2 before anything is
written.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
import time
from collections.abc import Iterator

from adaptune.search import ui
from adaptune.trainables.errors import ConfigError, TrainingDivergedError

EXIT_USAGE = 2


@contextlib.contextmanager
def naming_file(path: str) -> Iterator[None]:
    """Prefix the experiment file to a ConfigError from the checks that follow loading it
    (search settings, data, model), so every message names the file like the schema's do."""
    try:
        yield
    except ConfigError as err:
        lines = str(err).splitlines() or [""]
        if all(line.startswith(f"{path}: ") for line in lines):
            raise
        named = (ln if ln.startswith(f"{path}: ") else f"{path}: {ln}" for ln in lines)
        raise ConfigError("\n".join(named)) from None


def format_matrix(
    matrix: list[list[float]],
    names: list[str],
    base: list[float] | None,
    extra: dict[str, list[float]] | None = None,
) -> str:
    """The loss matrix as a text table: one row per stage, one column per task, then the
    pretrain domain's ``(base)`` column and the ``extra`` ones (label -> one loss per row:
    ``retain/<name>``)."""
    columns = {**({"(base)": base} if base else {}), **(extra or {})}
    cols = [*names, *columns]
    rows = [["before", *matrix[0]]] + [[f"after {names[i]}", *r] for i, r in enumerate(matrix[1:])]
    rows = [[*r, *(col[i] for col in columns.values())] for i, r in enumerate(rows)]
    width = max(12, *(len(c) for c in cols))
    first = max(len(str(r[0])) for r in rows)
    lines = [" " * first + "  " + "  ".join(f"{c:>{width}}" for c in cols)]
    for r in rows:
        lines.append(f"{r[0]:<{first}}  " + "  ".join(f"{v:>{width}.4f}" for v in r[1:]))
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from adaptune.search.api import train

    if args.dry_run:
        return _train_dry_run(args)
    train(
        args.experiment,
        overrides=args.set,
        out=args.out,
        resume=args.resume,
        stop_after=args.stop_after,
        tracking=not args.no_tracking,
    )
    return 0


def _train_dry_run(args: argparse.Namespace) -> int:
    """``adaptune train --dry-run``: every input check, then the resolved run; nothing written."""
    import yaml
    from adaptune.search.experiment import load_experiment
    from adaptune.trainables.run import prepare

    exp = load_experiment(args.experiment, args.set)
    with naming_file(args.experiment):
        prep = prepare(exp.run)
    names = [t.name for t in prep.tasks]
    print(f"adaptune train {exp.name} (dry run: nothing started, nothing written)")
    print(f"{len(names)} tasks ({', '.join(names)}), "
          f"{sum(t.train_tokens for t in prep.tasks):,} train tokens, model {exp.run.model.name}")
    run = exp.run.model_dump(mode="json", exclude_none=True)
    print(yaml.safe_dump({"run": run}, sort_keys=False), end="")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from adaptune.search.api import search
    from adaptune.search.checks import check_search, check_search_folder
    from adaptune.search.describe import describe_search
    from adaptune.search.experiment import load_experiment, pinned_by_overrides
    from adaptune.search.select import objective_text, search_rule
    from adaptune.search.summary import format_table

    overrides = list(args.set)
    if args.max_failures is not None:
        overrides.append(f"search.max_failures={args.max_failures}")
    exp = load_experiment(args.experiment, overrides, search_name=args.name)
    if args.dry_run:
        from adaptune.trainables.run import prepare

        with naming_file(args.experiment):
            check_search(exp, resume=args.resume, folder=False)
            prep = prepare(exp.run)  # data and model before the name clash: one round of fixes
            check_search_folder(exp, resume=args.resume)
        print(describe_search(exp, prep))
        for name, value in pinned_by_overrides(exp, args.set).items():
            print(f"  {name} = {value!r} (fixed by --set)")
        return 0
    start = time.perf_counter()
    with naming_file(args.experiment):
        summary = search(exp, address=args.address, resume=args.resume).summary
    if summary.interrupted:
        print(f"adaptune: search {exp.name} interrupted; continue it with "
              f"`adaptune search {args.experiment} --resume` (same --set/--name)", file=sys.stderr)
        return 130
    shown = summary.rows[: args.top]
    print(f"\nsearch {exp.name}: {len(summary.rows)} trials in {time.perf_counter() - start:.0f}s "
          f"(best {len(shown)} shown; objective {objective_text(exp.search)}"
          f"{'; * = on the Pareto front' if exp.search.multi_objective else ''})")
    print(format_table(shown, exp.search.metric))
    for note in summary.notes:
        print(f"note: {note}")
    print(f"\nMLflow:   {summary.tracking_uri}  (parent run {summary.parent_run_id})")
    if summary.model_uri is None:
        done = any(r.status == "complete" for r in summary.rows)
        why = f"no trial meets {str(search_rule(exp.search))!r}" if done else (
            "no trial ran every task")
        print(f"adaptune: {why}; nothing registered", file=sys.stderr)
        return 1
    print(f"champion: {summary.model_uri} (version {summary.model_version}, "
          f"trial {summary.best.trial_id if summary.best else '?'}; "
          f"{search_rule(exp.search)})")
    lines = [
        (f"adaptune ui {args.experiment}", "the trials in the MLflow UI, best first"),
        (f"adaptune export {exp.name} -o best.yaml", "the winner as a runnable experiment"),
        ("adaptune train best.yaml", "rerun it"),
    ]
    width = max(len(cmd) for cmd, _ in lines)
    print("\nwhere to look:")
    for cmd, what in lines:
        print(f"  {cmd:<{width}}  # {what}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaptune",
        description="Search continual-learning hyperparameters for language models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run one continual-learning run with fixed values")
    train.add_argument("experiment", help="experiment YAML file")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a hyperparameter (lr=3e-4) or a dotted path (run.stream.block_size=64)",
    )
    train.add_argument("--out", help="output directory (default: runs/train/<name>)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument("--stop-after", type=int, default=None, metavar="K",
                       help="stop after K tasks (resume later with --resume)")
    train.add_argument("--no-tracking", action="store_true",
                       help="do not log the run to MLflow (default: the experiment's tracking)")
    train.add_argument("--dry-run", action="store_true",
                       help="check everything and print the resolved run; write nothing")
    train.set_defaults(func=cmd_train)

    search = sub.add_parser("search", help="search hyperparameters with Ray Tune + Optuna + ASHA")
    search.add_argument("experiment", help="experiment YAML file")
    search.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a hyperparameter (lr=3e-4: pinned, not searched) or a dotted path "
             "(search.num_samples=4, space.lr='{loguniform: [1e-4, 1e-3]}')",
    )
    search.add_argument("--name", help="search name: Ray folder, Optuna study, MLflow parent "
                                       "run (default: the experiment's name)")
    search.add_argument("--resume", action="store_true",
                        help="continue the interrupted search of this name: finished trials "
                             "are kept, unfinished ones restart from their last task checkpoint")
    search.add_argument("--address", help="connect to a running Ray cluster (default: start one)")
    search.add_argument("--max-failures", type=int, default=None, metavar="N",
                        help="retry a failed trial N times from its last checkpoint "
                             "(default: search.max_failures, 0)")
    search.add_argument("--dry-run", action="store_true",
                        help="check everything and print the resolved search; start nothing")
    search.add_argument("--top", type=int, default=10, metavar="K",
                        help="trials shown in the final table")
    search.set_defaults(func=cmd_search)
    ui.add_parser(sub)

    from adaptune.search import export

    export.add_parser(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adaptune")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as err:
        for line in str(err).splitlines() or [""]:
            print(f"adaptune: error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDivergedError as err:
        print(f"adaptune: training diverged: {err}", file=sys.stderr)
        return 1


def console_main() -> None:
    """The ``adaptune`` console script: :func:`main`, then a fast exit.

    Tearing down an interpreter that holds torch, transformers, MLflow and Ray (freeing every
    module's objects one by one) takes seconds after the work is done and the output printed
    (docs/benchmarks.md). The exit handlers still run (Ray's shutdown, MLflow's and logging's
    flushes), then the process leaves without that teardown. An exception out of :func:`main`
    takes Python's usual exit, traceback and all.
    """
    code = main()
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    console_main()
