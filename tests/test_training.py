"""The training loop: it learns, it logs, it saves what sampling needs."""

from __future__ import annotations

import json

import pytest
import torch

from minidiff import MiniDiffusionPipeline
from minidiff.training import Trainer, learning_rate

from conftest import tiny_train_config


def test_loss_goes_down_on_a_tiny_model(tmp_path):
    trainer = Trainer(tiny_train_config(tmp_path, steps=60, batch_size=16, lr=2e-3, log_every=10, warmup_steps=5))
    trainer.train()
    losses = [row["loss"] for row in trainer.loss_rows]
    assert losses[-1] < 0.7 * losses[0]


def test_run_folder_holds_model_logs_and_resumable_state(tiny_model_dir):
    for name in ("config.json", "model.safetensors", "loss.csv", "loss.png", "samples/final.png"):
        assert (tiny_model_dir / name).exists(), name
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["format"] == "minidiff" and config["unet"]["image_size"] == 16
    header = (tiny_model_dir / "loss.csv").read_text().splitlines()[0]
    assert header.startswith("step,loss,lr,images_per_s,loss_t0")
    checkpoints = list((tiny_model_dir / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-00000004"]


def test_saved_model_is_the_ema(tmp_path):
    trainer = Trainer(tiny_train_config(tmp_path))
    trainer.train()
    pipe = MiniDiffusionPipeline.from_pretrained(tmp_path, device="cpu")
    saved = pipe.model.state_dict()
    key = "unet.conv_in.weight"
    torch.testing.assert_close(saved[key], trainer.ema.shadow[key])
    assert not torch.equal(saved[key], trainer.model.state_dict()[key])


def test_learning_rate_warms_up_then_decays():
    config = tiny_train_config("x", steps=100, warmup_steps=10, lr=1.0)
    assert learning_rate(config, 0) == pytest.approx(0.1)
    assert learning_rate(config, 9) == pytest.approx(1.0)
    assert learning_rate(config, 99) == pytest.approx(0.1, abs=0.01)


def test_caption_dropout_makes_empty_prompts(tmp_path, monkeypatch):
    from minidiff import training

    seen = []
    real = training.diffusion_loss

    def spy(model, tokenizer, schedule, images, captions, generator, dropout, device, **kwargs):
        original = tokenizer.__call__
        return real(model, lambda texts: (seen.extend(texts), original(texts))[1], schedule, images, captions,
                    generator, dropout, device, **kwargs)

    monkeypatch.setattr(training, "diffusion_loss", spy)
    Trainer(tiny_train_config(tmp_path, steps=20, batch_size=20, caption_dropout=0.1)).train()
    empty = seen.count("") / len(seen)
    assert 0.03 < empty < 0.2


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os

    from minidiff.checkpoint import write_json

    write_json(tmp_path / "x.json", {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~umask
