"""Rebuild the FID feature network: a small digit classifier trained on the embedded digits.

Deterministic (fixed seed, one thread, deterministic kernels), so the committed weights in
gan/assets can be rebuilt and checked. Usage:
    python pipelines/build_evaluator.py            # train, report accuracy, write weights
    python pipelines/build_evaluator.py --out X.pt # write elsewhere
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import time

import torch
import torch.nn.functional as F

from gan.augment import translate
from gan.config import DataConfig
from gan.data import load_dataset
from gan.metrics import DigitClassifier, evaluator_path

SEED, EPOCHS, BATCH, LR, VAL = 0, 12, 64, 1e-3, 500


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(evaluator_path()), help="where to write the weights")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    data = load_dataset(DataConfig())
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(SEED))
    val_idx, train_idx = perm[:VAL], perm[VAL:]
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(SEED + 1)
    start = time.time()
    for epoch in range(EPOCHS):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=g)]
        for i in range(0, len(order), BATCH):
            idx = order[i : i + BATCH]
            images = data.images[idx]
            # Small shifts make the features robust to where a generator draws a digit.
            shifted = translate(images.float(), lambda lo, hi, n: torch.randint(lo, hi, (n,), generator=g), 0.08)
            loss = F.cross_entropy(model(shifted.round().to(torch.uint8)), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = accuracy(model, data.images[val_idx], data.labels[val_idx])
        print(
            f"epoch {epoch + 1}/{EPOCHS}  loss {loss.item():.3f}  held-out accuracy {acc:.3%}  {time.time() - start:.0f}s",
            flush=True,
        )
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    raw = buffer.getvalue()
    with open(args.out, "wb") as handle:
        handle.write(raw)
    print(f"wrote {args.out} ({len(raw) / 1024:.0f} KiB) sha256 {hashlib.sha256(raw).hexdigest()}")
    return 0


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(images).argmax(1) == labels).float().mean().item()


if __name__ == "__main__":
    sys.exit(main())
