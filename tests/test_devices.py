"""The laptop-GPU paths, checked as far as a CPU shows them: which autocast a CUDA card gets
(the capability query patched), what train.py says about it, the gradient scaler's state in a
checkpoint, torchrun on a Mac, and the out-of-memory hint; and bf16 training on CPUs with bf16
instructions. What a CPU cannot show: fp16 and bf16 numerics on a real GPU."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import train
from minidiff import runtime, training
from minidiff.tools.cli import run
from minidiff.runtime import precision_for
from minidiff.tools.trainer import Trainer, latest_checkpoint

from conftest import tiny_train_config, tiny_train_flags

TINY_FLAGS = tiny_train_flags(objective=None, steps=1, batch_size=2)  # train.py's default objective


def ampere(including_emulation=True):
    """torch.cuda.is_bf16_supported on a card that computes bf16 natively (Ampere and newer)."""
    return True


def turing(including_emulation=True):
    """On a Turing card (RTX 20xx, GTX 16xx, T4) bf16 is only emulated: 'supported' unless the
    emulation is excluded."""
    return including_emulation


@pytest.mark.parametrize("card,expected", [(ampere, torch.bfloat16), (turing, torch.float16)])
def test_precision_is_bf16_where_native_else_fp16(monkeypatch, card, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", card)
    assert precision_for(torch.device("cuda")) == expected
    assert precision_for(torch.device("cuda", 1)) == expected
    assert precision_for(torch.device("cuda"), training=True) == expected
    assert precision_for(torch.device("mps")) is None and precision_for(torch.device("mps"), training=True) is None


def test_mixed_precision_is_taken_as_asked_on_any_device_and_checked():
    for device in ("cpu", "cuda", "mps"):
        assert precision_for(torch.device(device), True, "no") is None
        assert precision_for(torch.device(device), True, "bf16") == torch.bfloat16
        assert precision_for(torch.device(device), False, "fp16") == torch.float16
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        training.TrainConfig(mixed_precision="float32")


def test_autocast_with_no_dtype_is_float32_even_where_the_default_would_be_bf16(monkeypatch):
    """mixed_precision "no" on an Ampere card: the step's autocast(device, None) must not fall back to
    the card's bf16."""
    import contextlib

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", ampere)
    assert isinstance(runtime.autocast(torch.device("cuda"), None), contextlib.nullcontext)
    with runtime.autocast(torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with runtime.autocast(torch.device("cpu"), None):
        assert not torch.is_autocast_enabled("cpu")


def test_mixed_precision_no_trains_in_float32_on_a_cpu_with_bf16(tmp_path, monkeypatch, capsys, no_training):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert run(train.main, ["--out", str(tmp_path / "run"), *TINY_FLAGS, "--mixed-precision", "no"]) == 0
    assert capsys.readouterr().err.splitlines()[0].startswith("training on cpu (float32): ")
    assert no_training[0].precision is None and no_training[0].config.mixed_precision == "no"


@pytest.mark.parametrize("native", [True, False])
def test_cpu_training_is_bf16_only_where_the_cpu_has_bf16_instructions_and_sampling_stays_float32(monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    assert precision_for(torch.device("cpu"), training=True) == (torch.bfloat16 if native else None)
    assert precision_for(torch.device("cpu")) is None  # sampling: float32, where equality with diffusers is tested
    state = training.TrainState(tiny_train_config("unused", steps=1))
    assert state.precision == (torch.bfloat16 if native else None)
    conv = next(m for m in state.model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1)
    # channels_last speeds float32 convolutions up, and took bf16's gain away on a CPU (BENCHMARKS.md section 5)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) != native


@pytest.fixture
def no_training(monkeypatch):
    """train.main up to the first log line: Trainer.train returns at once; the trainers built are kept."""
    built = []

    def train_nothing(self):
        built.append(self)
        return {"step": self.step, "stop_reason": "done", "seconds": 0.0}

    monkeypatch.setattr(Trainer, "train", train_nothing)
    return built


@pytest.mark.parametrize("card,named,scaler", [(False, "float32", False), (True, "bf16 autocast", False),
                                               (ampere, "bf16 autocast", False),
                                               (turing, "fp16 autocast + gradient scaler", True)])
def test_first_log_line_names_the_precision_and_fp16_gets_a_gradient_scaler(tmp_path, monkeypatch, capsys,
                                                                             no_training, card, named, scaler):
    if isinstance(card, bool):  # a CPU with (True) or without bf16 instructions
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: card)
    else:  # the trainer asks the real rule what a CUDA card with this capability gets
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", card)
        monkeypatch.setattr(training, "precision_for",
                            lambda device, *args: runtime.precision_for(torch.device("cuda"), *args))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GradScaler("cuda") without CUDA disables itself, with a warning
        assert run(train.main, ["--out", str(tmp_path / "run"), *TINY_FLAGS]) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith(f"training on cpu ({named}): flow objective")  # the default objective
    assert isinstance(no_training[0].scaler, torch.amp.GradScaler) == scaler


def test_gradient_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    """A CPU GradScaler (enabled: torch scales on CPU too) drives apply_gradients for 3 steps;
    its scale and growth tracker are saved in state.json and restored by load_checkpoint."""
    config = tiny_train_config(tmp_path, steps=3, batch_size=2)
    trainer = Trainer(config)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    trainer.write_samples = lambda name: None
    trainer.train()
    saved = trainer.scaler.state_dict()
    assert saved["scale"] == 2.0**11 and saved["_growth_tracker"] == 1  # grew once after 2 finite steps
    state = json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())
    assert state["grad_scaler"] == saved
    resumed = Trainer(config)
    resumed.scaler = torch.amp.GradScaler("cpu")  # a fresh scaler: scale 65536, tracker 0
    resumed.load_checkpoint(latest_checkpoint(tmp_path))
    assert resumed.scaler.state_dict() == saved
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), trainer.model.parameters()))


def test_torchrun_on_mps_is_refused_with_one_line(tmp_path, monkeypatch, capsys):
    import torch.distributed as dist

    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(train, "pick_device", lambda device=None: torch.device("mps"))
    assert run(train.main, ["--out", str(tmp_path / "run"), *tiny_train_flags(objective=None, steps=1, device=None)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: torchrun on a Mac: DDP cannot run on MPS") and len(err.splitlines()) == 1
    assert not dist.is_initialized()


def test_out_of_memory_is_a_hint_to_lower_the_batch_size(tmp_path, monkeypatch, capsys):
    def oom(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train", oom)
    assert run(train.main, ["--out", str(tmp_path / "run"), *tiny_train_flags(steps=1, batch_size=128)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "error: the GPU ran out of memory with --batch-size 128 at 16 px; try --batch-size 64"
