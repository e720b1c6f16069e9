"""Latent models: a TextToImageModel that denoises a frozen autoencoder's latents. The conversions
where SD3's pipelines put them; the folder (autoencoder/ beside model.safetensors, named by its
fingerprint) and its errors; training on sampled latents; sample, img2img and inpaint through the
same calls (the mask at latent size as diffusers' SD3 inpaint pipeline makes it, the kept pixels
pasted back exactly); the trace decoded; train.py --latent end to end, resumed bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_inpaint import StableDiffusion3InpaintPipeline
from PIL import Image

import sample
import train
from minidiff.autoencoder import Autoencoder, AutoencoderConfig, fingerprint, fit_latent_factors, from_latents, \
    to_latents
from minidiff.tools.shapes import Shapes
from minidiff.tools.pictures import tensor_to_pil
from minidiff.model import TextToImageModel
from minidiff import MiniDiffusionPipeline
from minidiff.tools.checkpoint import CheckpointError, load_model, read_safetensors, save_autoencoder, save_model
from minidiff.tools.cli import run
from minidiff.tools.trainer import CACHE_LATENTS, Trainer, latest_checkpoint
from minidiff.training import TrainState, batch_indices, build_model

from conftest import tiny_train_config, tiny_train_flags

SIZE = 32  # pixels; the tiny autoencoder (3 levels, f = 4) makes 8 x 8 x 4 latents


def tiny_autoencoder(seed: int = 0, **overrides) -> Autoencoder:
    torch.manual_seed(seed)
    config = AutoencoderConfig(**{"block_out_channels": (8, 8, 8), "norm_groups": 4, "image_size": SIZE, **overrides})
    autoencoder = Autoencoder(config).eval()
    fit_latent_factors(autoencoder, pictures(16))
    return autoencoder


def pictures(count: int, seed: int = 0) -> torch.Tensor:
    data = Shapes(image_size=SIZE, seed=seed)
    return torch.stack([data[i][0] for i in range(count)])


def latent_config(out="unused", **overrides):
    return tiny_train_config(out, **{"image_size": SIZE, "latent": True, **overrides})


def latent_model(autoencoder=None, **overrides) -> TextToImageModel:
    config = latent_config(**overrides)
    return build_model(config, Shapes(SIZE).captions(), autoencoder or tiny_autoencoder()).eval()


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the model -------------------------------------------------------------------------------
@torch.no_grad()
def test_conversions_are_the_autoencoders_where_sd3_puts_them():
    model = latent_model()
    vae, images = model.vae, pictures(3)
    assert model.sample_shape == (4, 8, 8) and model.config.image_size == SIZE
    latents = model.to_latents(images, generator(1))
    assert latents.shape == (3, *model.sample_shape)
    assert torch.equal(latents, to_latents(vae, images, generator(1)))  # sampled: (z - shift) * scale
    z = vae.encode(images).latent_dist.sample(generator(1))
    assert torch.equal(latents, (z - vae.config.shift_factor) * vae.config.scaling_factor)
    assert not torch.equal(latents, to_latents(vae, images, generator(2)))
    assert torch.equal(model.from_latents(latents), vae.decode(latents / vae.config.scaling_factor
                                                               + vae.config.shift_factor).sample)
    assert torch.equal(model.from_latents(latents), from_latents(vae, latents))


def test_the_autoencoder_is_beside_the_trained_networks_not_among_them():
    model = latent_model()
    assert not any(name.startswith("vae") for name in model.state_dict())
    assert all(p.requires_grad for p in model.parameters())  # only what diffusion trains
    assert not any(p.requires_grad for p in model.vae.parameters())
    model.to(torch.float64)  # moving the model moves its autoencoder
    assert next(model.vae.parameters()).dtype == torch.float64


def test_a_model_with_another_or_no_autoencoder_is_refused():
    autoencoder = tiny_autoencoder()
    model = latent_model(autoencoder)
    assert model.config.autoencoder.sha256 == fingerprint(autoencoder)
    with pytest.raises(ValueError, match="needs the autoencoder it was trained with"):
        TextToImageModel(model.config)
    with pytest.raises(ValueError, match="not the one the model was trained with"):
        TextToImageModel(model.config, tiny_autoencoder(seed=1))
    with pytest.raises(ValueError, match="not divisible by the autoencoder's down factor 4"):
        latent_config(image_size=34).backbone_config(autoencoder.config)


def test_save_and_load_the_folder(tmp_path):
    model = latent_model()
    pipeline = MiniDiffusionPipeline(model, device="cpu")
    for name, save, load in (("pipeline", pipeline.save_pretrained,
                              lambda folder: MiniDiffusionPipeline.from_pretrained(folder, device="cpu").model),
                             ("tools", lambda folder: save_model(folder, model), load_model)):
        save(tmp_path / name)
        assert sorted(p.name for p in (tmp_path / name / "autoencoder").iterdir()) == ["config.json",
                                                                                       "model.safetensors"]
        recorded = json.loads((tmp_path / name / "config.json").read_text())["autoencoder"]
        assert recorded == {"sha256": fingerprint(model.vae), "down_factor": 4}
        assert not any(k.startswith("vae") for k in read_safetensors(tmp_path / name / "model.safetensors"))
        loaded = load(tmp_path / name)
        assert fingerprint(loaded.vae) == fingerprint(model.vae) and loaded.config == model.config
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_broken_latent_folders_are_one_clear_error(tmp_path):
    model = latent_model()
    save_model(tmp_path / "model", model)
    folder = tmp_path / "model" / "autoencoder"
    save_autoencoder(tmp_path / "other", tiny_autoencoder(seed=1))

    shutil.move(folder, tmp_path / "kept")
    with pytest.raises(CheckpointError, match="is a latent model but .*autoencoder is missing"):
        load_model(tmp_path / "model")
    shutil.copytree(tmp_path / "other", folder)  # another autoencoder of the same shapes
    with pytest.raises(CheckpointError, match="is not the autoencoder .* was trained with"):
        load_model(tmp_path / "model")
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "kept", folder)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(tmp_path / "model")


# ---- training ----------------------------------------------------------------------------------
def test_training_noises_sampled_latents_from_the_run_generator():
    config = latent_config()
    state = TrainState(config, Shapes(SIZE).captions(), autoencoder=tiny_autoencoder())
    images = pictures(4)
    expected_generator = torch.Generator()
    expected_generator.set_state(state.generator.get_state())
    latents = state.encode(images)
    assert torch.equal(latents, state.model.to_latents(images, expected_generator))  # the run's generator, sampled
    assert torch.equal(state.generator.get_state(), expected_generator.get_state())
    mean = (state.model.vae.encode(images).latent_dist.mode() - state.model.vae.config.shift_factor) \
        * state.model.vae.config.scaling_factor
    assert not torch.allclose(latents, mean)  # not the posterior's mean
    loss, _ = state.train_step(images, ["a red circle"] * 4)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    pixel_state = TrainState(tiny_train_config("unused"), Shapes(16).captions())
    assert pixel_state.encode(images) is images


# ---- the latent cache (train.py --cache-latents) ---------------------------------------------
def cached_trainer(out="unused", pool=8, autoencoder=None, **overrides) -> Trainer:
    return Trainer(latent_config(out, cache_latents=pool, **overrides), Shapes(SIZE),
                   autoencoder=autoencoder or tiny_autoencoder())


def test_cached_latents_are_the_pools_q_z_given_x_sampled_with_the_run_generator(monkeypatch):
    trainer = cached_trainer(pool=8, renderer="pil")  # the pictures Shapes[i] draws, as pictures() takes them
    vae = trainer.model.vae
    posterior = vae.encode(pictures(8)).latent_dist  # the pool: the data's first 8 pictures, encoded once
    assert torch.allclose(trainer.latent_cache.moments, torch.cat([posterior.mean, posterior.logvar], 1), atol=1e-5)
    expected_captions = [Shapes(SIZE)[i][1] for i in (6, 7, 0, 1)]
    monkeypatch.setattr(Shapes, "__getitem__", lambda *args: pytest.fail("a cached run draws no pictures"))
    moments, captions = trainer.load_batch(range(6, 10))  # the pool's pictures 6, 7, 0, 1
    assert captions == expected_captions
    assert torch.equal(moments, trainer.latent_cache.moments[[6, 7, 0, 1]])
    expected_generator = generator(0)
    expected_generator.set_state(trainer.generator.get_state())
    latents = trainer.encode(moments)  # a fresh z ~ q(z|x), as to_latents draws it from the pictures
    monkeypatch.undo()
    expected = to_latents(vae, pictures(8)[[6, 7, 0, 1]], expected_generator)
    assert torch.allclose(latents, expected, atol=1e-5)
    assert torch.equal(trainer.generator.get_state(), expected_generator.get_state())
    assert not torch.allclose(latents, trainer.encode(moments))  # drawn again at the next step
    loss, _ = trainer.train_step(moments, captions)
    assert torch.isfinite(loss).all()


@torch.no_grad()
def test_cached_latents_of_each_rank_are_its_slice_of_the_global_batch():
    trainer = cached_trainer(pool=8)
    start = trainer.generator.get_state()
    whole = trainer.encode(trainer.load_batch(range(8))[0])  # one process, batch 8
    slices = []
    for rank in range(2):  # two processes, batch 4 each, the same generator state
        trainer.generator.set_state(start)
        slices.append(trainer.encode(trainer.load_batch(batch_indices(0, 4, rank, 2))[0], shard=(rank, 2)))
    assert torch.equal(torch.cat(slices), whole)


def test_a_cached_run_resumes_bit_for_bit_with_its_pool_rebuilt(tmp_path):
    autoencoder = tiny_autoencoder()
    reference = cached_trainer(tmp_path / "ref", pool=6, autoencoder=autoencoder, checkpoint_every=2)
    reference.train()
    first = cached_trainer(tmp_path / "run", pool=6, autoencoder=autoencoder, checkpoint_every=2, steps=2)
    first.train()
    resumed = cached_trainer(tmp_path / "run", pool=6, autoencoder=autoencoder, checkpoint_every=2)
    resumed.load_checkpoint(latest_checkpoint(tmp_path / "run"))
    resumed.train()
    assert resumed.step == reference.step == 4
    ref, run_ = (read_safetensors(tmp_path / name / "model.safetensors") for name in ("ref", "run"))
    assert all(torch.equal(ref[k], run_[k]) for k in ref)


def test_train_py_cache_latents_flag(tmp_path, capsys):
    assert train.build_config(train.parse_args(["--latent", "--cache-latents"])).cache_latents == CACHE_LATENTS
    assert train.build_config(train.parse_args(["--latent", "--cache-latents", "64"])).cache_latents == 64
    check_error(train.main, ["--out", str(tmp_path / "pixels"), "--cache-latents", *tiny_train_flags()],
                "--cache-latents keeps an autoencoder's latents: add --latent", capsys, tmp_path / "pixels")
    check_error(train.main, ["--out", str(tmp_path / "pixels"), "--latent", "--cache-latents", "-1", *FLAGS],
                "--cache-latents must be 0 or more", capsys, tmp_path / "pixels")


# ---- sample, img2img, inpaint ----------------------------------------------------------------
@pytest.fixture(scope="module")
def latent_pipe():
    return MiniDiffusionPipeline(latent_model(objective="flow"), device="cpu")


def test_sample_and_img2img_through_the_same_calls(latent_pipe):
    out = latent_pipe.sample(["a red circle", "a blue square"], num_inference_steps=3, generator=generator(0))
    assert [image.size for image in out.images] == [(SIZE, SIZE)] * 2
    image = tensor_to_pil(pictures(1))[0]
    edited = latent_pipe.img2img("a blue square", image, strength=0.6, num_inference_steps=3, generator=generator(0))
    assert edited.images[0].size == (SIZE, SIZE)
    again = latent_pipe.img2img("a blue square", image, strength=0.6, num_inference_steps=3, generator=generator(0))
    assert np.array_equal(np.asarray(edited.images[0]), np.asarray(again.images[0]))


def sd3_mask_latents(mask_image: Image.Image, latent_size: int) -> torch.Tensor:
    """diffusers' own steps: the SD3 inpaint pipeline's mask_processor (as its __init__ builds it: resize,
    binarize) and its prepare_mask_latents (interpolate to the latents' size), run on a stand-in
    pipeline that holds only the vae's factor (the masked image given as 16-channel latents, left unused)."""
    factor = SIZE // latent_size
    mask_processor = VaeImageProcessor(vae_scale_factor=factor, vae_latent_channels=4, do_normalize=False,
                                       do_binarize=True, do_convert_grayscale=True)
    mask = mask_processor.preprocess(mask_image, height=SIZE, width=SIZE)
    pipe = SimpleNamespace(vae_scale_factor=factor, vae=SimpleNamespace(config=SimpleNamespace(shift_factor=0.0,
                                                                                             scaling_factor=1.0)))
    unused = torch.zeros(1, 16, latent_size, latent_size)
    mask, _ = StableDiffusion3InpaintPipeline.prepare_mask_latents(pipe, mask, unused, 1, 1, SIZE, SIZE, torch.float32,
                                                                   "cpu", None, False)
    return mask


def test_inpaint_masks_latents_as_sd3_and_pastes_the_kept_pixels_back(latent_pipe, monkeypatch):
    image = tensor_to_pil(pictures(1, seed=3))[0]
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (13, 5, 27, 22))  # not on the latent grid: nearest decides each latent cell
    seen = []
    repaint = latent_pipe.repaint
    monkeypatch.setattr(latent_pipe, "repaint", lambda *args: seen.append(args[4]) or repaint(*args))
    out = latent_pipe.inpaint("a green square", image, mask, num_inference_steps=3, generator=generator(0))
    expected = sd3_mask_latents(mask, 8)
    assert seen[0].shape == (1, 1, 8, 8) and torch.equal(seen[0].float(), expected)
    result, original, replaced = np.asarray(out.images[0]), np.asarray(image), np.asarray(mask) >= 128
    assert np.array_equal(result[~replaced], original[~replaced])  # exactly, though the decoder is lossy
    assert not np.array_equal(result[replaced], original[replaced])
    untouched = latent_pipe.inpaint("a green square", image, mask, strength=0.0, generator=generator(0))
    assert np.array_equal(np.asarray(untouched.images[0])[~replaced], original[~replaced])


