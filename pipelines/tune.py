"""Search GAN configs with Ray Tune: every trial a Ray Train run, ASHA stops the weak ones
on FID (or PBT continues them from strong ones), the sweep is one MLflow parent run, and
the best generator is registered.

    python pipelines/tune.py                                   # local sweep, about 10 minutes
    python pipelines/tune.py --budget-minutes 30 --trials 16
    python pipelines/tune.py --space optim.lr_g=loguniform:1e-5:1e-3 --space model.width=choice:32,64
    python pipelines/tune.py --space-file my_space.yaml --search optuna
    python pipelines/tune.py --resume                          # continue an interrupted sweep
    python pipelines/tune.py --scheduler pbt --trials 4        # population-based training
    ray job submit --working-dir . -- python pipelines/tune.py --workers-per-trial 2 --gpus-per-worker 1 \\
        --storage s3://bucket/sweeps --tracking-uri http://mlflow:5000 --kimg-per-round 200
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback

from gan.cli import add_config_args, add_run_args, add_sweep_args, fail
from gan.core.config import ConfigError, override, preset
from gan.data.storage import Storage
from gan.errors import USER_ERRORS
from gan.preflight import preflight
from gan.sweeps import plan as plans
from gan.sweeps import space as spaces


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_args(parser)
    add_sweep_args(parser)
    add_run_args(parser, "sweep", experiment="gan-sweeps")
    args = parser.parse_args(argv)
    try:
        base = override(preset(args.preset), args.overrides)
        spec = spaces.load_space_file(args.space_file) if args.space_file else spaces.default(args.gpus_per_worker > 0)
        if args.scheduler == "pbt" and not args.space_file:
            spec = spaces.mutable_only(spec)
        spec.update(spaces.parse_override(text) for text in args.space)
        space = spaces.build_space(base, spec)
        if args.scheduler == "pbt":
            spaces.check_mutable(space)
        scaling = plans.Scaling(args.workers_per_trial, args.gpus_per_worker > 0, args.cpus_per_worker,
                                args.gpus_per_worker or 1.0)  # fmt: skip
        if args.budget_minutes <= 0:  # it sizes the rounds only once Ray is up: refused before
            raise ConfigError(f"--budget-minutes {args.budget_minutes:g}: must be positive")
        plan = plans.Plan(
            trials=args.trials, rounds=args.rounds, grace_rounds=args.grace_rounds,
            reduction_factor=args.reduction_factor, search=args.search, seed=args.search_seed, scaling=scaling,
            kimg_per_round=1.0 if args.kimg_per_round is None else args.kimg_per_round, scheduler=args.scheduler,
            perturbation_rounds=args.perturbation_rounds,
        )  # fmt: skip
        storage = Storage.parse(args.storage, args.s3_endpoint, args.shared_storage)
        classes_vary = any(key == "model.num_classes" or key.startswith("data.") for key in space)
        preflight(base, classes_vary=classes_vary, names=() if args.no_tracking else (args.name, args.model_name))
    except USER_ERRORS as err:
        return fail(str(err))
    if args.dry_run:
        print(base.to_json() + "\nsearch space:\n" + spaces.describe(space))
        return 0
    try:
        return run(args, base, space, plan, storage)
    except USER_ERRORS as err:
        return fail(str(err))


def run(args: argparse.Namespace, base, space, plan: plans.Plan, storage: Storage) -> int:
    from gan.core.redact import redact_uri
    from gan.registry.tracking import MLflowTracker, Tracker, TrackingTarget, resolve_uri, source_tags, ui_link
    from gan.runs.ray_train import connect
    from gan.sweeps import ray_tune
    from gan.sweeps import report as reports

    storage.check()
    if args.name:  # refused before Ray starts; a derived name waits for the cluster's round length
        storage.claim(args.name, args.resume, "sweep")
    connect(storage)
    max_concurrent = ray_tune.concurrency(plan, args.max_concurrent)
    if args.kimg_per_round is None:
        plan = dataclasses.replace(plan, kimg_per_round=plans.kimg_per_round(plan, args.budget_minutes, max_concurrent))
    name = args.name or plans.sweep_name(base, space, plan)
    if not args.name:
        storage.claim(name, args.resume, "sweep")
    parent = None
    if not args.no_tracking:
        target = TrackingTarget(resolve_uri(args.tracking_uri), args.experiment, name,
                                source=source_tags("pipelines/tune.py"), location=storage.join(name))  # fmt: skip
        parent = MLflowTracker(target, tags={"sweep.kind": "parent"})
        parent.log_params({**plans.plan_params(plan), **{f"base.{k}": v for k, v in base.flat().items()}})
        parent.log_dict(spaces.space_as_dict(space), "search_space.json")
    tracking = dataclasses.replace(parent.target, parent_run_id=parent.run_id) if parent else None
    setup = ray_tune.TrialSetup(base.to_json(), plan, name, storage, tracking, spaces.searched(space))
    print(
        f"{'resuming' if args.resume else 'starting'} sweep {name!r}: {plan.trials} trials x up to {plan.rounds} "
        f"rounds of {plan.kimg_per_round:g} kimg, {plans.describe_scheduler(plan)} on FID, {plan.search} search, "
        f"{max_concurrent} at a time, {plan.scaling.workers} worker(s) each; "
        f"storage {storage.join(name)}\n{spaces.describe(space)}",
        flush=True,
    )
    started = time.monotonic()
    with parent or Tracker() as run:  # ends the parent run FINISHED, FAILED or KILLED
        rows = ray_tune.trial_rows(ray_tune.run_trials(setup, space, max_concurrent, args.resume), plan, storage)
        if parent:
            ray_tune.close_stopped_runs(rows, setup)
        print(f"\nsweep {name!r} done in {time.monotonic() - started:.0f}s", flush=True)
        summary = reports.summarize(rows, space, plan)
        print(f"{summary.text}\n{len(rows)} trials, {summary.worker_s:.0f} worker-seconds", flush=True)
        try:
            rendered = reports.render(summary, storage, name)
            published = None
            if parent:
                from gan.registry.publish import publish

                published = publish(
                    summary, rendered, plan, name, parent, None if args.no_register else args.model_name
                )
        except Exception as err:  # the trials are safe: say how to report them again
            run.status = "FAILED"
            traceback.print_exc()
            return fail(
                f"the trials finished but the sweep's report failed ({type(err).__name__}: {err}); they are kept in "
                f"{storage.join(name)}: run the same command with --resume to report them without training again",
                code=1,
            )
        best = summary.best
        if best is None:
            run.status = "FAILED"
            return fail("no trial finished an evaluation; see the errors above", code=1)
        meta = rendered.best_meta
        print(
            f"\nbest: trial {best.trial_id}, FID {best.best_fid:.2f} (floor {meta.get('fid_floor', 0):.2f}) "
            f"at kimg {meta.get('images_seen', 0) / 1000:.1f}\n  checkpoint {best.best_checkpoint}\n  config "
            + " ".join(f"{k}={v}" for k, v in best.params.items())
            + f"\n  summary, FID plot and samples in {storage.join(name)}/",
            flush=True,
        )
    if parent is None:
        return 0
    from gan.registry.promotion import trust_flags

    uri, model = redact_uri(parent.target.uri), args.model_name  # printed: no password
    trusted = f"{trust_flags(base)} " if trust_flags(base) else ""
    if published.registered:
        print(f"registered models:/{published.registered} (run {published.run_id})")
    print(
        f"MLflow: experiment {args.experiment!r} at {uri}, parent run {name!r}\n"
        f"  review: {redact_uri(ui_link(parent.target, parent.run_id))}\nnext:\n"
        f"  python pipelines/promote.py --sweep {name} --experiment {args.experiment} --model-name {model} {trusted}"
        f"--tracking-uri {uri}\n"
        f"  python pipelines/sample.py --model models:/{model}@champion --grid grid.png --tracking-uri {uri}\n"
        f"  MLFLOW_TRACKING_URI={uri} mlflow models serve -m models:/{model}@champion --env-manager local -p 5001",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
