"""Shared test fixtures: everything on CPU, deterministic, TF32 off, tiny models.
(Thread count: torch's default, or OMP_NUM_THREADS when set.)"""

from __future__ import annotations


import pytest
import torch

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="session", autouse=True)
def bridge_cpu_in_float32():
    """The bridge's tests compare its numbers with diffusers' own pipelines in float32, so the CPU
    dtype rule is pinned to float32 (as on a CPU without native bf16) for the whole session; the rule
    itself is tested with the capability patched (test_sd3_full_size). Reading a given cpuinfo file
    still works."""
    from bridge import sd3

    real = sd3.cpu_has_native_bf16
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sd3, "cpu_has_native_bf16", lambda cpuinfo=None: real(cpuinfo) if cpuinfo else False)
        yield


def tiny_train_config(out, **overrides):
    """A TrainConfig small enough to train a few steps in about a second."""
    from minidiff.training import TrainConfig

    values = dict(out=str(out), objective="ddpm", steps=4, batch_size=4, image_size=16, base_channels=16, channel_mults=(1, 2),
                  attention_levels=(1,), text_dim=32, sample_every=0, checkpoint_every=0, log_every=2,
                  warmup_steps=2, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny minidiff checkpoint (a few training steps) written by the real Trainer."""
    from minidiff.training import Trainer

    out = tmp_path_factory.mktemp("tiny-model")
    Trainer(tiny_train_config(out)).train()
    return out


@pytest.fixture
def tiny_pipe(tiny_model_dir):
    from minidiff import MiniDiffusionPipeline

    return MiniDiffusionPipeline.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny random-weight SD3 pipeline saved with save_pretrained (tests/sd3_tiny.py)."""
    from sd3_tiny import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_sd3(tiny_sd3_dir):
    """The tiny SD3 model loaded through the bridge's real loading path."""
    from bridge import SD3Bridge

    return SD3Bridge.from_pretrained(tiny_sd3_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_flow_model_dir(tmp_path_factory):
    """A tiny rectified-flow minidiff checkpoint (`objective="flow"`), a few training steps."""
    from minidiff.training import Trainer

    out = tmp_path_factory.mktemp("tiny-flow-model")
    Trainer(tiny_train_config(out, objective="flow")).train()
    return out


@pytest.fixture
def tiny_flow_pipe(tiny_flow_model_dir):
    from minidiff import MiniDiffusionPipeline

    return MiniDiffusionPipeline.from_pretrained(tiny_flow_model_dir, device="cpu")
