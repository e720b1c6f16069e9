"""Data parallelism: `torchrun --nproc_per_node 2 train.py` (gloo on CPU) trains like one
process with the global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from minidiff.checkpoint import read_safetensors
from minidiff.scheduler import NoiseSchedule
from minidiff.training import Trainer, diffusion_loss

from conftest import tiny_train_config

ROOT = Path(__file__).resolve().parents[1]
STEPS, PER_RANK = 3, 2


def test_each_rank_draws_its_slice_of_the_global_batch_randomness():
    seen = {}

    def model(x_t, t, ids, mask):  # records what the loss feeds the network
        seen.setdefault("x_t", []).append(x_t)
        seen.setdefault("t", []).append(t)
        return torch.zeros_like(x_t)

    tokenizer = lambda texts: (torch.zeros(len(texts), 2, dtype=torch.long), torch.ones(len(texts), 2, dtype=torch.bool))  # noqa: E731
    schedule, images, cpu = NoiseSchedule(), torch.rand(4, 3, 8, 8) * 2 - 1, torch.device("cpu")
    whole = diffusion_loss(model, tokenizer, schedule, images, ["a"] * 4, torch.Generator().manual_seed(5), 0.5, cpu)
    parts = [diffusion_loss(model, tokenizer, schedule, images[2 * r: 2 * r + 2], ["a"] * 2,
                            torch.Generator().manual_seed(5), 0.5, cpu, shard=(r, 2)) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])  # per-sample losses: same noise, same t
    assert torch.equal(torch.cat(seen["x_t"][1:]), seen["x_t"][0])
    assert torch.equal(torch.cat(seen["t"][1:]), seen["t"][0])


def test_torchrun_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train.py"), "--out", str(out), "--steps", str(STEPS), "--batch-size", str(PER_RANK),
               "--image-size", "16", "--base-channels", "16", "--channel-mults", "1", "2", "--attention-levels", "1",
               "--text-dim", "32", "--warmup-steps", "2", "--sample-every", "0", "--checkpoint-every", "0",
               "--log-every", "2", "--device", "cpu"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stderr and result.stderr.count("training on") == 1  # rank 0 alone logs
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{STEPS:08d}"]
    got = read_safetensors(out / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")

    def single(batch_size):
        config = tiny_train_config(tmp_path / f"single-{batch_size}", steps=STEPS, batch_size=batch_size)
        trainer = Trainer(config)
        trainer.write_samples = lambda name: None
        trainer.train()
        return trainer.model.state_dict()

    want = single(2 * PER_RANK)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)
    half = single(PER_RANK)  # rank 0's share alone: the tolerance above tells them apart
    assert any(not torch.allclose(got[k], half[k], rtol=1e-4, atol=1e-5) for k in half)
