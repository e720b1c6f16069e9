"""Data parallelism: `torchrun --nproc_per_node 2 train.py` (gloo on CPU) trains like one
process with the global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minidiff.tools.checkpoint import read_safetensors
from minidiff.scheduler import DDPM
from minidiff.tools.trainer import Trainer
from minidiff.training import diffusion_loss

from conftest import tiny_train_config, tiny_train_flags

ROOT = Path(__file__).resolve().parents[1]
STEPS, PER_RANK = 3, 2


def test_each_rank_draws_its_slice_of_the_global_batch_randomness():
    seen = {}

    def model(x_t, t, ids, mask):  # records what the loss feeds the network
        seen.setdefault("x_t", []).append(x_t)
        seen.setdefault("t", []).append(t)
        return torch.zeros_like(x_t)

    tokenizer = lambda texts: (torch.zeros(len(texts), 2, dtype=torch.long), torch.ones(len(texts), 2, dtype=torch.bool))  # noqa: E731
    schedule, images, cpu = DDPM(), torch.rand(4, 3, 8, 8) * 2 - 1, torch.device("cpu")
    whole = diffusion_loss(model, tokenizer, schedule, images, ["a"] * 4, torch.Generator().manual_seed(5), 0.5, cpu)
    parts = [diffusion_loss(model, tokenizer, schedule, images[2 * r: 2 * r + 2], ["a"] * 2,
                            torch.Generator().manual_seed(5), 0.5, cpu, shard=(r, 2)) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])  # per-sample losses: same noise, same t
    assert torch.equal(torch.cat(seen["x_t"][1:]), seen["x_t"][0])
    assert torch.equal(torch.cat(seen["t"][1:]), seen["t"][0])


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train.py"), "--out", str(out),
               *tiny_train_flags(steps=STEPS, batch_size=PER_RANK, mixed_precision="no")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stderr and result.stderr.count("training on") == 1  # rank 0 alone logs
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{STEPS:08d}"]
    got = read_safetensors(out / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")

    def single(batch_size):
        config = tiny_train_config(tmp_path / f"single-{batch_size}", steps=STEPS, batch_size=batch_size,
                                   mixed_precision="no")  # bf16 rounds differently in another batch split
        trainer = Trainer(config)
        trainer.write_samples = lambda name: None
        trainer.train()
        return trainer.model.state_dict()

    want = single(2 * PER_RANK)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)
    half = single(PER_RANK)  # rank 0's share alone: the tolerance above tells them apart
    assert any(not torch.allclose(got[k], half[k], rtol=1e-4, atol=1e-5) for k in half)


RANK0_FAILS = """
import sys
sys.path.insert(0, {root!r})
import train
from minidiff.tools.cli import run
from minidiff.tools.trainer import Trainer

def full_disk(self, name):  # rank 0 alone writes samples
    raise OSError("no space left on device (raised by the test)")

Trainer.write_samples = full_disk
sys.exit(run(train.main))
"""


@pytest.mark.slow
def test_an_error_on_rank_0_while_sampling_stops_every_rank_at_once(tmp_path):
    """Two ranks (gloo), as torchrun starts them: rank 0's write_samples raises after step 1.
    Both processes must exit with an error promptly, rank 1 saying why, instead of rank 1
    waiting in its next all-reduce (gloo's timeout: 30 minutes)."""
    script = tmp_path / "rank0_fails.py"
    script.write_text(RANK0_FAILS.format(root=str(ROOT)))
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    flags = ["--out", str(tmp_path / "run"), *tiny_train_flags(steps=3, batch_size=2, sample_every=1)]
    ranks = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}
        ranks.append(subprocess.Popen([sys.executable, str(script), *flags], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    start = time.monotonic()
    try:
        results = [process.communicate(timeout=240) for process in ranks]
    finally:
        for process in ranks:
            process.kill()
    assert time.monotonic() - start < 200
    errors = [stderr for _, stderr in results]
    assert [process.returncode for process in ranks] == [1, 1], errors
    assert "OSError: no space left on device (raised by the test)" in errors[0]
    assert "RuntimeError: rank 0 failed while saving or sampling; see its error" in errors[1], errors[1][-2000:]