def test_the_trace_decodes_x_t_and_predicted_x0_through_the_decoder(latent_pipe):
    steps = []
    out = latent_pipe.sample("a red circle", num_inference_steps=3, generator=generator(0), capture_steps=[0, 2],
                             callback=steps.append)
    assert steps[1]["x"].shape == (1, 4, 8, 8)  # the callback sees latents
    record = out.trace[1]
    for key, latent in (("x_t", steps[1]["x"]), ("pred_x0", steps[1]["denoised"])):
        decoded = tensor_to_pil(latent_pipe.model.from_latents(latent))[0]
        assert np.array_equal(np.asarray(record[key][0]), np.asarray(decoded)), key
    assert record["noise_pred"] is None  # a latent model's output is no picture
    assert out.trace[0]["x_t"][0].size == (SIZE, SIZE)


# ---- train.py --latent, sample.py, and their errors -------------------------------------------
FLAGS = tiny_train_flags(image_size=SIZE, steps=None, checkpoint_every=None)


@pytest.fixture(scope="module")
def autoencoder_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ae") / "autoencoder"
    save_autoencoder(folder, tiny_autoencoder())
    return folder


@pytest.mark.slow
def test_train_latent_trains_the_autoencoder_first_and_resumes_bit_for_bit(tmp_path, autoencoder_dir):
    assert run(train.main, ["--out", str(tmp_path / "fresh"), "--latent", "--autoencoder-steps", "2", "--steps", "2",
                            *FLAGS]) == 0
    assert load_model(tmp_path / "fresh").vae.config.block_out_channels == AutoencoderConfig().block_out_channels

    given = ["--autoencoder", str(autoencoder_dir), *FLAGS, "--checkpoint-every", "2"]
    assert run(train.main, ["--out", str(tmp_path / "ref"), "--steps", "4", *given]) == 0
    assert run(train.main, ["--out", str(tmp_path / "run"), "--steps", "2", *given]) == 0
    assert run(train.main, ["--out", str(tmp_path / "run"), "--resume", "--steps", "4"]) == 0
    ref, resumed = (read_safetensors(tmp_path / name / "model.safetensors") for name in ("ref", "run"))
    assert ref.keys() == resumed.keys() and all(torch.equal(ref[k], resumed[k]) for k in ref)
    assert fingerprint(load_model(tmp_path / "run").vae) == fingerprint(tiny_autoencoder())

    assert run(train.main, ["--out", str(tmp_path / "f2"), "--latent", "--autoencoder-down-factor", "2",
                            "--autoencoder-steps", "2", "--steps", "2", *FLAGS]) == 0
    f2 = load_model(tmp_path / "f2")
    assert f2.vae.config.block_out_channels == (16, 32) and f2.config.backbone.image_size == SIZE // 2
    assert f2.config.image_size == SIZE
    assert MiniDiffusionPipeline(f2).sample("a red circle", num_inference_steps=2).images[0].size == (SIZE, SIZE)

    out = tmp_path / "picture.png"
    assert run(sample.main, ["--model", str(tmp_path / "run"), "--prompt", "a red circle", "--steps", "2", "--out",
                             str(out), "--device", "cpu"]) == 0
    assert Image.open(out).size[0] >= SIZE


