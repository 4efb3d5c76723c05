"""Search GAN configs with Ray Tune: every trial a Ray Train run, ASHA stops the weak ones
on FID, the sweep is one MLflow parent run, and the best generator is registered.

    python pipelines/tune.py                                   # local sweep, about 10 minutes
    python pipelines/tune.py --budget-minutes 30 --trials 16
    python pipelines/tune.py --space optim.lr_g=loguniform:1e-5:1e-3 --space model.width=choice:32,64
    python pipelines/tune.py --space-file my_space.yaml --search optuna
    python pipelines/tune.py --resume                          # continue an interrupted sweep
    ray job submit --working-dir . -- python pipelines/tune.py --workers-per-trial 2 --gpus-per-worker 1 \\
        --storage s3://bucket/sweeps --tracking-uri http://mlflow:5000 --kimg-per-round 200
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import fsspec

from gan import checkpoint, sweep
from gan.cli import add_config_args, fail
from gan.config import ConfigError, override, preset
from gan.distributed import Scaling, connect, run_exists, storage_for, storage_options
from gan.sampling import class_grid, generator_from_state, png_bytes
from gan.tracking import MLflowTracker, TrackingError, TrackingTarget, git_commit, prepare, resolve_uri, run_id_of

# The local budget rule: images one CPU worker trains per second (DCGAN at width 32-64,
# one thread, this project's 2-core reference machine), and the share of a sweep's wall
# time that is training rather than trial start-up and evaluation.
CPU_IMG_PER_S = 250
TRAINING_SHARE = 0.6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_args(parser)
    space = parser.add_argument_group("search space")
    space.add_argument("--space-file", help="YAML/JSON file mapping SECTION.FIELD to a value or {kind: [...]}; "
                       "replaces the default space")  # fmt: skip
    space.add_argument("--space", action="append", default=[], metavar="FIELD=SPEC",
                       help="add or replace one dimension: optim.lr_g=loguniform:1e-5:1e-3, "
                       "model.width=choice:32,64, model.depth=1 (repeatable)")  # fmt: skip
    search = parser.add_argument_group("search and early stopping")
    search.add_argument("--trials", type=int, default=8, help="configurations to try (default 8)")
    search.add_argument("--rounds", type=int, default=4, help="evaluation rounds of a full trial (default 4)")
    search.add_argument("--grace-rounds", type=int, default=1, help="rounds before ASHA may stop a trial (default 1)")
    search.add_argument("--reduction-factor", type=int, default=2, help="ASHA keeps 1/this at each rung (default 2)")
    search.add_argument(
        "--kimg-per-round", type=float, help="thousands of images per round (default: from --budget-minutes)"
    )
    search.add_argument(
        "--budget-minutes", type=float, default=10.0, help="sizes the rounds for a local CPU sweep (default 10)"
    )
    search.add_argument(
        "--search", default="random", choices=("random", "optuna"), help="search algorithm (default random)"
    )
    search.add_argument("--search-seed", type=int, default=0, help="seed of the search algorithm (default 0)")
    place = parser.add_argument_group("resources")
    place.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial (default 1)")
    place.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default 1)")
    place.add_argument(
        "--gpus-per-worker", type=float, default=0.0, help="GPUs per worker; 0 = CPU with gloo (default 0)"
    )
    place.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster holds now; "
                       "set it on an autoscaling cluster)")  # fmt: skip
    out = parser.add_argument_group("storage and tracking")
    out.add_argument("--storage", default="runs", help="folder or s3:// URI for trials and checkpoints (default runs/)")
    out.add_argument("--s3-endpoint", help="S3 API endpoint URL (default $AWS_ENDPOINT_URL or AWS)")
    out.add_argument("--name", help="sweep name (default: preset + hash of config, space and plan)")
    out.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are kept")
    out.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    out.add_argument("--experiment", default="gan-sweeps", help="MLflow experiment (default gan-sweeps)")
    out.add_argument("--no-tracking", action="store_true", help="no MLflow runs and no registration")
    out.add_argument("--model-name", default="gan-generator", help="registered model for the best generator")
    out.add_argument("--no-register", action="store_true", help="do not register the best generator")
    args = parser.parse_args(argv)

    try:
        base = override(preset(args.preset), args.overrides)
        spec = (
            sweep.load_space_file(args.space_file)
            if args.space_file
            else dict(sweep.GPU_SPACE if args.gpus_per_worker > 0 else sweep.CPU_SPACE)
        )
        spec.update(sweep.parse_override(text) for text in args.space)
        space = sweep.build_space(base, spec)
        scaling = Scaling(
            workers=args.workers_per_trial,
            use_gpu=args.gpus_per_worker > 0,
            cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker or 1.0,
        )
        plan = sweep.Plan(
            trials=args.trials, rounds=args.rounds, grace_rounds=args.grace_rounds,
            reduction_factor=args.reduction_factor, search=args.search, seed=args.search_seed, scaling=scaling,
            kimg_per_round=args.kimg_per_round or 1.0,
        )  # fmt: skip
        if args.workers_per_trial < 1:
            raise ConfigError(f"--workers-per-trial {args.workers_per_trial}: need at least 1")
    except ConfigError as err:
        return fail(str(err))
    if args.dry_run:
        print(base.to_json())
        print("search space:\n" + "\n".join(f"  {key} = {dim.describe()}" for key, dim in space.items()))
        return 0

    try:
        return run_sweep(args, base, space, plan)
    except (ConfigError, TrackingError, ValueError, checkpoint.CheckpointError) as err:
        return fail(str(err))


def kimg_per_round(args: argparse.Namespace, plan: sweep.Plan, concurrency: int) -> float:
    """--kimg-per-round, else what fits --budget-minutes if ASHA stops trials as expected."""
    if args.kimg_per_round:
        return args.kimg_per_round
    if plan.scaling.use_gpu:
        raise ConfigError("--budget-minutes sizes rounds for CPU workers; on GPUs give --kimg-per-round")
    work = sweep.expected_rounds(plan)
    img_per_s = CPU_IMG_PER_S * concurrency * plan.scaling.workers
    return round(args.budget_minutes * 60 * TRAINING_SHARE * img_per_s / work / 1000, 1)


def run_sweep(args: argparse.Namespace, base, space, plan: sweep.Plan) -> int:
    import ray
    from ray import tune

    storage_path, filesystem = storage_for(args.storage, args.s3_endpoint)
    connect()
    concurrency = args.max_concurrent or sweep.max_concurrent_trials(plan, ray.cluster_resources())
    if concurrency < 1:
        raise ValueError(
            f"one trial needs {plan.scaling.workers} worker(s) x ({plan.scaling.cpus_per_worker:g} CPU"
            + (f", {plan.scaling.gpus_per_worker:g} GPU" if plan.scaling.use_gpu else "")
            + f") but the Ray cluster has {ray.cluster_resources()}; lower the request, or pass --max-concurrent "
            "on an autoscaling cluster"
        )
    plan = dataclasses.replace(plan, kimg_per_round=kimg_per_round(args, plan, concurrency))
    name = args.name or sweep.sweep_name(base, space, plan)
    exists = run_exists(storage_path, filesystem, name)
    if exists and not args.resume:
        raise ValueError(f"{args.storage}/{name} already holds a sweep: pass --resume to continue it, or --name")
    if args.resume and not exists:
        raise ValueError(f"nothing to resume: no sweep {name!r} under {args.storage}")

    parent = None
    tracking = None
    if not args.no_tracking:
        target = TrackingTarget(resolve_uri(args.tracking_uri), args.experiment, name)
        prepare(target)
        parent = MLflowTracker(target, tags={"sweep.kind": "parent"})
        parent.log_params({**sweep.plan_params(plan), **{f"base.{k}": v for k, v in base.flat().items()}})
        parent.log_dict(sweep.space_as_dict(space), "search_space.json")
        tracking = {"uri": target.uri, "experiment": target.experiment, "parent_run_id": parent.run_id}

    print(
        f"sweep {name!r}: {plan.trials} trials x up to {plan.rounds} rounds of {plan.kimg_per_round:g} kimg, "
        f"ASHA (grace {plan.grace_rounds}, reduction {plan.reduction_factor}) on FID, {plan.search} search, "
        f"{concurrency} at a time, {plan.scaling.workers} worker(s) each; storage {args.storage}/{name}\n"
        + "\n".join(f"  {key} = {dim.describe()}" for key, dim in space.items()),
        flush=True,
    )
    # Trials run in their own working folders: a local storage folder must be absolute.
    storage = args.storage if filesystem else storage_path
    setup = sweep.TrialSetup(base.to_json(), plan, name, storage, args.s3_endpoint, tracking)
    trainable = tune.with_resources(tune.with_parameters(sweep.run_trial, setup=setup), sweep.TRIAL_RESOURCES)
    started = time.monotonic()
    try:
        if args.resume:
            print(f"resuming sweep {name!r}: finished trials are kept, unfinished ones continue", flush=True)
            tuner = tune.Tuner.restore(
                f"{storage_path}/{name}" if filesystem else os.path.join(storage_path, name),
                trainable, resume_unfinished=True, resume_errored=False, storage_filesystem=filesystem,
            )  # fmt: skip
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={key: dim.to_tune() for key, dim in space.items()},
                tune_config=tune.TuneConfig(
                    metric="fid", mode="min", num_samples=plan.trials,
                    scheduler=sweep.make_scheduler(plan), search_alg=sweep.make_search(plan, concurrency),
                    trial_dirname_creator=lambda trial: trial.trial_id,
                ),
                run_config=tune.RunConfig(
                    name=name, storage_path=storage_path, storage_filesystem=filesystem,
                    callbacks=[sweep.make_trial_runs_callback(tracking, name, plan)],
                ),
            )  # fmt: skip
        grid = tuner.fit()
    except KeyboardInterrupt:
        if parent:
            parent.close("KILLED")
        raise
    except BaseException:
        if parent:
            parent.close("FAILED")
        raise
    return report(args, name, base, space, plan, grid, parent, tracking, storage_path, time.monotonic() - started)


def report(args, name, base, space, plan, grid, parent, tracking, storage_path, elapsed_s) -> int:
    rows = sweep.summarize(grid, plan)
    summary = sweep.table(rows, space, plan)
    ok = [row for row in rows if row.outcome != "error" and row.history]
    floor = next((r.metrics.get("fid_floor") for r in grid if r.metrics and "fid_floor" in r.metrics), None)
    plot = sweep.plot_fid(rows, floor)
    folder = f"{args.storage.rstrip('/')}/{name}"
    options = storage_options(args.storage, args.s3_endpoint)
    print(f"\nsweep {name!r} done in {elapsed_s:.0f}s\n{summary}", flush=True)
    _write(f"{folder}/summary.txt", summary.encode(), options)
    _write(f"{folder}/fid_vs_kimg.png", plot, options)
    worker_s = sum(row.time_s for row in rows) * plan.scaling.workers
    if tracking:
        sweep.close_stopped_runs(rows, tracking, name, plan)
    if not ok:
        if parent:
            parent.log_artifact(summary.encode(), "summary.txt")
            parent.close("FAILED")
        return fail("no trial finished an evaluation; see the errors above", code=1)

    best = ok[0]
    scheme = "s3://" if args.storage.startswith("s3://") else ""
    best_uri = scheme + best.best_checkpoint
    state, meta = checkpoint.load(best_uri, options)
    G, cfg = generator_from_state(state)
    grid_png = png_bytes(*class_grid(G, per_class=10))
    _write(f"{folder}/best_samples.png", grid_png, options)
    print(
        f"\nbest: trial {best.trial_id}, FID {best.best_fid:.2f} (floor {meta.get('fid_floor', float('nan')):.2f}) "
        f"at kimg {meta.get('images_seen', 0) / 1000:.1f}\n  checkpoint {best_uri}\n  config "
        + " ".join(f"{k}={v}" for k, v in best.params.items())
        + f"\n  summary, FID plot and samples in {folder}/\n  worker-seconds {worker_s:.0f}",
        flush=True,
    )
    if parent is None:
        return 0
    parent.log_artifact(summary.encode(), "summary.txt")
    parent.log_artifact(plot, "fid_vs_kimg.png")
    parent.log_artifact(grid_png, "best_samples.png")
    parent.log_metrics({"best_fid": best.best_fid, "worker_seconds": worker_s, "trials": len(rows)}, step=0)
    best_run = run_id_of(
        TrackingTarget(tracking["uri"], tracking["experiment"], sweep.child_run_name(name, best.trial_id))
    )
    tags = {"best_trial": best.trial_id, "best_run_id": best_run or "", "best_checkpoint": best_uri}
    if not args.no_register and best_run:
        version = register_best(args, tracking, best_run, state, meta, cfg, name, best)
        tags |= {"registered_model": f"{args.model_name}/{version.version}"}
        print(f"registered models:/{args.model_name}/{version.version} (run {best_run})", flush=True)
    parent.set_tags(tags)
    parent.close("FINISHED")
    where = f" --tracking-uri {tracking['uri']}"
    print(
        f"MLflow: experiment {args.experiment!r} at {tracking['uri']}, parent run {name!r}\n"
        f"next:\n  python pipelines/promote.py --sweep {name} --experiment {args.experiment} "
        f"--model-name {args.model_name}{where}\n"
        f"  python pipelines/sample.py --model models:/{args.model_name}@champion --grid grid.png{where}\n"
        f"  MLFLOW_TRACKING_URI={tracking['uri']} mlflow models serve -m models:/{args.model_name}@champion "
        "--env-manager local -p 5001",
        flush=True,
    )
    return 0


def register_best(args, tracking, run_id, state, meta, cfg, sweep_name, best):
    """The best trial's best generator as a new registered version, with its evidence."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from gan import registry

    mlflow.set_tracking_uri(tracking["uri"])
    client = MlflowClient(tracking["uri"])
    run = client.get_run(run_id)
    # A completed trial logged generator_best before closing its run FINISHED; a stopped
    # one never got there, so its best checkpoint's G_ema is logged now.
    model_uri = registry.logged_model_uri(run, "generator_best") if run.info.status == "FINISHED" else None
    if model_uri is None:
        model_uri = registry.log_generator(run_id, "generator_best", state["loop"]["G_ema"], state["config"])
    tags = {
        "fid": f"{best.best_fid:.4f}", "fid_floor": meta.get("fid_floor", ""), "kid": meta.get("kid", ""),
        "dataset_fingerprint": meta.get("dataset_fingerprint", ""), "evaluator_sha256": meta.get("evaluator_sha256", ""),
        "git_commit": git_commit(), "source_run": run_id, "sweep": sweep_name, "trial": best.trial_id,
    }  # fmt: skip
    return registry.register(tracking["uri"], model_uri, args.model_name, cfg, tags)


def _write(uri: str, data: bytes, options: dict) -> None:
    fs, path = fsspec.core.url_to_fs(uri, **options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


if __name__ == "__main__":
    sys.exit(main())
