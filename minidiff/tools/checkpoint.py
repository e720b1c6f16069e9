"""Model folders as the scripts and the trainer write and read them: config.json (the model's config)
beside model.safetensors (its weights; a latent model's autoencoder in autoencoder/), with every write
atomic (a temporary file, synced, then renamed over the target: a crash mid-save leaves the
previous file whole) and every way a folder can be broken explained in one line.

Only JSON and safetensors are ever read: no pickle, so opening someone else's folder cannot run
their code (a pickle found instead is named and left unread).
"""

from __future__ import annotations

import difflib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import autoencoder as ae
from ..model import BACKBONES, OBJECTIVES, ModelConfig, TextToImageModel
from ..text import TextEncoderConfig

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
AUTOENCODER_FOLDER = "autoencoder"  # a latent model's autoencoder, inside the model folder (diffusers: vae/)
FORMAT = {"format": "minidiff", "format_version": 1}  # what config.json says a model folder is
FORMAT_NAME, FORMAT_VERSION = FORMAT["format"], FORMAT["format_version"]
AUTOENCODER_FORMAT = {"format": "minidiff-autoencoder", "format_version": 1}  # ... and an autoencoder folder


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message says why and what to do."""


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path), fsync, then rename onto `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, data: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}  # what safetensors writes
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_json(path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); the checkpoint is corrupt") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; the checkpoint is corrupt")
    return data


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
NEVER_UNPICKLED = "minidiff reads only safetensors and JSON, never pickles (loading a pickle can run any code)"


def looks_like_pickle(path: Path) -> bool:
    """A pickle (protocol 2+) starts with 0x80; torch.save writes a zip archive ("PK") of pickles.
    (A safetensors file starts with the 8-byte length of its JSON header.)"""
    with open(path, "rb") as f:
        head = f.read(2)
    return head[:1] == b"\x80" or head == b"PK"


def read_safetensors(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        return load_file(str(path))
    except FileNotFoundError:
        pickles = sorted(p.name for p in path.parent.glob("*") if p.suffix in PICKLE_SUFFIXES) if path.parent.is_dir() else []
        hint = f" ({', '.join(pickles)} beside it is not read: {NEVER_UNPICKLED})" if pickles else ""
        raise CheckpointError(f"{path} is missing{hint}; the checkpoint is incomplete") from None
    except (SafetensorError, OSError, ValueError) as error:
        if path.is_file() and looks_like_pickle(path):
            raise CheckpointError(f"{path} is a pickle file, not safetensors, and was not loaded: {NEVER_UNPICKLED}") from None
        reason = " ".join(str(error).split())
        raise CheckpointError(f"{path} is not a readable safetensors file ({reason}); the checkpoint is corrupt") from None


def save_autoencoder(folder, autoencoder: ae.Autoencoder) -> None:
    """`folder`/model.safetensors and config.json (its AutoencoderConfig, with "format":
    "minidiff-autoencoder"), as a model folder holds them; each file written atomically."""
    write_safetensors(Path(folder) / WEIGHTS_NAME, autoencoder.state_dict())
    write_json(Path(folder) / CONFIG_NAME, {**AUTOENCODER_FORMAT, **autoencoder.config.to_dict()})


def load_autoencoder(folder, device: torch.device | str = "cpu") -> ae.Autoencoder:
    """What save_autoencoder wrote, in eval mode; every way the folder can be broken is explained in one
    CheckpointError, and nothing is half-loaded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"autoencoder folder {folder} is missing; train one with `python train.py --latent`")
    raw = read_json(folder / CONFIG_NAME)
    if {key: raw.get(key) for key in AUTOENCODER_FORMAT} != AUTOENCODER_FORMAT:
        raise CheckpointError(f"{folder} is not a minidiff autoencoder (config.json has format {raw.get('format')!r} "
                              f"version {raw.get('format_version')!r}, not {AUTOENCODER_FORMAT['format']!r} version "
                              f"{AUTOENCODER_FORMAT['format_version']})")
    weights = read_safetensors(folder / WEIGHTS_NAME)
    try:
        autoencoder = ae.Autoencoder(ae.AutoencoderConfig.from_dict(raw))
        autoencoder.load_state_dict(weights)  # strict: every tensor, each of the right shape
    except (TypeError, ValueError, RuntimeError) as error:
        reason = " ".join(str(error).split())[:300]
        raise CheckpointError(f"{folder} does not hold a valid autoencoder ({reason}); corrupt or partial") from None
    return autoencoder.to(device).eval()