def check_error(main, argv, expect, capsys, untouched: Path | None = None):
    before = sorted(untouched.rglob("*")) if untouched and untouched.exists() else None
    assert run(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    if untouched is not None:
        assert (sorted(untouched.rglob("*")) if untouched.exists() else None) == before


@pytest.mark.slow
def test_bad_latent_inputs_are_one_clear_line_and_exit_2(tmp_path, autoencoder_dir, capsys):
    broken = tmp_path / "broken-ae"
    shutil.copytree(autoencoder_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 20)
    new = tmp_path / "new"
    check_error(train.main, ["--out", str(new), "--autoencoder", str(broken), *FLAGS], "not a readable safetensors",
                capsys, new)
    assert not new.exists()
    (broken / "config.json").write_text(json.dumps({"format": "minidiff", "format_version": 1}))
    check_error(train.main, ["--out", str(new), "--autoencoder", str(broken), *FLAGS], "is not a minidiff autoencoder",
                capsys, new)
    check_error(train.main, ["--out", str(new), "--latent", *tiny_train_flags(image_size=30)],
                "--image-size 30 is not divisible by the autoencoder's down factor 4", capsys, new)
    check_error(train.main, ["--out", str(new), "--autoencoder", str(autoencoder_dir), *tiny_train_flags(image_size=36)],
                "on 9 px latents", capsys, new)
    check_error(train.main, ["--out", str(new), "--latent", "--autoencoder-down-factor", "3", *FLAGS],
                "--autoencoder-down-factor: the down factor must be a power of 2 from 2 up, got 3", capsys, new)
    check_error(train.main, ["--out", str(new), "--latent", "--autoencoder-down-factor", "8",
                             *tiny_train_flags(image_size=20)],
                "--image-size 20 is not divisible by the autoencoder's down factor 8", capsys, new)
    check_error(train.main, ["--out", str(new), "--autoencoder", str(autoencoder_dir), "--autoencoder-down-factor", "2",
                             *FLAGS], "brings its own, with its own factor: drop one of them", capsys, new)
    check_error(train.main, ["--out", str(new), "--autoencoder-down-factor", "2", *FLAGS],
                "--autoencoder-down-factor shapes a latent run's autoencoder: add --latent", capsys, new)
    assert not new.exists()

    model = tmp_path / "model"
    save_model(model, latent_model())
    argv = ["--model", str(model), "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "out.png"),
            "--device", "cpu"]
    shutil.rmtree(model / "autoencoder")
    check_error(sample.main, argv, "is a latent model but", capsys, model)
    save_autoencoder(model / "autoencoder", tiny_autoencoder(seed=1))  # another autoencoder of the same shapes
    check_error(sample.main, argv, "is not the autoencoder", capsys, model)
    assert not (tmp_path / "out.png").exists()
