"""Command line: ``python -m fcr {validate,train,distill,schedules,evaluate} -f params/a.yaml [-f b.yaml] [--set key=value]``.

Parameter files merge left to right with a shallow update (as papermill's ``-f``); ``--set``
values are read as YAML scalars. Everything is validated before any work or output; ``validate``
also runs the setting's checks for each ``--task`` (default: every task the setting implements).
Bad parameters, data or model paths print ``error: ...`` and exit with status 2.
``distill``: progressive distillation (:func:`fcr.train.distillation.distill`). ``schedules``: budgeted
cache schedules searched on calibration data (:func:`fcr.experiments.cache_schedules.search_schedules`),
written to ``output_dir/run_name/schedules.json`` for a sweep's ``searched_schedules``.
``evaluate``: the sweep's quality evaluation of a Stable Diffusion run, sharded over any number of
processes and resumable (:func:`fcr.experiments.sharded_eval.evaluate_sharded`).
Data-parallel training and evaluation: ``torchrun --nproc_per_node N -m fcr train ...`` or
``accelerate launch --num_processes N -m fcr evaluate ...`` (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from fcr.backends.checks import check_task
from fcr.config import SETTING_TASKS, TASKS, ConfigError, load_options, parse_sets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcr", description=__doc__)
    parser.add_argument("command", choices=("validate", "train", "distill", "schedules", "evaluate"))
    parser.add_argument("-f", "--params", action="append", default=[], help="parameter YAML file (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one parameter")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this many optimizer steps (resumable)")
    parser.add_argument("--task", action="append", choices=TASKS, default=None,
                        help="validate: check the parameters for this task (repeatable; default all of the setting's)")
    args = parser.parse_args(argv)
    from fcr.backends.models import ModelNotFoundError

    try:
        opts = load_options(*args.params, overrides=parse_sets(args.set))
        tasks = ({"train": ["finetune"], "distill": ["distill"], "schedules": ["sweep"], "evaluate": ["evaluate"]}.get(args.command) or args.task
                 or list(SETTING_TASKS[opts.run.setting]))
        for task in tasks:
            check_task(opts, task)
    except (ConfigError, ModelNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(yaml.safe_dump(opts.to_flat(), sort_keys=True))
        return 0
    if args.command == "schedules":
        from fcr.experiments.cache_schedules import search_schedules

        out = Path(opts.run.output_dir) / opts.run.run_name / "schedules.json"
        try:
            chosen = search_schedules(opts, out)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{out}: " + ", ".join(f"{c.name} ({c.relative_flops:.3f})" for c in chosen))
        return 0
    from fcr.train.finetune import finetune
    from fcr.train.loop import DistributedSetupError, init_distributed

    try:
        state = init_distributed()  # several launched processes: one group, or a refusal before anything is written
        if args.command == "evaluate":
            return _evaluate(opts, state)
        if args.command == "distill":
            from fcr.train.distillation import distill

            rounds = distill(opts, stop_after=args.stop_after)
            if os.environ.get("RANK", "0") == "0":
                print(f"finished rounds: {[str(r) for r in rounds]}")
            return 0
        result = finetune(opts, stop_after=args.stop_after)
    except DistributedSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (ConfigError, ModelNotFoundError, FileNotFoundError) as exc:  # data or model paths
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        print(f"finished at step {result.last_step}; log {result.log_path}; weights {result.ema_dir or result.unet_dir}")
    return 0


def _evaluate(opts, state) -> int:
    from fcr.experiments.sharded_eval import evaluate_sharded, evaluation_dir
    from fcr.experiments.sweep import model_labels

    table = evaluate_sharded(opts, model_labels(opts.sweep.sweep_models), rank=state.process_index,
                             world=state.num_processes, barrier=state.wait_for_everyone)
    if table is not None:
        print(f"{evaluation_dir(opts) / 'quality.csv'}: {len(table)} configurations x seeds, "
              f"{state.num_processes} process(es)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
