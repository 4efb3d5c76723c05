"""cluster/: the KubeRay manifests against Kubernetes' own schemas (offline, from the
kubernetes-validate package), the launcher YAML against Ray's validator, the runtime env,
and token auth on a real local cluster (cluster/local_cluster.sh)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import ray
import yaml
from services import ROOT

K8S_VERSION = "1.37.0"
CLUSTER = ROOT / "cluster"
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|TOKEN", re.IGNORECASE)


def documents(path):
    return [doc for doc in yaml.safe_load_all((CLUSTER / path).read_text()) if doc]


def as_pod(template: dict, name: str) -> dict:
    """A pod template inside a Ray resource, as the Pod that KubeRay will create."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **template.get("metadata", {})},
            "spec": template["spec"]}  # fmt: skip


def pod_templates() -> dict[str, dict]:
    (raycluster,) = documents("kuberay/raycluster.yaml")
    (rayjob,) = documents("kuberay/rayjob.yaml")
    templates = {"head": raycluster["spec"]["headGroupSpec"]["template"]}
    for group in raycluster["spec"]["workerGroupSpecs"]:
        templates[f"worker-{group['groupName']}"] = group["template"]
    templates["rayjob-submitter"] = rayjob["spec"]["submitterPodTemplate"]
    return templates


def test_core_objects_match_kubernetes_schemas():
    objects = documents("kuberay/serviceaccount.yaml")
    assert {o["kind"] for o in objects} == {"ServiceAccount", "ConfigMap"}
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", ["head", "worker-gpu", "rayjob-submitter"])
def test_pod_templates_inside_ray_resources_match_kubernetes_schemas(name):
    kubernetes_validate.validate(as_pod(pod_templates()[name], name), K8S_VERSION, strict=True)


def test_the_schema_check_catches_a_broken_template():
    broken = as_pod(pod_templates()["worker-gpu"], "broken")
    broken["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = {"count": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_raycluster_shape():
    (raycluster,) = documents("kuberay/raycluster.yaml")
    spec = raycluster["spec"]
    assert raycluster["apiVersion"] == "ray.io/v1" and spec["rayVersion"] == ray.__version__
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head hosts the driver only
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and spec["enableInTreeAutoscaling"]
    pod = gpu["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
    (rayjob,) = documents("kuberay/rayjob.yaml")
    assert rayjob["spec"]["clusterSelector"]["ray.io/cluster"] == raycluster["metadata"]["name"]
    assert "pipelines/tune.py" in rayjob["spec"]["entrypoint"]


def test_credentials_only_from_secrets_or_service_accounts():
    for name, template in pod_templates().items():
        assert template["spec"]["serviceAccountName"] == "gan-ray", name
        for container in template["spec"]["containers"]:
            for env in container.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], (name, env["name"])
    everything = "\n".join(p.read_text() for p in CLUSTER.rglob("*.yaml"))
    assert not re.search(r"AKIA[0-9A-Z]{16}", everything)  # no AWS access key id anywhere
    assert not re.search(r"(?i)secret_access_key\W+[A-Za-z0-9/+]{40}", everything)  # nor a secret key


def test_launcher_config_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "launcher/aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["available_node_types"]["gpu"]["resources"]["GPU"] == 1
    assert "IamInstanceProfile" in config["available_node_types"]["gpu"]["node_config"]
    config["available_node_types"]["gpu"]["min_wrkers"] = 1  # a typo is refused
    with pytest.raises(Exception, match="min_wrkers"):
        validate_config(prepare_config(config))


def test_runtime_env_file_is_a_valid_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()))
    assert env["working_dir"] == "." and "runs/" in env["excludes"]
    assert not any(SECRET_NAME.search(k) for k in env.get("env_vars", {}))


RAY_PORTS = {6379, 8265, 10001}  # GCS, dashboard/job API, Ray client


