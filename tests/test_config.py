import json

import pytest

from gan.core.config import PRESETS, Config, ConfigError, describe_presets, override, preset
from gan.core.redact import credential_names, redact_uri


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip(name):
    cfg = preset(name)
    assert Config.from_json(cfg.to_json()) == cfg
    flat = cfg.flat()
    assert flat["optim.lr_g"] == cfg.optim.lr_g and flat["model.family"] == cfg.model.family
    assert all(not isinstance(v, dict) for v in flat.values())


def test_override_parses_types_and_revalidates():
    cfg = override(preset("dcgan"), ["optim.lr_g=1e-4", "train.batch_size=32", "loss.augment="])
    assert cfg.optim.lr_g == pytest.approx(1e-4) and cfg.train.batch_size == 32 and cfg.loss.augment == ""
    assert preset("dcgan").optim.lr_g == pytest.approx(1e-3)  # the preset itself is untouched


@pytest.mark.parametrize(
    ("assignment", "fragment"),
    [
        ("optim.lr_g=-0.1", "optim.lr_g=-0.1 is not allowed: must be in (0, 1]"),
        ("data.resolution=30", "data.resolution=30 is not allowed: choose one of 28, 32, 64"),
        ("model.family=vae", "model.family='vae' is not allowed"),
        ("optim.nope=1", "unknown field 'optim.nope'"),
        ("bogus.x=1", "unknown section 'bogus'"),
        ("train.batch_size=1.5", "expected a whole number"),
        ("optim.lr_d=fast", "expected a number"),
        ("optim.lr_decay_start=1.5", "optim.lr_decay_start=1.5 is not allowed: must be in [0, 1]"),
        ("eval.kid_subset_size=5000", "eval.kid_subset_size=5000 is not allowed"),
        ("loss.class_weight=1", "loss.class_weight=1 needs a class-conditional model"),
    ],
)
def test_bad_values_name_the_field(assignment, fragment):
    with pytest.raises(ConfigError) as err:
        override(preset("dcgan"), [assignment])
    assert fragment in str(err.value)


def test_help_lists_every_preset_with_a_whole_sentence():
    lines = describe_presets().splitlines()
    assert [line.split()[0] for line in lines] == list(PRESETS)
    assert all(line.endswith(".") for line in lines), lines


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="unknown preset .big.; choose one of dcgan, dcgan-cond, mlp"):
        preset("big")


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        preset("dcgan").optim.lr_g = 1.0  # type: ignore[misc]


def test_wgan_gp_with_batchnorm_d_is_rejected():
    with pytest.raises(ConfigError, match="gradient penalty is per sample"):
        override(preset("textbook"), ["loss.kind=wgan-gp"])


def test_json_is_complete(tmp_path):
    raw = json.loads(preset("mlp").to_json())
    assert set(raw) == {"name", "data", "model", "loss", "optim", "train", "schedule", "eval"}


@pytest.mark.parametrize(
    "uri, shown",
    [
        ("https://reader:pa/ss@data.example.com/x.npz", "https://reader:***@data.example.com/x.npz"),  # unencoded /
        ("https://token@data.example.com/x.npz", "https://***@data.example.com/x.npz"),
        ("https://h/x.npz?X-Amz-Credential=AK&n=1&X-Amz-Signature=ab", "https://h/x.npz?X-Amz-Credential=***&n=1&X-Amz-Signature=***"),
        ("http://admin:p%40ss@127.0.0.1:5000", "http://admin:***@127.0.0.1:5000"),
    ],
)  # fmt: skip
def test_uris_with_credentials_are_redacted_and_refused(uri, shown):
    assert redact_uri(uri) == shown
    with pytest.raises(ConfigError, match="holds credentials") as refused:
        override(preset("debug"), [f"data.uri={uri}"])
    assert shown in str(refused.value) and uri not in str(refused.value)


@pytest.mark.parametrize(
    "uri", ["s3://bucket/a@b/x.npz", "https://h:8080/a@b", "sqlite:///mlflow.db", "/data/x.npz", "https://h/x?a&b=2"]
)
def test_uris_without_credentials_are_left_alone(uri):
    assert redact_uri(uri) == uri


def test_credentials_in_storage_options_are_refused_but_endpoints_and_modes_pass():
    benign = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu"}, "anon": False,
              "token": "google_default", "config_kwargs": {"s3": {"addressing_style": "path"}}}  # fmt: skip
    assert credential_names(benign) == []
    override(preset("debug"), [f"data.storage_options={json.dumps(benign)}"])
    secret = {**benign, "client_kwargs": {"aws_session_token": "x"}, "headers": {"Authorization": "Bearer x"}}
    assert credential_names(secret) == ["client_kwargs.aws_session_token", "headers.Authorization"]
    with pytest.raises(ConfigError, match="client_kwargs.aws_session_token, headers.Authorization looks like"):
        override(preset("debug"), [f"data.storage_options={json.dumps(secret)}"])


@pytest.mark.parametrize(
    "options, found",
    [
        ({"headers": {"X-Api-Key": "k"}}, ["headers.X-Api-Key"]),
        ({"headers": {"x-goog-api-key": "k"}}, ["headers.x-goog-api-key"]),
        ({"headers": {"Cookie": "session=abc"}}, ["headers.Cookie"]),
        ({"headers": {"Proxy-Authorization": "Basic x"}}, ["headers.Proxy-Authorization"]),
        ({"client_kwargs": {"proxies": {"https": "http://user:pw@proxy:3128"}}}, ["client_kwargs.proxies.https"]),
    ],
)  # fmt: skip
def test_credentials_are_found_by_rule_not_by_a_list_of_names(options, found):
    assert credential_names(options) == found
    with pytest.raises(ConfigError, match="looks like a credential"):
        override(preset("debug"), [f"data.storage_options={json.dumps(options)}"])


@pytest.mark.parametrize("key", ["api-key", "code", "X-Goog-Api-Key"])
def test_credential_query_keys_are_redacted_by_rule(key):
    assert redact_uri(f"https://h/x.npz?n=1&{key}=s3cret") == f"https://h/x.npz?n=1&{key}=***"
