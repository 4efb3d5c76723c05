"""Feature networks FID and its companions are measured in: uint8 N x C x H x W images in,
one feature row per image out.

The digit classifier (weights committed under gan/assets) and a classifier trained for a
labelled dataset (``gan.evaluation.build``) also classify their features, which scores how
conditional a class-conditional generator is; a user's TorchScript or ONNX extractor (an
exported Inception-v3, say) serves unlabelled data. Architectures only: reading and
checking their files is ``gan.evaluation.backbone``'s.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class DigitClassifier(nn.Module):
    """Small CNN on 28x28 grayscale digits; ``features`` is its 128-d penultimate layer."""

    num_features = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 14
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 7
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),  # 4
            nn.Flatten(),
            nn.Linear(64 * 16, self.num_features), nn.ReLU(),
        )  # fmt: skip
        self.classify = nn.Linear(self.num_features, 10)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """uint8 N x C x H x W (any C, any size) -> float N x 1 x 28 x 28, standardised."""
        x = images.float() / 255.0
        if x.shape[1] == 3:
            x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="area" if x.shape[-1] > 28 else "bilinear")
        return (x - 0.1307) / 0.3081

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(images))


class DomainClassifier(nn.Module):
    """Small CNN for any labelled dataset (``channels`` x ``resolution`` px); ``features``
    is its 256-d penultimate layer. Trained per dataset by pipelines/build_evaluator.py."""

    num_features = 256

    def __init__(self, channels: int, resolution: int, num_classes: int) -> None:
        super().__init__()
        self.channels, self.resolution, self.num_classes = channels, resolution, num_classes
        layers: list[nn.Module] = []
        width_in, side = channels, resolution
        for width in (32, 64, 128, 128)[: max(1, math.ceil(math.log2(resolution / 4)))]:
            layers += [nn.Conv2d(width_in, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, 2, 1), nn.ReLU()]
            width_in, side = width, (side + 1) // 2
        self.body = nn.Sequential(
            *layers, nn.Flatten(), nn.Linear(width_in * side * side, self.num_features), nn.ReLU()
        )
        self.classify = nn.Linear(self.num_features, num_classes)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x C x H x W -> float in [-1, 1] at this network's channels and size."""
        x = images.float() / 127.5 - 1
        if x.shape[1] != self.channels:
            x = x.mean(1, keepdim=True) if self.channels == 1 else x.expand(-1, self.channels, -1, -1)
        if x.shape[-1] != self.resolution:
            x = F.interpolate(
                x, size=(self.resolution,) * 2, mode="area" if x.shape[-1] > self.resolution else "bilinear"
            )
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(images))


class ClassifierFeatures(nn.Module):
    """uint8 images in, a classifier's features out; ``logits`` classifies those features.
    Holds the classifier as a submodule so ``.to(device)`` moves it."""

    def __init__(self, model: DigitClassifier | DomainClassifier) -> None:
        super().__init__()
        self.model = model
        self.num_classes = model.classify.out_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.classify(features)


class ScriptedFeatures(nn.Module):
    """A user's TorchScript extractor (float images in [0, 1]) behind the uint8 interface;
    a module, so ``.to(device)`` moves its weights."""

    def __init__(self, scripted: nn.Module) -> None:
        super().__init__()
        self.scripted = scripted

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scripted(images.float() / 255.0).flatten(1)


class OnnxFeatures(nn.Module):
    """A user's ONNX extractor (float images in [0, 1]) run by onnxruntime behind the uint8
    interface. Exporters fix the input shape unless told otherwise, so a fixed height or
    width gets images resized to it on that side, and a fixed batch size gets batches of it
    (the last one padded). On a CUDA device it runs on that GPU where onnxruntime-gpu is
    installed."""

    def __init__(self, raw: bytes, device: torch.device | str = "cpu") -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # train.threads, not every core
        device = torch.device(device)
        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            gpu = torch.cuda.current_device() if device.index is None else device.index  # each rank its own GPU
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu}))
        self.session = onnxruntime.InferenceSession(raw, options, providers=providers)
        if device.type == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            warnings.warn(
                "eval.backbone=onnx runs on the CPU: install onnxruntime-gpu to run it on the GPU", stacklevel=2
            )
        net_input = self.session.get_inputs()[0]
        # Symbolic sides are strings (or None, or -1 from some exporters): any size goes there.
        shape = [d if isinstance(d, int) and d > 0 else None for d in net_input.shape or []]
        if len(shape) != 4 or (shape[1] not in (None, 1, 3) and shape[3] in (1, 3)):
            raise ValueError(f"its input {net_input.name!r} has shape {net_input.shape}, not N x C x H x W")
        self.input_name = net_input.name
        self.batch, _, self.height, self.width = shape

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        size = (self.height or x.shape[2], self.width or x.shape[3])
        if size != tuple(x.shape[2:]):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        x = x.cpu().numpy()
        step = self.batch or len(x)
        out = []
        for i in range(0, len(x), step):
            chunk = x[i : i + step]
            padded = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            out.append(self.session.run(None, {self.input_name: padded})[0][: len(chunk)])
        return torch.from_numpy(np.concatenate(out)).reshape(len(x), -1).to(images.device)
