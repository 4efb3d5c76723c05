"""Other image domains: RGB presets, an evaluator built for a labelled dataset (deterministic,
found beside the data, used by every FID on it), and class accuracy of conditional samples."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gan.core.config import ConfigError, EvalConfig, override, preset
from gan.core.models import build_models
from gan.data.prepare import PrepareConfig, prepare
from gan.evaluation.backbone import backbone_file, check_backbone, read_domain_evaluator, read_user_network
from gan.evaluation.build import BuildConfig, EvaluatorBuild
from gan.evaluation.evaluator import split_real
from gan.evaluation.evaluator_file import digits_evaluator_path, domain_classifier_from, evaluator_bytes
from gan.evaluation.features import OnnxFeatures
from gan.runs.session import LocalSession
from gan.runs.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RGB_PRESETS = ["dcgan-32", "dcgan-64", "dcgan-64-cond", "resnet-64"]
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230)}


@pytest.mark.parametrize("name", RGB_PRESETS)
def test_rgb_presets_make_rgb_images_at_their_size(name):
    cfg = preset(name)
    G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels)
    labels = torch.tensor([0, 9]) if cfg.model.num_classes else None
    with torch.no_grad():
        x = G(torch.randn(2, cfg.model.z_dim), labels)
        assert x.shape == (2, 3, cfg.data.resolution, cfg.data.resolution)
        assert D(x, labels).shape == (2,)
    assert cfg.eval.backbone == "classifier" and "flip" not in cfg.loss.augment


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> str:
    """A labelled RGB dataset made here: a disc of one colour per class on grey, 32 px."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / "src" / name).mkdir(parents=True)
        for i in range(60):
            cy, cx, r = rng.integers(10, 22), rng.integers(10, 22), rng.integers(5, 9)
            yy, xx = np.mgrid[:32, :32]
            pixels = np.full((32, 32, 3), 128, np.uint8)
            pixels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour
            Image.fromarray(pixels).save(root / "src" / name / f"{i}.png")
    dest = root / "prepared"
    prepare(PrepareConfig(source=str(root / "src"), dest=str(dest), resolution=32, channels=3), log=io.StringIO())
    return str(dest)


def build(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "build_evaluator.py"), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip


def test_the_evaluator_build_is_deterministic_and_refuses_to_replace_one(shapes, tmp_path):
    shas = []
    for out in (tmp_path / "a.pt", tmp_path / "b.pt"):
        result = build("--data", shapes, "--epochs", "4", "--out", str(out))
        assert result.returncode == 0, result.stderr
        shas.append(hashlib.sha256(out.read_bytes()).hexdigest())
        assert shas[-1] in result.stdout and "held-out accuracy" in result.stdout
    assert shas[0] == shas[1]
    model, info, sha = read_domain_evaluator(str(tmp_path / "a.pt"))
    assert sha == shas[0] and (info.channels, info.resolution, info.num_classes) == (3, 32, 3)
    assert info.class_names == sorted(COLOURS) and info.held_out_accuracy > 0.5  # chance: 1/3, after 12 steps

    again = build("--data", shapes, "--epochs", "4", "--out", str(tmp_path / "a.pt"))
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].endswith("pass --overwrite to replace it")
    assert hashlib.sha256((tmp_path / "a.pt").read_bytes()).hexdigest() == shas[0]  # untouched


def test_the_committed_digits_evaluator_is_not_rebuilt_over_without_overwrite():
    """Every digits FID is scored by gan/assets' classifier: a plain rebuild must not replace it."""
    committed = digits_evaluator_path()
    before = hashlib.sha256(committed.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="exists; runs scored with it record its sha256: pass --overwrite"):
        EvaluatorBuild(BuildConfig(), log=lambda line: None)
    assert hashlib.sha256(committed.read_bytes()).hexdigest() == before


def test_a_build_in_process_leaves_the_caller_alone_and_its_file_reads_back_as_written(shapes, tmp_path):
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    cfg = BuildConfig(data=shapes, out=str(tmp_path / "e.pt"), epochs=1)
    built = EvaluatorBuild(cfg, log=lambda line: None).run()
    assert torch.equal(torch.rand(3), expected)  # seeded for the build only
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, strict)
    raw = (tmp_path / "e.pt").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == built.sha256
    model, info = domain_classifier_from(raw)
    assert evaluator_bytes(model, info) == raw  # one format, read and written in one place
    assert (info.dataset, info.epochs, info.held_out_images) == (shapes, 1, 18)  # 10% of 180 images
    with pytest.raises(ValueError, match="--epochs must be >= 1, not 0"):
        BuildConfig(epochs=0)


