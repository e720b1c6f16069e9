"""Shared test fixtures: everything on CPU, deterministic, TF32 off, tiny models.
(Thread count: torch's default, or OMP_NUM_THREADS when set; the commands tests start get the same.)

The tiny training run is written once, here (`TINY_TRAINING`): as a `TrainConfig`
(`tiny_train_config`) and as the same run's train.py flags (`tiny_train_flags`). The tiny models
trained from it are session fixtures: `tiny_model_dir` / `tiny_pipe` (DDPM), `tiny_flow_model_dir`
/ `tiny_flow_pipe` (rectified flow), and `minidiff_pipe` / `minidiff_model_dir`, which run a test
once with each (ids `ddpm` and `flow`).

Tests that take seconds (subprocesses, training runs, the notebook, the browser, SD3 builds)
carry `@pytest.mark.slow`: `pytest -m "not slow"` is the quick loop, `make test` runs everything.
"""

from __future__ import annotations

import os

import pytest
import torch

# The commands the tests start get this process's thread count, fixed, so that their numbers compare
# bit for bit with in-process runs whatever else the machine runs (tests/test_cores.py unsets it to
# test the commands' own thread choice).
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# A run small enough to train a few steps in about a second.
TINY_TRAINING = dict(objective="ddpm", steps=4, batch_size=4, image_size=16, base_channels=16, channel_mults=(1, 2),
                     attention_levels=(1,), text_dim=32, lr=2e-3, warmup_steps=2, sample_every=0, checkpoint_every=0,
                     log_every=2, device="cpu")


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
    """The tiny run as a TrainConfig writing into `out`; `overrides` are TrainConfig fields."""
    from minidiff.training import TrainConfig

    return TrainConfig(out=str(out), **{**TINY_TRAINING, **overrides})


def tiny_unet_config(**overrides):
    """The tiny run's UNet as a UNetConfig; `overrides` are UNetConfig fields (context_dim, say)."""
    import dataclasses

    return dataclasses.replace(tiny_train_config("unused").backbone_config(), **overrides)


def tiny_train_flags(**overrides) -> list[str]:
    """The same tiny run as train.py flags (without --out); `overrides` are TrainConfig fields, and
    one set to None leaves its flag out (train.py's own default, or a flag the caller adds)."""
    flags = []
    for name, value in {**TINY_TRAINING, **overrides}.items():
        if value is None:
            continue
        flags.append("--" + name.replace("_", "-"))
        flags += [str(v) for v in value] if isinstance(value, tuple) else [str(value)]
    return flags


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny DDPM minidiff checkpoint (a few training steps) written by the real Trainer."""
    from minidiff.tools.trainer import Trainer

    out = tmp_path_factory.mktemp("tiny-model")
    Trainer(tiny_train_config(out)).train()
    return out


@pytest.fixture
def tiny_pipe(tiny_model_dir):
    from minidiff import MiniDiffusionPipeline

    return MiniDiffusionPipeline.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_flow_model_dir(tmp_path_factory):
    """A tiny rectified-flow minidiff checkpoint (`objective="flow"`), a few training steps."""
    from minidiff.tools.trainer import Trainer

    out = tmp_path_factory.mktemp("tiny-flow-model")
    Trainer(tiny_train_config(out, objective="flow")).train()
    return out


@pytest.fixture
def tiny_flow_pipe(tiny_flow_model_dir):
    from minidiff import MiniDiffusionPipeline

    return MiniDiffusionPipeline.from_pretrained(tiny_flow_model_dir, device="cpu")


OBJECTIVES = {"ddpm": ("tiny_model_dir", "tiny_pipe"), "flow": ("tiny_flow_model_dir", "tiny_flow_pipe")}


@pytest.fixture(params=sorted(OBJECTIVES))
def minidiff_model_dir(request):
    """Each tiny minidiff model's folder in turn: the DDPM one, then the flow one."""
    return request.getfixturevalue(OBJECTIVES[request.param][0])


@pytest.fixture(params=sorted(OBJECTIVES))
def minidiff_pipe(request):
    """Each tiny minidiff model in turn, loaded: the DDPM one, then the flow one."""
    return request.getfixturevalue(OBJECTIVES[request.param][1])


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
