"""Ray Tune sweeps end to end: `ray job submit` to a two-node local cluster with a real MLflow
server and S3 on loopback; a sweep whose driver is killed and resumed."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from services import ROOT, session_processes

pytestmark = pytest.mark.integration
TINY = ["--set", "eval.num_samples=200", "--set", "eval.kid_subset_size=50"]
RAY = str(Path(sys.executable).parent / "ray")


def child_runs(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.kind") == "parent"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    return parents[0], [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]


def test_sweep_submitted_as_a_job_runs_across_two_nodes(two_node_cluster, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    url, bucket_name = mlflow_server
    # Refused before any trial starts, with what to pass instead: the default relative
    # --storage (in Ray's temporary copy of the working dir, deleted when the job ends), and
    # a local folder that the other node cannot read.
    submit = [RAY, "job", "submit", "--working-dir", ".", "--", "python", "pipelines/tune.py", *TINY]
    for args, message in (
        (["--no-tracking"], "--storage runs is inside Ray's temporary copy of --working-dir"),
        (["--storage", str(tmp_path / "runs"), "--tracking-uri", url], "the Ray cluster has 2 nodes"),
    ):
        refused = subprocess.run([*submit, *args], cwd=ROOT, env=two_node_cluster, capture_output=True, text=True,
                                 timeout=300)  # fmt: skip
        said = refused.stdout + refused.stderr
        assert refused.returncode != 0 and message in said, said[-3000:]
        assert "Traceback" not in said and "Trial status" not in said
    # cluster/submit.sh: ray job submit with the runtime env and the commit of this checkout.
    command = ["bash", "cluster/submit.sh", "--", "python", "pipelines/tune.py", "--trials", "4",
               "--rounds", "2", *TINY, "--kimg-per-round", "0.5", "--storage", f"s3://{bucket_name}/sweeps", "--tracking-uri", url,
               "--experiment", "e2e", "--model-name", "digits-e2e"]  # fmt: skip
    job = subprocess.run(command, cwd=ROOT, env=two_node_cluster, capture_output=True, text=True, timeout=900)
    output = job.stdout + job.stderr
    (tmp_path / "job.log").write_text(output)
    assert job.returncode == 0 and "succeeded" in job.stdout, output[-5000:]

    client = MlflowClient(url)
    parent, children = child_runs(client, "e2e")
    assert parent.info.status == "FINISHED"
    assert len(children) == 4
    statuses = sorted(r.info.status for r in children)
    stopped = [r for r in children if r.info.status == "KILLED"]
    assert stopped and all("ASHA after round 1 of 2" in r.data.tags["sweep.stopped_early"] for r in stopped), statuses
    assert "FINISHED" in statuses and "RUNNING" not in statuses, output[output.find("done in") :][:3000]
    # Trials ran on both nodes (rank 0's node is tagged by the worker).
    assert len({r.data.tags["ray.node_id"] for r in children}) == 2
    for run in children:  # no evaluation logged twice; a stopped trial may finish the round it was in
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "fid")]
        assert len(steps) == len(set(steps)), steps
        assert len(steps) == 2 if run.info.status == "FINISHED" else 1 <= len(steps) <= 2
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"fid_vs_kimg.png", "best_samples.png", "summary.txt", "search_space.json"} <= artifacts
    (version,) = client.search_model_versions("name = 'digits-e2e'")
    assert version.run_id == parent.data.tags["best_run_id"] and version.tags["sweep"] == parent.info.run_name
    assert float(version.tags["fid"]) == pytest.approx(parent.data.metrics["best_fid"], rel=1e-4)
    assert version.description.startswith("dcgan GAN generator")
    # What the MLflow UI shows: readable trial names, the sweep's outcome, where the code came from.
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for run in [parent, *children]:
        tags = run.data.tags
        assert tags["mlflow.source.type"] == "JOB" and tags["mlflow.source.name"] == "pipelines/tune.py", tags
        assert tags["mlflow.source.git.commit"] == commit and tags["ray.job_submission_id"].startswith("raysubmit_")
    assert all(r.info.run_name.startswith("trial ") and "lr_g=" in r.info.run_name for r in children)
    description = parent.data.tags["mlflow.note.content"]
    best = next(r for r in children if r.info.run_id == parent.data.tags["best_run_id"])
    assert f"Best: **{best.info.run_name}**" in description, description
    assert f"[digits-e2e version {version.version}](#/models/digits-e2e/versions/{version.version})" in description


def _kill_session(sid: int) -> None:
    """The driver and the local Ray it started (Ray's workers keep the session)."""
    for proc in session_processes(sid):
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(session_processes(sid), timeout=30)


def _trial_statuses(sweep_dir: Path) -> dict[str, str]:
    states = sorted(glob.glob(str(sweep_dir / "experiment_state-*.json")))
    if not states:
        return {}
    try:
        data = json.loads(Path(states[-1]).read_text())
    except (OSError, json.JSONDecodeError):  # caught mid-write
        return {}
    trials = (json.loads(entry[0]) for entry in data["trial_data"])
    return {trial["trial_id"]: trial["status"] for trial in trials}


def test_killed_pbt_sweep_resumes_with_its_exploit_and_without_rerunning_finished_trials(tmp_path):
    """PBT on a real local Ray. The second trial's generator cannot learn (lr 1e-7): after
    round 1 it is the worse of two and continues from the first trial's round-1 checkpoint
    with perturbed settings. The driver is killed once that checkpoint is saved, before or
    after the exploit; the resumed sweep takes the same exploit once, trains on with its
    settings, and does not rerun the finished trial."""
    from mlflow.tracking import MlflowClient

    from gan.runs import checkpoint

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr_g: {grid: [1.0e-3, 1.0e-7]}\n")  # run in this order, one at a time
    # Rounds long enough (5 to 15 s here, longer on a slower machine) to catch a trial between two checkpoints.
    command = [sys.executable, "pipelines/tune.py", "--scheduler", "pbt", "--space-file", str(space), "--trials", "1",
               "--rounds", "2", *TINY, "--kimg-per-round", "1.5", "--max-concurrent", "1", "--storage", str(tmp_path / "runs"),
               "--name", "killed", "--tracking-uri", tracking, "--experiment", "resume"]  # fmt: skip
    sweep_dir = tmp_path / "runs" / "killed"
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:  # one trial done and saved, the next one checkpointed mid-way
            statuses = _trial_statuses(sweep_dir)
            done = [t for t, s in statuses.items() if s == "TERMINATED"]
            running = [t for t, s in statuses.items() if s == "RUNNING"]
            # Ray has registered a checkpoint of it (its manager's snapshot is written after one).
            if done and running and (sweep_dir / "trials" / running[0] / "checkpoint_manager_snapshot.json").exists():
                break
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("the sweep never had a finished and a checkpointed trial")
    finally:
        _kill_session(driver.pid)
    finished, interrupted = done[0], running[0]
    finished_checkpoints = sorted(os.listdir(sweep_dir / "trials" / finished))
    saved = [re.match(r"checkpoint_step(\d+)", name) for name in os.listdir(sweep_dir / "trials" / interrupted)]
    saved_steps = {int(match.group(1)) for match in saved if match}

    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = subprocess.run([*command, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                             start_new_session=True)  # fmt: skip
    output = resumed.stdout + resumed.stderr
    (tmp_path / "resumed.log").write_text(output)
    assert resumed.returncode == 0, output[-5000:]
    assert sorted(os.listdir(sweep_dir / "trials" / finished)) == finished_checkpoints  # not run again
    assert _trial_statuses(sweep_dir) == {finished: "TERMINATED", interrupted: "TERMINATED"}

    client = MlflowClient(tracking)
    parent, children = child_runs(client, "resume")
    assert parent.info.status == "FINISHED" and len(children) == 2
    for run in children:  # every round logged exactly once across the kill
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "fid")]
        assert len(steps) == len(set(steps)) == 2, steps

    # The exploit after round 1, once across the kill; the settings it ended with are in the
    # last checkpoint's optimizers and on the run.
    state, _ = checkpoint.load(checkpoint.find(str(sweep_dir / "trials" / interrupted)).latest)
    exploits = state["lineage"]
    assert exploits[0].startswith(f"from {finished} at kimg 1.536 (round 1)"), exploits
    assert len(exploits) == 1, exploits
    lr_g = checkpoint.config_of(state).optim.lr_g
    assert [g["lr"] for g in state["loop"]["opt_g"]["param_groups"]] == [lr_g]
    fids = [h["fid"] for h in state["history"]]
    assert fids[1] < fids[0], fids  # round 2 started from the better trial's weights
    run = next(r for r in children if "pbt.exploit.1" in r.data.tags)
    # The interrupted trial continued from a checkpoint it had saved before the kill.
    resumed_from = re.search(r"\(step (\d+)\)$", run.data.tags.get("resumed_from", ""))
    assert resumed_from and int(resumed_from.group(1)) in saved_steps, (run.data.tags, saved_steps, output[-3000:])
    assert "lr_g=1e-07" in run.info.run_name and run.data.tags["pbt.exploit.1"] == exploits[0]
    assert run.data.metrics["hparam/optim.lr_g"] == lr_g
    summary = (sweep_dir / "summary.txt").read_text()
    assert f"{len(exploits)} exploit(s)" in summary, summary