def test_a_run_on_the_data_is_scored_by_the_evaluator_beside_it(shapes, tmp_path):
    cfg = override(preset("debug"), [f"data.uri={shapes}", "data.resolution=32", "data.channels=3",
                                     "model.num_classes=3", "eval.backbone=classifier",
                                     "train.total_kimg=0.16", "eval.every_kimg=0.16"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"evaluator\.pt: no such file .*build_evaluator\.py --data"):
        check_backbone(cfg.eval, cfg.data)  # train.py and tune.py say so before Ray starts
    assert build("--data", shapes, "--epochs", "4").returncode == 0
    beside = Path(shapes) / "evaluator.pt"
    sha = hashlib.sha256(beside.read_bytes()).hexdigest()
    check_backbone(cfg.eval, cfg.data)
    check_backbone(override(cfg, [f"eval.backbone_sha256={sha}"]).eval, cfg.data)
    with pytest.raises(ConfigError, match=rf"its sha256 is {sha}, not eval\.backbone_sha256=0{{64}}"):
        check_backbone(override(cfg, ["eval.backbone_sha256=" + "0" * 64]).eval, cfg.data)
    trainer = Trainer(cfg, LocalSession(str(tmp_path / "run"), quiet=True))
    assert trainer.evaluator.sha256 == sha
    last = trainer.train().history[-1]
    assert last["fid"] > 0 and 0 <= last["class_accuracy"] <= 1  # conditional: scored per class too


def test_an_evaluator_for_other_data_or_another_image_size_is_refused_before_training(shapes, tmp_path):
    """The dataset prepared again over an old one keeps the old evaluator.pt beside it: its
    features were learnt on other images, so it is refused until rebuilt, unless named on
    purpose; one for another image size is refused either way."""
    built = tmp_path / "built"
    built.mkdir()
    assert build("--data", shapes, "--epochs", "1", "--out", str(built / "evaluator.pt")).returncode == 0
    source = tmp_path / "src"
    shutil.copytree(Path(shapes).parent / "src", source)
    for extra in source.glob("*/5?.png"):  # the same classes, fewer images
        extra.unlink()
    again = tmp_path / "again"
    prepare(PrepareConfig(source=str(source), dest=str(again), resolution=32, channels=3), log=io.StringIO())
    (again / "evaluator.pt").write_bytes((built / "evaluator.pt").read_bytes())
    cfg = override(preset("dcgan-32"), [f"data.uri={again}", "model.num_classes=3"])
    with pytest.raises(ConfigError, match=r"evaluator\.pt was built on other data than .* --overwrite, or name it"):
        check_backbone(cfg.eval, cfg.data)
    check_backbone(override(cfg, [f"eval.backbone_uri={built / 'evaluator.pt'}"]).eval, cfg.data)

    small = tmp_path / "small"
    prepare(PrepareConfig(source=str(source), dest=str(small), resolution=28, channels=3), log=io.StringIO())
    at_28 = override(cfg, [f"data.uri={small}", "data.resolution=28", f"eval.backbone_uri={built / 'evaluator.pt'}"])
    with pytest.raises(ConfigError, match=r"scores 3-channel images at 32 px, and the data is 3-channel at 28 px"):
        check_backbone(at_28.eval, at_28.data)


def test_a_users_network_from_a_uri_must_be_named_by_its_sha256(tmp_path):
    remote = EvalConfig(backbone="torchscript", backbone_uri="s3://models/inception.pt")
    with pytest.raises(ConfigError, match=r"s3://models/inception\.pt: .* --set eval\.backbone_sha256="):
        check_backbone(remote)
    local = EvalConfig(backbone="torchscript", backbone_uri=f"file://{tmp_path}/inception.pt")
    with pytest.raises(ConfigError, match=r"no such file \(a TorchScript module\)$"):
        check_backbone(local)  # a file here is the user's own: its sha256 is logged, not required


def test_a_users_torchscript_network_scores_every_fid_and_a_wrong_one_is_refused_before_training(shapes, tmp_path):
    """Data without labels: the user's TorchScript feature network (an exported Inception-v3,
    say), named by its sha256; here a small one with any input size, as Inception resizes."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
    torch.jit.save(torch.jit.script(net.eval()), tmp_path / "features.pt")
    sha = hashlib.sha256((tmp_path / "features.pt").read_bytes()).hexdigest()
    cfg = override(preset("debug"), [f"data.uri={shapes}", "data.resolution=32", "data.channels=3",
                                     "model.num_classes=3", "eval.backbone=torchscript", f"eval.backbone_uri={tmp_path / 'features.pt'}",
                                     f"eval.backbone_sha256={sha}", "train.total_kimg=0.16", "eval.every_kimg=0.16"])  # fmt: skip
    with pytest.raises(ConfigError, match=rf"its sha256 is {sha}, not eval\.backbone_sha256=0{{64}}"):
        check_backbone(override(cfg, ["eval.backbone_sha256=" + "0" * 64]).eval, cfg.data)
    check_backbone(cfg.eval, cfg.data)
    trainer = Trainer(cfg, LocalSession(str(tmp_path / "run"), quiet=True))
    assert trainer.evaluator.sha256 == sha and trainer.evaluator.real_features.shape[1] == 8
    first = trainer.evaluator.real_features[:4]
    reference, _ = split_real(len(trainer.data), cfg.eval.num_samples)
    with torch.no_grad():  # the network's own features of the real images, from uint8 to [0, 1]
        expected = net(trainer.data.rows(reference[:4]).float() / 255).flatten(1)
    torch.testing.assert_close(first, expected)
    last = trainer.train().history[-1]
    assert last["fid"] > last["fid_floor"] >= 0 and 0 <= last["precision"] <= 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript-based exporter: fast, no onnxscript
def test_a_users_fixed_size_onnx_network_scores_fids_and_one_that_cannot_take_the_data_is_refused(shapes, tmp_path):
    """The exporter's default is a fixed input: this one takes batches of 2 at 24 px, so
    32-px images are resized to it and scored 2 at a time. A network for grayscale input is
    refused before training, in one line."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1)).eval()
    torch.onnx.export(net, (torch.zeros(2, 3, 24, 24),), tmp_path / "features.onnx", dynamo=False)
    gray = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1)).eval()
    torch.onnx.export(gray, (torch.zeros(1, 1, 32, 32),), tmp_path / "gray.onnx", dynamo=False)
    sha = hashlib.sha256((tmp_path / "features.onnx").read_bytes()).hexdigest()
    cfg = override(preset("debug"), [f"data.uri={shapes}", "data.resolution=32", "data.channels=3",
                                     "model.num_classes=3", "eval.backbone=onnx", f"eval.backbone_uri={tmp_path / 'features.onnx'}",
                                     f"eval.backbone_sha256={sha}", "train.total_kimg=0.16", "eval.every_kimg=0.16"])  # fmt: skip
    with pytest.raises(ConfigError, match=rf"its sha256 is {sha}, not eval\.backbone_sha256=0{{64}}"):
        check_backbone(override(cfg, ["eval.backbone_sha256=" + "0" * 64]).eval, cfg.data)
    wrong = override(cfg, [f"eval.backbone_uri={tmp_path / 'gray.onnx'}", "eval.backbone_sha256="])
    with pytest.raises(
        ConfigError, match=r"gray\.onnx: cannot take 3x32x32 images in \[0, 1\] \(\w+: .+\)$"
    ) as refused:
        check_backbone(wrong.eval, wrong.data)
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match=r"none\.onnx: no such file \(an ONNX network\)$"):
        check_backbone(override(cfg, [f"eval.backbone_uri={tmp_path / 'none.onnx'}", "eval.backbone_sha256="]).eval)
    check_backbone(cfg.eval, cfg.data)
    trainer = Trainer(cfg, LocalSession(str(tmp_path / "run"), quiet=True))
    assert trainer.evaluator.sha256 == sha and trainer.evaluator.real_features.shape[1] == 8
    reference, _ = split_real(len(trainer.data), cfg.eval.num_samples)
    with torch.no_grad():  # the network's own features of 5 real images (an odd count: the last batch is padded)
        images = torch.nn.functional.interpolate(trainer.data.rows(reference[:5]).float() / 255, size=(24, 24),
                                                 mode="bilinear", align_corners=False, antialias=True)  # fmt: skip
        expected = net(images).flatten(1)
    torch.testing.assert_close(trainer.evaluator.real_features[:5], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        trainer.evaluator.features(trainer.data.rows(reference[:5])), expected, atol=1e-5, rtol=1e-4
    )
    last = trainer.train().history[-1]
    assert last["fid"] > last["fid_floor"] >= 0 and 0 <= last["precision"] <= 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_an_onnx_network_with_one_fixed_side_is_resized_on_that_side_and_one_not_for_images_is_refused(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1)).eval()
    torch.onnx.export(net, (torch.zeros(1, 3, 24, 24),), tmp_path / "tall.onnx", dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch", 3: "width"}})  # fmt: skip
    network, _ = read_user_network(EvalConfig(backbone="onnx", backbone_uri=str(tmp_path / "tall.onnx")))
    images = torch.randint(0, 256, (3, 3, 32, 40), dtype=torch.uint8)
    with torch.no_grad():  # height 32 -> 24, width kept at 40
        expected = net(F.interpolate(images / 255, size=(24, 40), mode="bilinear", antialias=True)).flatten(1)
        torch.testing.assert_close(network(images), expected, atol=1e-5, rtol=1e-4)
    torch.onnx.export(torch.nn.Flatten(), (torch.zeros(2, 3, 24),), tmp_path / "rows.onnx", dynamo=False)
    with pytest.raises(ConfigError, match=r"rows\.onnx: cannot be loaded as an ONNX network \(ValueError: its input "
                                          r"'\S+' has shape \[2, 3, 24\], not N x C x H x W\)$"):  # fmt: skip
        read_user_network(EvalConfig(backbone="onnx", backbone_uri=str(tmp_path / "rows.onnx")))
    channels_last = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(24 * 24 * 3, 4))
    torch.onnx.export(channels_last, (torch.zeros(2, 24, 24, 3),), tmp_path / "nhwc.onnx", dynamo=False)
    with pytest.raises(ConfigError, match=r"nhwc\.onnx: .+ has shape \[2, 24, 24, 3\], not N x C x H x W\)$"):
        read_user_network(EvalConfig(backbone="onnx", backbone_uri=str(tmp_path / "nhwc.onnx")))
    # the data's storage options (an endpoint, say) reach a network on the data's kind of filesystem only
    for uri, data_uri, reaches in [("s3://nets/inception.onnx", "s3://data/faces", True),
                                   ("s3a://nets/inception.onnx", "s3://data/faces", True),
                                   (str(tmp_path / "tall.onnx"), "s3://data/faces", False),
                                   ("s3://nets/inception.onnx", str(tmp_path), False)]:  # fmt: skip
        _, options = backbone_file(EvalConfig(backbone="onnx", backbone_uri=uri), data_uri, {"endpoint_url": "x"})
        assert options == ({"endpoint_url": "x"} if reaches else {}), uri