def test_every_ray_pod_uses_token_auth_from_a_secret():
    for name, template in pod_templates().items():
        env = {e["name"]: e for e in template["spec"]["containers"][0].get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", name
        token = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
        assert token.get("name") == "gan-ray-auth" and token.get("key") == "auth_token", name
        assert not token.get("optional"), name  # a missing Secret stops the pod; it never starts open


def test_network_policy_admits_only_the_clusters_own_pods_to_the_ray_ports():
    (policy,) = documents("kuberay/networkpolicy.yaml")
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    spec = policy["spec"]
    assert "Ingress" in spec["policyTypes"]
    selected = spec["podSelector"]["matchLabels"]
    templates = pod_templates()
    for name, template in templates.items():  # every Ray pod is covered and may talk to the others
        assert selected.items() <= template["metadata"]["labels"].items(), name
    (raycluster,) = documents("kuberay/raycluster.yaml")
    head_ports = {p["containerPort"] for p in templates["head"]["spec"]["containers"][0]["ports"]}
    assert RAY_PORTS <= head_ports and raycluster["metadata"]["namespace"] == policy["metadata"]["namespace"]
    for rule in spec["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])} or RAY_PORTS  # no ports: every port
        sources = rule.get("from")
        assert sources, f"an ingress rule open to every source reaches ports {ports}"
        for source in sources:
            assert "ipBlock" not in source and "podSelector" in source, source
            assert source["podSelector"].get("matchLabels"), source  # an empty selector admits every pod
            if source["podSelector"]["matchLabels"] != selected:  # anyone else: the dashboard only
                assert ports == {8265}, (source, ports)


LAUNCHER_TOKEN_SECRET = "gan/ray-auth-token"


def launcher_config() -> dict:
    return yaml.safe_load((CLUSTER / "launcher/aws-gpu.yaml").read_text())


def token_commands(config: dict) -> dict[str, tuple[str, str]]:
    """Per node type, the command that fetches the token and the `ray start` after it."""
    found = {}
    for node in ("head", "worker"):
        commands = config[f"{node}_start_ray_commands"]
        start = next(i for i, command in enumerate(commands) if "ray start" in command)
        fetches = [c for c in commands[:start] if "secretsmanager get-secret-value" in c]
        assert len(fetches) == 1, (node, commands)
        found[node] = (fetches[0], commands[start])
    return found


def test_launcher_nodes_take_the_ray_token_from_the_secret_store():
    text = (CLUSTER / "launcher/aws-gpu.yaml").read_text()
    config = launcher_config()
    assert not re.search(r"RAY_AUTH_TOKEN=(?!\$)", text)  # no token written into the file
    assert not re.search(r"[0-9a-fA-F]{32}|[A-Za-z0-9+/]{40}", text)  # nor anything shaped like one
    for node, (fetch, start) in token_commands(config).items():
        assert f"--secret-id {LAUNCHER_TOKEN_SECRET}" in fetch and f"--region {config['provider']['region']}" in fetch
        assert "umask 077" in fetch, node  # the token file is the node user's only (600)
        assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in start, node


def test_the_launchers_token_command_reads_the_secret_and_fails_without_it(s3_server, tmp_path):
    """Each node's fetch command, run by bash with the real AWS CLI against Secrets Manager's
    API on loopback (moto): the token lands in ~/.ray/auth_token with mode 600; without the
    secret the command fails and leaves no token file, so `ray start` never runs open."""
    import boto3

    aws = shutil.which("aws")
    if aws is None:
        pytest.skip("the AWS CLI is not installed")
    token = "f" * 64
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "PATH": f"{Path(aws).parent}:{os.environ['PATH']}"}  # fmt: skip
    secrets = boto3.client("secretsmanager", endpoint_url=s3_server, region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    secrets.create_secret(Name=LAUNCHER_TOKEN_SECRET, SecretString=token)
    try:
        for node, (fetch, _) in token_commands(launcher_config()).items():
            home = tmp_path / node
            home.mkdir()
            done = subprocess.run(["bash", "-c", fetch], env={**env, "HOME": str(home)}, capture_output=True,
                                  text=True, timeout=120)  # fmt: skip
            assert done.returncode == 0, done.stderr
            token_file = home / ".ray" / "auth_token"
            assert token_file.read_text().strip() == token
            assert token_file.stat().st_mode & 0o777 == 0o600, oct(token_file.stat().st_mode)
    finally:
        secrets.delete_secret(SecretId=LAUNCHER_TOKEN_SECRET, ForceDeleteWithoutRecovery=True)
    fetch, _ = token_commands(launcher_config())["worker"]
    home = tmp_path / "no-secret"
    home.mkdir()
    done = subprocess.run(["bash", "-c", fetch], env={**env, "HOME": str(home)}, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode != 0 and "ResourceNotFoundException" in done.stderr, done.stderr
    assert not (home / ".ray" / "auth_token").exists()


def test_a_job_without_the_clusters_token_is_refused(two_node_cluster, tmp_path):
    """A real head and worker node (cluster/local_cluster.sh): `ray job submit` without the
    token, or with another one, is refused by Ray; with the token from the cluster's env file
    the job runs."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    job = [ray_cli, "job", "submit", "--", "python", "-c", "print('job ran with token auth')"]
    home = tmp_path / "home"  # a user with no ~/.ray/auth_token of their own
    home.mkdir()
    cluster_env = two_node_cluster
    address = cluster_env["RAY_ADDRESS"]
    assert address.startswith("http://127.0.0.1:")
    anonymous = {k: v for k, v in cluster_env.items() if not k.startswith("RAY_AUTH_")} | {"HOME": str(home)}
    for env, refusal in (
        (anonymous, "Missing authentication token"),
        (anonymous | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, "Invalid authentication token"),
    ):
        refused = subprocess.run(job, env=env, capture_output=True, text=True, timeout=180)
        said = refused.stdout + refused.stderr
        assert refused.returncode != 0 and refusal in said, said[-3000:]
        assert "job ran with token auth" not in said
    accepted = subprocess.run(job, env=cluster_env | {"HOME": str(home)}, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
    said = accepted.stdout + accepted.stderr
    assert accepted.returncode == 0 and "job ran with token auth" in said and "succeeded" in said, said[-3000:]
