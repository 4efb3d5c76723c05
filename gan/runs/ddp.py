"""DistributedDataParallel wiring over torch.distributed (gloo on CPU, NCCL on GPU): the
wrap, batch norm synchronised over ranks, and a gather. No Ray: a Ray Train worker's
process group is torch's own."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks. Every rank's loss depends on the sum, so the gradient each rank
    needs is the sum over ranks of theirs: the backward is an all-reduce too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch for gloo/CPU workers (torch's SyncBatchNorm runs
    on GPUs only). Mean and variance come from all-reduced sums; the all-reduce is
    differentiable (its backward all-reduces the gradient), so autograd gives each rank
    the gradient of the sum of all ranks' losses, as with one process and the whole batch."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1] * dist.get_world_size()  # every rank holds the same batch size
        mean = all_reduce(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = all_reduce(centred.square().sum(dims)) / count  # two passes: no cancellation
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * count / max(count - 1, 1), momentum)
        return y


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every batch norm layer in ``module`` replaced in place by its synchronised form
    (torch's SyncBatchNorm on GPUs, CPUSyncBatchNorm on CPUs), weights and buffers kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, CPUSyncBatchNorm):
            synced = CPUSyncBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            ).to(device)
            synced.load_state_dict(child.state_dict())
            synced.train(child.training)
            setattr(module, name, synced)
        else:
            sync_batchnorm(child, device)
    return module


def ddp_wrap(module: nn.Module, device: torch.device, *, sync_bn: bool = False) -> nn.Module:
    """DDP without per-step buffer broadcasts, after one broadcast of every buffer from
    rank 0: with broadcast_buffers=False DDP syncs only parameters at construction, and
    spectral norm's power-iteration vectors are buffers drawn from each rank's own seed.
    ``sync_bn`` turns batch norm into SyncBatchNorm in place (``module`` keeps it too)."""
    if sync_bn:
        sync_batchnorm(module, device)
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)
    if device.type != "cuda":
        return nn.parallel.DistributedDataParallel(module, broadcast_buffers=False)
    # Built on a side stream, so that a captured step (train.capture) may hold its all-reduce.
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        wrapped = nn.parallel.DistributedDataParallel(module, device_ids=[device.index], broadcast_buffers=False)
    torch.cuda.current_stream(device).wait_stream(side)  # the weights rank 0 broadcast are there
    return wrapped


def _for_backend(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    # gloo reduces CPU tensors, NCCL device tensors.
    return values.to(device) if dist.get_backend() == "nccl" else values.detach().cpu().clone()


def all_gather(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank's ``values`` (same shape on each), concatenated along dim 0 in rank order."""
    on_backend = _for_backend(values, device).contiguous()
    parts = [torch.empty_like(on_backend) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, on_backend)
    return torch.cat(parts).to(values.device)
