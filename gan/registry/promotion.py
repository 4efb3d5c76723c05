"""Promotion to the registry's ``champion`` alias behind a quality gate, and rollback.

The candidate and the current champion are scored again on fresh latents (several seeds,
the project's evaluator); ``decide`` (pure arithmetic) lets the candidate win only when
its mean FID is lower by the margin. The decision and its evidence become tags of the
candidate's model version; the old champion keeps the alias ``previous``.

A model's config is written by whoever trained or registered it, and promotion runs with
the promoter's credentials: every place scoring reads (the data, the evaluator) comes from
the promoter (``Trusted``), and a stored config that names another is refused before
anything is read. Aliases are read again and written under a lock (``alias_lock``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass

from gan.core.config import USER_BACKBONES, ConfigError, check_no_credentials
from gan.evaluation.evaluator import FIDEstimate
from gan.evaluation.stats import COPY_QUANTILE
from gan.registry.models import (
    CHAMPION,
    PREVIOUS,
    ROLLING_BACK,
    RegistryError,
    champion_of,
    check_model_exists,
    latest_version_of_run,
    load_generator,
    logged_model_uri,
    register,
    set_aliases,
    version_by_alias,
)
from gan.registry.names import filter_value
from gan.registry.tracking import LOCATION_TAG, RUN_NAME_TAG, git_commit


@dataclass(frozen=True)
class Candidate:
    model_uri: str
    run_id: str
    version: str | None
    """Registered version, if it is one already."""
    label: str


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str


def decide(candidate: FIDEstimate, champion: FIDEstimate | None, margin: float, max_copy_share: float) -> Decision:
    """Refuse a candidate whose samples copy training images (a share above
    ``max_copy_share``); otherwise promote when there is no champion, or when the
    candidate's mean FID is at least ``margin`` (relative) below the champion's."""
    if candidate.copy_share > max_copy_share:
        return Decision(
            False,
            f"{candidate.copy_share:.1%} of its samples are near-copies of training images "
            f"(limit {max_copy_share:.1%}; real images score about {COPY_QUANTILE:.0%})",
        )
    if champion is None:
        return Decision(True, "no champion yet")
    needed = champion.mean * (1 - margin)
    if candidate.mean <= needed:
        return Decision(
            True, f"FID {candidate.mean:.2f} beats the champion's {champion.mean:.2f} by more than {margin:.0%}"
        )
    return Decision(
        False, f"FID {candidate.mean:.2f} is not below {needed:.2f} (champion {champion.mean:.2f} - {margin:.0%})"
    )


def resolve_candidate(
    client, tracking_uri: str, model_name: str, *, run=None, sweep=None, experiment=None, version=None, best_of=None
) -> Candidate:
    """The model to promote from one of: a run id, a sweep (its best trial), a registered
    version, or the best finished run of an experiment."""
    from mlflow.exceptions import MlflowException

    if version:
        check_model_exists(client, model_name)
        try:
            found = client.get_model_version(model_name, version)
        except MlflowException:
            raise RegistryError(f"{model_name} has no version {version}") from None
        return Candidate(
            f"models:/{model_name}/{found.version}", found.run_id, found.version, f"version {found.version}"
        )
    if sweep:
        exp = client.get_experiment_by_name(experiment)
        parents = (
            client.search_runs([exp.experiment_id], f"tags.`{RUN_NAME_TAG}` = {filter_value(sweep)}") if exp else []
        )
        finished = [p for p in parents if p.data.tags.get("best_run_id")]
        if not finished:
            raise RegistryError(f"no finished sweep {sweep!r} in experiment {experiment!r}")
        if len(finished) > 1:  # one name, checkpoints in several places: several users' sweeps
            places = ", ".join(p.data.tags.get(LOCATION_TAG, "?") for p in finished)
            raise RegistryError(f"{len(finished)} sweeps are named {sweep!r} (checkpoints in {places}); pass --run")
        run, label = finished[0].data.tags["best_run_id"], f"best trial of sweep {sweep}"
    elif best_of:
        exp = client.get_experiment_by_name(best_of)
        if exp is None:
            raise RegistryError(f"no experiment {best_of!r}")
        runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED' and metrics.best_fid > 0",
                                  order_by=["metrics.best_fid ASC"], max_results=50)  # fmt: skip
        runs = [r for r in runs if logged_model_uri(tracking_uri, r, "generator_best")]
        if not runs:
            raise RegistryError(f"experiment {best_of!r} has no finished run with a generator_best model")
        run, label = runs[0].info.run_id, f"best run of experiment {best_of}"
    else:
        label = f"run {run}"
    try:
        found_run = client.get_run(run)
    except MlflowException:
        raise RegistryError(f"no run {run!r} at this tracking server") from None
    model_uri = logged_model_uri(tracking_uri, found_run, "generator_best")
    if model_uri is None:
        raise RegistryError(f"{label} has no generator_best model (did it finish?)")
    latest = latest_version_of_run(client, model_name, run)
    if latest is not None:
        return Candidate(f"models:/{model_name}/{latest.version}", run, latest.version,
                         f"{label} (version {latest.version})")  # fmt: skip
    return Candidate(model_uri, run, None, label)


@dataclass(frozen=True, kw_only=True)
class Trusted:
    """What the promoter lets promotion read (promote.py's flags). The embedded digits and the
    committed digit evaluator need nothing: they come with the installed package."""

    data_uri: str = ""
    """The data the models were trained on (--data); '' for the embedded digits."""
    labels_uri: str = ""
    """Its labels file, if the config names one (--labels-uri)."""
    data_options: str = ""
    """JSON fsspec options for the data (--data-options), e.g. an S3 endpoint."""
    backbone_uri: str = ""
    """The evaluator file or feature network (--backbone-uri)."""
    backbone_sha256: str = ""
    """The sha256 that file must have (--backbone-sha256)."""

    def __post_init__(self) -> None:
        check_no_credentials("--data", self.data_uri)
        check_no_credentials("--labels-uri", self.labels_uri)
        check_no_credentials("--backbone-uri", self.backbone_uri)
        check_no_credentials("--data-options", options=self.options())
        digest = self.backbone_sha256
        if digest and not (len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise ConfigError(f"--backbone-sha256 {digest}: must be 64 lowercase hex digits")

    def options(self) -> dict:
        try:
            options = json.loads(self.data_options) if self.data_options else {}
        except json.JSONDecodeError as err:
            raise ConfigError(f"--data-options is not valid JSON: {err}") from None
        if not isinstance(options, dict):
            raise ConfigError(f"--data-options {self.data_options}: must be a JSON object")
        return options

    def settings_for(self, cfg, label: str):
        """(DataConfig, EvalConfig) to score a model whose stored config is ``cfg``: its own,
        with every place they read replaced by the promoter's. A stored URI or storage
        option the promoter did not give is refused in one line naming the field."""
        data, ev = cfg.data, cfg.eval
        embedded = data.uri.startswith("embedded:") and not self.data_uri  # read from the installed package
        self._require(label, "data.uri", data.uri, data.uri if embedded else self.data_uri, "--data")
        self._require(label, "data.labels_uri", data.labels_uri, self.labels_uri, "--labels-uri")
        stored_options = data.fsspec_options()
        if stored_options != self.options():
            self._require(
                label, "data.storage_options", json.dumps(stored_options), self.data_options, "--data-options"
            )
        if ev.backbone != "digits":  # 'digits' is the committed file; the config cannot name another
            self._require(label, "eval.backbone_uri", ev.backbone_uri, self.backbone_uri, "--backbone-uri")
        remote = "://" in ev.backbone_uri and not ev.backbone_uri.startswith("file://")
        if ev.backbone in USER_BACKBONES and remote and not self.backbone_sha256:
            raise RegistryError(
                f"{label}: eval.backbone_uri={ev.backbone_uri} is a network fetched from a URI and run on this "
                "machine: pass --backbone-sha256 <sha256sum of the file you trust>"
            )
        data = dataclasses.replace(data, uri=data.uri if embedded else self.data_uri, labels_uri=self.labels_uri,
                                   storage_options=self.data_options)  # fmt: skip
        if ev.backbone != "digits":
            ev = dataclasses.replace(ev, backbone_uri=self.backbone_uri, backbone_sha256=self.backbone_sha256)
        return data, ev

    @staticmethod
    def _require(label: str, field: str, stored: str, given: str, flag: str) -> None:
        if stored != given:
            given = f"{flag} {given}" if given else f"no {flag}"
            raise RegistryError(
                f"{label}: its config names {field}={stored or repr('')} and this promotion was given {given}: "
                f"promotion reads only what you name; pass {flag} {shlex.quote(stored)} if you trust it"
            )


def trust_flags(cfg) -> str:
    """The promote.py flags that trust what ``cfg`` reads: printed for the user who trained it."""
    data, ev = cfg.data, cfg.eval
    flags = [] if data.uri.startswith("embedded:") else ["--data", data.uri]
    for flag, value in (("--labels-uri", data.labels_uri), ("--data-options", data.storage_options),
                        ("--backbone-uri", ev.backbone_uri), ("--backbone-sha256", ev.backbone_sha256)):  # fmt: skip
        if value:
            flags += [flag, value]
    return shlex.join(flags)


class Scorer:
    """FID with an interval on fresh seeds. Every model is scored with one evaluation config,
    the first model's (the candidate's, with ``num_samples``): FIDs on other sample counts
    do not compare. A model trained with another evaluator is refused, and so is one whose
    config names data or an evaluator that ``trusted`` does not (models from the store
    choose neither what is fetched nor what runs)."""

    def __init__(self, tracking_uri: str, seeds: int, num_samples: int | None, trusted: Trusted | None = None) -> None:
        self.tracking_uri, self.num_samples = tracking_uri, num_samples
        self.trusted = trusted or Trusted()
        # Fresh latents: never the seed FID was tracked with during training.
        self.seeds = [10_000 + i for i in range(seeds)]
        self.eval_cfg = None
        self.models: dict = {}
        self.evaluators: dict = {}

    def check(self, model_uris: list[str], labels: list[str] | None = None) -> None:
        """Load the models' weights and configs; the first one's evaluation (with
        ``num_samples``) becomes the one for all. A model trained with another evaluator, or
        whose config names what the promoter did not give, is refused before any data or
        evaluator is read."""
        loaded = {uri: load_generator(uri, self.tracking_uri) for uri in model_uris}
        for uri, (_, cfg) in loaded.items():
            if self.eval_cfg is None:
                self.eval_cfg = cfg.eval
            elif (cfg.eval.backbone, cfg.eval.backbone_uri) != (self.eval_cfg.backbone, self.eval_cfg.backbone_uri):
                raise RegistryError(
                    f"{uri} was evaluated with the {evaluator_name(cfg.eval)} evaluator, the candidate with "
                    f"{evaluator_name(self.eval_cfg)}: their FIDs do not compare; register the candidate under "
                    "another --model-name"
                )
        for i, (uri, (G, cfg)) in enumerate(loaded.items()):
            data, eval_cfg = self.trusted.settings_for(cfg, labels[i] if labels else uri)
            if i == 0:
                if self.num_samples is not None:
                    kid_subset = min(eval_cfg.kid_subset_size, self.num_samples)
                    eval_cfg = dataclasses.replace(eval_cfg, num_samples=self.num_samples, kid_subset_size=kid_subset)
                self.eval_cfg = eval_cfg
            self.models[uri] = G, cfg, data

    def __call__(self, model_uri: str):
        """(FIDEstimate, config, dataset fingerprint, evaluator sha256) of a model ``check`` loaded."""
        from gan.data.datasets import load_dataset
        from gan.evaluation.evaluator import Evaluator, fid_estimate

        G, cfg, data_cfg = self.models[model_uri]
        eval_cfg = self.eval_cfg
        key = (data_cfg, eval_cfg)
        if key not in self.evaluators:
            data = load_dataset(data_cfg)
            self.evaluators[key] = (
                Evaluator(eval_cfg, data, storage_options=data_cfg.fsspec_options()),
                data.fingerprint,
            )
        evaluator, fingerprint = self.evaluators[key]
        return fid_estimate(evaluator, G, cfg.model.num_classes, self.seeds), cfg, fingerprint, evaluator.sha256


def evaluator_name(eval_cfg) -> str:
    return eval_cfg.backbone_uri or f"{eval_cfg.backbone!r}"


def promote(
    client, candidate: Candidate, model_name: str, scorer: Scorer, margin: float, max_copy_share: float, dry_run: bool
) -> int:
    """Score, decide, record the evidence and move the aliases; 0 promoted, 1 refused."""
    champion = champion_of(client, model_name)
    if champion is not None and candidate.version == champion.version:
        print(f"{candidate.label} is already {model_name}@{CHAMPION}; nothing to do")
        return 0
    champion_uri = f"models:/{model_name}/{champion.version}" if champion else None
    labels = [f"the candidate, {candidate.label}", f"the champion, version {champion.version}" if champion else ""]
    scorer.check([candidate.model_uri, *filter(None, [champion_uri])], labels)
    print(f"scoring the candidate, {candidate.label} ({len(scorer.seeds)} fresh seeds)...", flush=True)
    cand_fid, cfg, fingerprint, evaluator_sha = scorer(candidate.model_uri)
    champ_fid = None
    if champion is not None:
        print(f"scoring the champion, version {champion.version}...", flush=True)
        champ_fid, _, champ_fingerprint, champ_evaluator_sha = scorer(champion_uri)
        if champ_fingerprint != fingerprint:
            raise RegistryError(
                f"the candidate was trained on dataset {fingerprint[:12]} and the champion on {champ_fingerprint[:12]}: "
                "their FIDs do not compare; register the candidate under another --model-name"
            )
        if champ_evaluator_sha != evaluator_sha:
            raise RegistryError(
                f"the candidate is scored by evaluator {evaluator_sha[:12]} and the champion by "
                f"{champ_evaluator_sha[:12]}: their FIDs do not compare; register the candidate under another --model-name"
            )
    decision = decide(cand_fid, champ_fid, margin, max_copy_share)
    evidence = {
        "promotion.decision": "promoted" if decision.promoted else "refused",
        "promotion.reason": decision.reason,
        "promotion.fid": str(cand_fid),
        "promotion.fid_values": ",".join(f"{v:.3f}" for v in cand_fid.values),
        "promotion.champion_version": champion.version if champion else "",
        "promotion.champion_fid": str(champ_fid) if champ_fid else "",
        "promotion.margin": str(margin),
        "promotion.copy_share": f"{cand_fid.copy_share:.4f}",
        "promotion.max_copy_share": str(max_copy_share),
        "promotion.eval": f"{scorer.eval_cfg.num_samples} samples x {len(scorer.seeds)} seeds, both models",
        "promotion.time": _now(),
        "dataset_fingerprint": fingerprint,
        "evaluator_sha256": evaluator_sha,
        "git_commit": git_commit(),
        "source_run": candidate.run_id,
    }
    print(f"\ncandidate  {candidate.label}: FID {cand_fid}, near-copies of training images {cand_fid.copy_share:.1%}")
    if champ_fid is not None:
        print(f"champion   version {champion.version}: FID {champ_fid}")
    print(f"decision   {'PROMOTE' if decision.promoted else 'REFUSE'}: {decision.reason}")
    if dry_run:
        print("dry run: nothing changed")
        return 0
    # Scoring takes minutes: another promotion may have moved the alias meanwhile.
    with alias_lock(client, model_name, f"promotion of {candidate.label}"):
        now = champion_of(client, model_name)
        if (now and now.version) != (champion and champion.version):
            raise RegistryError(
                f"{model_name}@{CHAMPION} moved from version {champion.version if champion else '-'} to "
                f"{now.version if now else '-'} while the candidate was scored; nothing changed: promote again to "
                "compare with the new champion"
            )
        version = candidate.version
        if version is None:
            version = register(scorer.tracking_uri, candidate.model_uri, model_name, cfg,
                               {"source_run": candidate.run_id}).version  # fmt: skip
        for key, value in evidence.items():
            client.set_model_version_tag(model_name, version, key, value)
        if not decision.promoted:
            print(f"version {version} keeps its evidence in its tags; {model_name}@{CHAMPION} unchanged")
            return 1
        old = set_aliases(client, model_name, version, decision.reason)
        stale = version_by_alias(client, model_name, ROLLING_BACK)
        if stale is not None:  # a rollback that never finished: this promotion supersedes it
            _clear_rolling_back(client, model_name, stale)
            print(f"cleared @{ROLLING_BACK} from version {stale.version}, left by an interrupted rollback")
    kept = f"; version {old} is now @{PREVIOUS} (undo: promote.py --rollback)" if old else ""
    print(f"{model_name}@{CHAMPION} -> version {version}{kept}")
    return 0


ROLLING_BACK_TO = "promotion.rolling_back_to"
"""Tag of the version that has @rolling-back: the version the rollback moves @champion to."""


def rollback(client, model_name: str, dry_run: bool) -> int:
    """Swap ``champion`` and ``previous``, so running it again undoes the rollback.

    The outgoing champion first gets the alias ``rolling-back`` (and a tag naming the version
    the rollback moves to): a crash between the alias writes leaves every version with an
    alias, and running it again finishes the swap, while the registry is still as the crash
    left it. A ``rolling-back`` that the registry has moved on from is cleared."""
    check_model_exists(client, model_name)
    with contextlib.nullcontext() if dry_run else alias_lock(client, model_name, "rollback"):
        champion = version_by_alias(client, model_name, CHAMPION)
        previous = version_by_alias(client, model_name, PREVIOUS)
        outgoing = version_by_alias(client, model_name, ROLLING_BACK)
        finishing = outgoing is not None and _interrupted_rollback(outgoing, champion, previous)
        if outgoing is not None and not finishing and (champion is None or champion.version != outgoing.version):
            print(
                f"warning: version {outgoing.version} has a stale @{ROLLING_BACK} (a rollback to version "
                f"{outgoing.tags.get(ROLLING_BACK_TO, '?')} that crashed; the aliases have moved since): clearing it",
                file=sys.stderr,
            )
            if not dry_run:
                _clear_rolling_back(client, model_name, outgoing)
        if finishing:  # interrupted after the champion moved: only `previous` is left to write
            print(f"finishing an interrupted rollback: version {outgoing.version} becomes @{PREVIOUS}")
            champion, previous = outgoing, champion
        elif previous is None:
            raise RegistryError(f"{model_name} has no @{PREVIOUS} version to roll back to")
        print(f"{model_name}@{CHAMPION}: version {champion.version if champion else '-'} -> {previous.version}")
        if dry_run:
            print("dry run: nothing changed")
            return 0
        if not finishing:
            if champion is not None:
                client.set_model_version_tag(model_name, champion.version, ROLLING_BACK_TO, previous.version)
                client.set_registered_model_alias(model_name, ROLLING_BACK, champion.version)
            client.set_registered_model_alias(model_name, CHAMPION, previous.version)
        if champion is not None:
            client.set_registered_model_alias(model_name, PREVIOUS, champion.version)
            client.set_model_version_tag(model_name, champion.version, "promotion.rolled_back", _now())
            _clear_rolling_back(client, model_name, champion)
    print(f"rolled back: {model_name}@{CHAMPION} is version {previous.version}")
    return 0


def _interrupted_rollback(outgoing, champion, previous) -> bool:
    """Whether the registry is as a rollback away from ``outgoing`` left it when it crashed
    after moving @champion: champion and previous both on the version it moved to."""
    if champion is None or previous is None or champion.version != previous.version:
        return False
    target = outgoing.tags.get(ROLLING_BACK_TO, champion.version)  # untagged: a rollback of an older release
    return champion.version != outgoing.version and target == champion.version


def _clear_rolling_back(client, model_name: str, version) -> None:
    from mlflow.exceptions import MlflowException

    client.delete_registered_model_alias(model_name, ROLLING_BACK)
    with contextlib.suppress(MlflowException):  # absent: set by an older release, or already removed
        client.delete_model_version_tag(model_name, version.version, ROLLING_BACK_TO)


LOCK_SUFFIX = ".promotion-lock"
LOCK_STALE_AFTER_S = 300
"""A lock older than this is a crashed holder's: a holder keeps it only while it moves aliases
(a few store calls)."""
LOCK_WAIT_S = 60
"""How long to wait for a live holder before refusing."""


@contextlib.contextmanager
def alias_lock(client, model_name: str, what: str):
    """Held while the aliases of ``model_name`` are read again and written. MLflow aliases have
    no compare-and-swap, but a database store refuses to create a registered model that exists
    (a unique key), so one process at a time holds ``<model_name>.promotion-lock``; its tags
    name the holder. A holder whose process is gone (same machine) or whose lock is older than
    LOCK_STALE_AFTER_S crashed: its lock is taken over."""
    from mlflow.exceptions import MlflowException

    lock = model_name + LOCK_SUFFIX
    me = _owner()
    deadline, said = time.monotonic() + LOCK_WAIT_S, False
    while True:
        try:
            client.create_registered_model(
                lock, tags={**me, "what": what}, description=f"held while promote.py moves the aliases of {model_name}"
            )
            break
        except MlflowException as err:  # the other holder's create won (or its delete raced ours)
            if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        try:
            held = client.get_registered_model(lock)
        except MlflowException:  # released meanwhile
            time.sleep(0.1)
            continue
        crashed = _crashed(held, me)
        if crashed:
            print(f"warning: taking over {lock} ({held.tags.get('what', '?')}): {crashed}", file=sys.stderr)
            with contextlib.suppress(MlflowException):
                if client.get_registered_model(lock).creation_timestamp == held.creation_timestamp:
                    client.delete_registered_model(lock)
            continue
        holder = f"{held.tags.get('what', '?')} on {held.tags.get('host', '?')}, pid {held.tags.get('pid', '?')}"
        if time.monotonic() > deadline:
            raise RegistryError(
                f"{model_name}: another promotion or rollback ({holder}) has held {lock} for "
                f"{_age_s(held):.0f} s; nothing changed: try again (a lock older than {LOCK_STALE_AFTER_S} s is "
                "taken over)"
            )
        if not said:
            print(f"waiting for {holder} to finish moving the aliases of {model_name}...", flush=True)
            said = True
        time.sleep(0.5)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock)


def _owner() -> dict[str, str]:
    """Who holds a lock: host, pid and pid namespace (containers on one host share its name)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return {"host": socket.gethostname(), "pid": str(os.getpid()), "pid_namespace": namespace}


def _age_s(lock) -> float:
    return time.time() - lock.creation_timestamp / 1000


def _crashed(lock, me: dict[str, str]) -> str:
    """Why ``lock``'s holder must have crashed, or '' while it may be alive."""
    if _age_s(lock) > LOCK_STALE_AFTER_S:
        return f"held for {_age_s(lock):.0f} s, more than {LOCK_STALE_AFTER_S} s"
    same_machine = me["pid_namespace"] and all(lock.tags.get(k) == me[k] for k in ("host", "pid_namespace"))
    if same_machine and lock.tags.get("pid", "").isdigit():
        try:
            os.kill(int(lock.tags["pid"]), 0)
        except ProcessLookupError:
            return f"its process {lock.tags['pid']} is gone"
        except PermissionError:  # another user's live process
            pass
    return ""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
