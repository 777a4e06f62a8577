"""Data-parallel training: rnnkit layers under DDP and FSDP train as on one process.

Two CPU processes on the gloo backend each take half of a batch. DDP averages their gradients,
and FSDP (``fully_shard``) shards the parameters and reduces the gradients to the same mean;
either way the gradients must equal those of one process on the whole batch (the loss is a
mean over equal halves), step after step, and so must the parameters after each optimizer step.
One spawn runs every configuration, to pay for the processes' start once.
"""

from __future__ import annotations

import datetime
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import rnnkit
from parity import assert_close
from rnnkit.testing import float64_copy

WORLD_SIZE = 2
STEPS = 3
N = 8  # the combined batch; each process takes N // WORLD_SIZE rows
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


class Model(nn.Module):
    """An LSTM with projections, a GRU on its output and a linear read-out of the last step."""

    def __init__(self, engine: str) -> None:
        super().__init__()
        self.lstm = rnnkit.LSTM(3, 8, num_layers=2, proj_size=5, engine=engine)
        self.gru = rnnkit.GRU(5, 6, bidirectional=True, engine=engine)
        self.head = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        out, _ = self.gru(out)
        return self.head(out[-1]).squeeze(-1)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(7, N, 3, generator=gen), torch.randn(N, generator=gen)


def train(model: nn.Module, rows: slice, full=lambda t: t) -> list[dict[str, torch.Tensor]]:
    """``STEPS`` of SGD with momentum on the batch rows ``rows``: the gradients of every step
    and the final parameters, by name, each made whole by ``full`` (FSDP shards them)."""
    params = {k.removeprefix("module."): p for k, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    dtype = next(model.parameters()).dtype
    x, y = (t.to(dtype) for t in _data())
    records = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x[:, rows]), y[rows])
        loss.backward()
        records.append({f"grad_{k}": full(p.grad).detach().clone() for k, p in params.items()})
        optimizer.step()
    records.append({k: full(p).detach().clone() for k, p in params.items()})
    return records


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        return None
    return fully_shard


# (wrapper, engine) that the workers train
CONFIGS = [("ddp", "reference"), ("ddp", "auto"), ("fsdp", "auto")]


def _worker(rank: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    # a rank left waiting on a collective gives up within the test's own limit
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    half = N // WORLD_SIZE
    rows = slice(rank * half, (rank + 1) * half)
    results = {}
    try:
        for wrapper, engine in CONFIGS:
            # DDP broadcasts rank 0's parameters at wrapping; FSDP keeps each rank's shard of
            # its own, so the ranks draw the same init (the single process's)
            torch.manual_seed(0 if wrapper == "fsdp" else rank)
            model = Model(engine)
            if wrapper == "ddp":
                results[wrapper, engine] = train(nn.parallel.DistributedDataParallel(model), rows)
            elif _fully_shard() is not None:
                for layer in (model.lstm, model.gru, model):
                    _fully_shard()(layer)
                with warnings.catch_warnings():
                    # FSDP notes that a layer returned a view; nothing here writes into it
                    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
                    results[wrapper, engine] = train(model, rows, lambda t: t.full_tensor())
        torch.save(results, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(path: str) -> None:
    """Run the workers; kill them and fail if they take more than ``TIMEOUT_S`` in all."""
    context = mp.spawn(_worker, args=(_free_port(), path), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the distributed workers did not finish in {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> list[dict]:
    path = str(tmp_path_factory.mktemp("distributed") / "records")
    _spawn(path)
    return [torch.load(f"{path}.{rank}") for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize(("wrapper", "engine"), CONFIGS, ids=["-".join(c) for c in CONFIGS])
def test_matches_single_process(wrapper, engine, distributed_results):
    if wrapper == "fsdp" and _fully_shard() is None:
        pytest.skip("torch.distributed.fsdp.fully_shard needs torch 2.6 or newer")
    torch.manual_seed(0)
    model = Model(engine)
    # the single process's training in float64 from the same init: the truth of every step
    truth = train(float64_copy(model), slice(None))
    expected = train(model, slice(None))
    for rank, results in enumerate(distributed_results):
        records = zip(expected, results[wrapper, engine], truth, strict=True)
        for step, (e, a, t) in enumerate(records):
            assert list(a) == list(e), f"rank {rank}, step {step}: other parameters"
            assert_close(e, a, truth=t)
