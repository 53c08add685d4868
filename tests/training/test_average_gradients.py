"""``average_gradients`` on two gloo processes: each gradient becomes the mean of the workers' own gradients."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ehrflow.training.ray_utils import average_gradients


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"used": torch.nn.Linear(3, 2), "unused": torch.nn.Linear(3, 2)})


def _local_grads(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad()
    # two forwards before one backward, as the bi-encoder step does
    (model["used"](x).pow(2).sum() + model["used"](x * 2).sum()).backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank: int, port: int, inputs: list[torch.Tensor], out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _model()
        _local_grads(model, inputs[rank])
        average_gradients(model)
        out[rank] = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()


def test_average_gradients_is_the_mean_over_workers_and_skips_unused_parameters():
    inputs = [torch.randn(4, 3, generator=torch.Generator().manual_seed(r)) for r in (1, 2)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(port, inputs, out), nprocs=2)
        synced = dict(out)
    own = [_local_grads(_model(), x) for x in inputs]
    for name, grad in own[0].items():
        if grad is None:  # the unused layer: no gradient on any worker, none after averaging
            assert name.startswith("unused") and synced[0][name] is None and synced[1][name] is None
            continue
        expected = (grad + own[1][name]) / 2
        assert not torch.allclose(grad, own[1][name])  # the workers' batches differ
        for rank in (0, 1):
            torch.testing.assert_close(synced[rank][name], expected)