def test_each_gpu_rank_runs_an_onnx_network_on_its_own_gpu_and_is_warned_when_onnxruntime_cannot(monkeypatch):
    """No GPU here: onnxruntime's session is replaced by one that records what it was asked."""
    import onnxruntime

    asked, cuda_starts = [], True

    class Session:
        def __init__(self, raw, options, providers):
            asked.append(providers)
            self.providers = providers if cuda_starts else ["CPUExecutionProvider"]

        def get_providers(self):
            return [p if isinstance(p, str) else p[0] for p in self.providers]

        def get_inputs(self):
            return [SimpleNamespace(name="images", shape=["batch", 3, 299, 299])]

    monkeypatch.setattr(onnxruntime, "InferenceSession", Session)
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    OnnxFeatures(b"", "cuda:1")
    OnnxFeatures(b"", "cpu")
    assert asked == [[("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"], ["CPUExecutionProvider"]]
    cuda_starts = False  # onnxruntime without CUDA libraries falls back to the CPU, with a log line only
    with pytest.warns(UserWarning, match="runs on the CPU: install onnxruntime-gpu"):
        OnnxFeatures(b"", "cuda:0")


def test_the_digit_evaluator_refuses_rgb_data_and_a_classifier_needs_prepared_data(tmp_path):
    cfg = preset("dcgan-64")
    with pytest.raises(ConfigError, match=r"eval\.backbone=digits scores grayscale digits, not RGB images"):
        check_backbone(EvalConfig(), cfg.data)
    for uri in ("embedded:mnist5k", str(tmp_path)):  # neither has an evaluator beside it
        with pytest.raises(ConfigError, match=rf"{uri} is not one: prepare it"):
            check_backbone(cfg.eval, override(cfg, [f"data.uri={uri}"]).data)