def config_to_dict(config: ModelConfig) -> dict:
    """The model's config as config.json holds it."""
    latent = {"autoencoder": asdict(config.autoencoder)} if config.autoencoder else {}
    return {"objective": config.objective, config.backbone_name: asdict(config.backbone),
            "text_encoder": asdict(config.text_encoder), "scheduler": asdict(config.scheduler), "vocab": config.vocab,
            **latent}


def config_from_dict(d: dict) -> ModelConfig:
    """The model's config from config.json's values (`config_to_dict`'s)."""
    objective = d.get("objective", "ddpm")  # configs written before flow models existed are DDPM
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    backbones = [name for name in BACKBONES if name in d]
    if len(backbones) != 1:
        raise ValueError(f"the config must describe one denoising network, one of {list(BACKBONES)}")
    return ModelConfig(backbone=BACKBONES[backbones[0]][0](**d[backbones[0]]),
                       text_encoder=TextEncoderConfig(**d["text_encoder"]),
                       scheduler=OBJECTIVES[objective][0](**d["scheduler"]), vocab=list(d["vocab"]),
                       autoencoder=ae.LatentSpace(**d["autoencoder"]) if d.get("autoencoder") else None)


def save_model(directory, model: TextToImageModel, state_dict: dict[str, torch.Tensor] | None = None,
               trained_steps: int | None = None) -> None:
    """Write `directory`/config.json and model.safetensors (by default, the model's own weights).
    `trained_steps`, when given, is recorded in config.json (train.py's messages read it back)."""
    directory = Path(directory)
    if model.vae is not None:  # a latent model: its autoencoder first, then the config that names it
        save_autoencoder(directory / AUTOENCODER_FOLDER, model.vae)
    write_safetensors(directory / WEIGHTS_NAME, state_dict if state_dict is not None else model.state_dict())
    config = {**FORMAT, **config_to_dict(model.config)}
    if trained_steps is not None:
        config["trained_steps"] = trained_steps
    write_json(directory / CONFIG_NAME, config)


def load_model(directory, device: torch.device | str = "cpu") -> TextToImageModel:
    """Rebuild a model from `directory`, checking that the folder is a complete minidiff checkpoint."""
    directory = Path(directory)
    if directory.is_file():
        kind = f"a pickle file, not read: {NEVER_UNPICKLED}" if looks_like_pickle(directory) else "a file"
        raise CheckpointError(f"{directory} is {kind}; a model is a folder (config.json + model.safetensors) "
                              f"written by train.py")
    if not directory.is_dir():
        near = difflib.get_close_matches(directory.name, [p.name for p in directory.parent.glob("*") if p.is_dir()]
                                         if directory.parent.is_dir() else [], n=1)
        hint = f"did you mean {directory.parent / near[0]}? Or " if near else ""
        raise CheckpointError(f"model folder {directory} does not exist; {hint}train one with "
                              f"`python train.py --out {directory}`")
    raw = read_json(directory / CONFIG_NAME)
    if raw.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{directory} is not a minidiff checkpoint (its config.json has no \"format\": \"minidiff\")")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} was written by an incompatible minidiff (checkpoint format {version}, this version reads "
            f"{FORMAT_VERSION}); retrain it or use the minidiff version that wrote it"
        )
    try:
        config = config_from_dict(raw)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{directory / CONFIG_NAME} does not describe a valid model ({error})") from None
    model = TextToImageModel(config, latent_autoencoder(directory, config))
    weights = read_safetensors(directory / WEIGHTS_NAME)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError:  # a tensor of the wrong shape
        missing, unexpected = ["(shape mismatch)"], []
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / WEIGHTS_NAME} does not match its config.json "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors); the checkpoint is partial or corrupt"
        )
    return model.to(device).eval()


def latent_autoencoder(directory: Path, config: ModelConfig) -> ae.Autoencoder | None:
    """A latent model's autoencoder, from `directory`/autoencoder, checked against the fingerprint its
    config.json records (None for a pixel model)."""
    if config.autoencoder is None:
        return None
    folder = directory / AUTOENCODER_FOLDER
    if not folder.is_dir():
        raise CheckpointError(f"{directory} is a latent model but {folder} is missing: the model cannot turn its "
                              f"latents into pictures without the autoencoder it was trained with")
    autoencoder = load_autoencoder(folder)
    found = ae.fingerprint(autoencoder)
    if found != config.autoencoder.sha256:
        raise CheckpointError(f"{folder} is not the autoencoder {directory} was trained with (sha256 {found[:12]}..., "
                              f"config.json names {config.autoencoder.sha256[:12]}...); put its own autoencoder back "
                              f"or retrain")
    return autoencoder
