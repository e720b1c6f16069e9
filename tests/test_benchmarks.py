"""The pieces the benchmarks stand on: the diffusers baseline is the same size as minidiff's
UNet, trains and samples through minidiff's own code, and the report helpers behave.
(The benchmarks themselves are timed and run by hand, never here.)"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import (BaselineModel, DiffusersUNet, TrainState, alternating_times, build_model,
                               count_parameters, preset_config, replace_section)
from minidiff import MiniDiffusionPipeline
from minidiff.training import diffusion_loss
from minidiff.unet import UNet, UNetConfig

from conftest import tiny_train_config, tiny_unet_config


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_baseline_unet_is_within_ten_percent_of_minidiff(preset):
    config = preset_config(preset)
    unet = UNetConfig(image_size=config.image_size, base_channels=config.base_channels,
                      channel_mults=config.channel_mults, attention_levels=config.attention_levels,
                      context_dim=config.text_dim)
    ours, theirs = count_parameters(UNet(unet)), count_parameters(DiffusersUNet(unet))
    assert abs(theirs / ours - 1) <= 0.10


def tiny_config(**overrides):
    """The tests' tiny run (conftest.py) with the CPU preset's objective, batches of 2."""
    return tiny_train_config("unused", **{"objective": preset_config("cpu").objective, "batch_size": 2, **overrides})


def test_baseline_trains_with_minidiffs_loss_and_samples_with_its_pipeline():
    config = tiny_config()
    model = build_model(config, "diffusers")
    assert isinstance(model, BaselineModel) and isinstance(model.unet, DiffusersUNet)
    reference = build_model(config, "minidiff")  # same seed: the text encoders start equal
    for a, b in zip(model.text_encoder.parameters(), reference.text_encoder.parameters()):
        assert torch.equal(a, b)
    clip = tiny_config(text_clip_init=True)  # and with CLIP's init (train.py --text-clip-init)
    for a, b in zip(build_model(clip, "diffusers").text_encoder.parameters(),
                    build_model(clip, "minidiff").text_encoder.parameters()):
        assert torch.equal(a, b)

    state = TrainState(model, config)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    per_sample, _ = diffusion_loss(model, model.tokenizer, state.objective, images, ["a red circle", "a blue square"],
                                   torch.Generator().manual_seed(0), 0.0, torch.device("cpu"))
    per_sample.mean().backward()
    assert model.unet.net.conv_in.weight.grad.abs().sum() > 0
    assert model.text_encoder.token_embedding.weight.grad.abs().sum() > 0  # gradients reach the text encoder
    before = model.unet.net.conv_in.weight.detach().clone()
    state.train_step(images, ["a red circle", "a blue square"])
    assert not torch.equal(before, model.unet.net.conv_in.weight) and state.step == 1

    pipe = MiniDiffusionPipeline(model, device="cpu")
    out = pipe.sample(["a red circle", "a blue square"], num_inference_steps=2, output_type="pt",
                      generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 2 and out.images[0].shape == (3, 16, 16)
    # the prompt reaches the diffusers UNet: the same noise (same seed, one image) and another prompt
    same_noise = [pipe.sample(prompt, num_inference_steps=2, output_type="pt", guidance_scale=1.0,
                              generator=torch.Generator().manual_seed(0)).images[0]
                  for prompt in ("a red circle", "a red circle", "a blue square")]
    assert torch.equal(same_noise[0], same_noise[1]) and not torch.allclose(same_noise[0], same_noise[2])


def test_baseline_ignores_padded_text_tokens():
    torch.manual_seed(0)
    unet = DiffusersUNet(tiny_unet_config(context_dim=8)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
    context, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    mask[:, 3:] = False
    other = context.clone()
    other[:, 3:] = torch.randn(2, 2, 8)
    with torch.no_grad():
        out = unet(x, t, context, mask)
        torch.testing.assert_close(out, unet(x, t, other, mask))
        assert not torch.allclose(out, unet(x, t, torch.randn(2, 5, 8), mask))  # the real tokens do matter


def test_alternating_times_flips_the_order_every_round():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = alternating_times(fns, repeats=3, warmup=0, prepare={"b": lambda: calls.append("prep-b")})
    assert calls == ["a", "prep-b", "b", "prep-b", "b", "a", "a", "prep-b", "b"]
    assert len(times["a"]) == len(times["b"]) == 3


def test_replace_section_keeps_the_rest_of_the_file(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nintro\n")
    replace_section(path, "one", "first")
    replace_section(path, "two", "second")
    replace_section(path, "one", "first, again")
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n")
    assert "first, again" in text and "first\n" not in text and text.count("<!-- begin one -->") == 1
    assert text.index("first, again") < text.index("second")  # a rewritten section keeps its place


def test_every_published_block_is_a_numbered_section_or_runs_under_one():
    """BENCHMARKS.md's script-written blocks are either a numbered section of their own ("## 1. ...")
    or a subsection ("### ...") under the numbered section before them, never an unnumbered "##"."""
    import re

    from benchmarks.common import BENCHMARKS_MD, Report
    text = BENCHMARKS_MD.read_text()
    blocks = re.findall(r"<!-- begin (\S+) -->\n(.*)\n", text)
    assert len(blocks) >= 4
    for name, heading in blocks:
        assert re.match(r"## \d+\. |### ", heading), f"block {name} starts with {heading!r}"
        if heading.startswith("### "):
            assert re.findall(r"^## .*", text[:text.index(f"<!-- begin {name} -->")], re.M)[-1][3].isdigit()
    assert Report("x", "The runs", 1, level=3).markdown("body").startswith("### The runs\n")


def test_results_go_to_scratch_unless_published(tmp_path, monkeypatch):
    """A quick check must not overwrite the committed benchmarks/results/ or BENCHMARKS.md."""
    from benchmarks import common

    paths = {"RESULTS": tmp_path / "results", "SCRATCH": tmp_path / "scratch", "BENCHMARKS_MD": tmp_path / "B.md"}
    for name, path in paths.items():
        monkeypatch.setattr(common, name, path)
    report = common.Report("train_speed", "1. Throughput", threads=1)
    report.write("quick", {"x": 1})
    assert (paths["SCRATCH"] / "train_speed.json").exists() and (paths["SCRATCH"] / "train_speed.md").exists()
    assert not paths["RESULTS"].exists() and not paths["BENCHMARKS_MD"].exists()
    report.write("published", {"x": 2}, publish=True)
    assert (paths["RESULTS"] / "train_speed.json").exists()
    assert "published" in paths["BENCHMARKS_MD"].read_text()


# Each benchmark's main with the smallest settings it takes: seconds, not minutes.
TINY_RUNS = {
    "train_speed": ["--presets", "cpu", "--batch-size", "2", "--repeats", "1", "--steps", "1", "--warmup", "0",
                    "--batches", "1"],
    "time_to_quality": ["--minutes", "0.002", "--eval-every", "0.002", "--samples-per-prompt", "1", "--eval-steps", "1"],
    "steps_quality": ["--model", "{model}", "--samplers", "ddim", "--steps", "1", "--guidance-scales", "1",
                      "--samples-per-prompt", "1"],
    "profile_step": ["--batch-size", "2", "--profile-steps", "1", "--top", "3", "--repeats", "1", "--steps", "1",
                     "--sanity-steps", "1"],
}


def committed_results() -> dict:
    """benchmarks/results/ and BENCHMARKS.md as they are in this checkout: path -> (size, mtime)."""
    from benchmarks import common

    files = [common.ROOT / "BENCHMARKS.md", *sorted((common.ROOT / "benchmarks" / "results").rglob("*"))]
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()}


@pytest.fixture
def run_benchmark(tmp_path, monkeypatch, tiny_model_dir):
    """run_benchmark(name, *flags): the benchmark's main with TINY_RUNS' settings, its folders moved
    under tmp_path (results/, scratch/, BENCHMARKS.md); -> that folder. The committed ones must not
    change meanwhile, whatever path a benchmark writes to."""
    import importlib

    from benchmarks import common
    from minidiff import MiniDiffusionPipeline

    for name, path in (("RESULTS", "results"), ("SCRATCH", "scratch"), ("BENCHMARKS_MD", "BENCHMARKS.md")):
        monkeypatch.setattr(common, name, tmp_path / path)
    (tmp_path / "BENCHMARKS.md").write_text("# Benchmarks\n")
    monkeypatch.setattr(MiniDiffusionPipeline, "default_num_inference_steps", 2)  # steps_quality's guidance rows
    monkeypatch.setattr("os.cpu_count", lambda: 1)  # profile_step: no thread-count variants (seconds each)

    def run(name, *flags):
        argv = [a.replace("{model}", str(tiny_model_dir)) for a in TINY_RUNS[name]] + ["--threads", "1", *flags]
        monkeypatch.setattr("sys.argv", [f"benchmarks/{name}.py", *argv])
        before = committed_results()
        assert importlib.import_module(f"benchmarks.{name}").main(argv) == 0
        assert committed_results() == before
        return tmp_path

    threads = torch.get_num_threads()
    yield run
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY_RUNS)
def test_every_benchmark_writes_to_scratch_and_publishes_only_when_asked(name, run_benchmark):
    """A quick check must leave the committed benchmarks/results/ and BENCHMARKS.md alone: without
    --publish a benchmark writes its report into the scratch folder (runs/benchmarks/) only; with
    --publish into results/ and its section of BENCHMARKS.md."""
    folder = run_benchmark(name)
    written = {p.name for p in (folder / "scratch").iterdir()}
    assert {f"{name}.md", f"{name}.json"} <= written
    assert not (folder / "results").exists() or not any((folder / "results").iterdir())
    assert (folder / "BENCHMARKS.md").read_text() == "# Benchmarks\n"
    run_benchmark(name, "--publish")  # and with --publish, into the committed places (here: under tmp_path)
    assert {f"{name}.md", f"{name}.json"} <= {p.name for p in (folder / "results").iterdir()}
    assert f"<!-- begin {name} -->" in (folder / "BENCHMARKS.md").read_text()


# ---- the levers of benchmarks/levers.py --------------------------------------------------
def test_levers_variant_splits_train_config_fields_from_levers():
    from benchmarks.common import parse_variant
    from benchmarks.levers import LEVERS

    name, changes, levers = parse_variant("x:base_channels=24,steps=10,attention_levels=2/1,snr_gamma=5,prediction=v",
                                          LEVERS)
    assert name == "x" and changes == {"base_channels": 24, "steps": 10, "attention_levels": (2, 1), "snr_gamma": 5.0}
    assert levers == {"prediction": "v"}
    with pytest.raises(SystemExit):
        parse_variant("x:no_such_setting=1")


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_stratified_timesteps_put_one_draw_in_each_quantile(objective):
    from benchmarks.levers import stratified
    from minidiff.model import OBJECTIVES

    schedule = OBJECTIVES[objective][1](preset_config("cpu", objective=objective).scheduler_config())
    n = 50  # divides T = 1000: each DDPM quantile is 20 whole timesteps
    t = stratified(schedule.sample_training_timesteps)(n, torch.Generator().manual_seed(0)).double()
    if objective == "flow":  # logit-normal: back to the uniform quantile through the normal CDF
        u = torch.special.ndtr(torch.logit(t / schedule.num_train_timesteps))
    else:
        u = (t + 0.5) / schedule.num_train_timesteps
    counts = torch.bincount((u * n).long().clamp(max=n - 1), minlength=n)
    assert counts.tolist() == [1] * n  # independent draws would leave about a third of the bins empty


def test_v_prediction_turns_a_perfect_v_into_the_true_noise_and_keeps_the_weight_names():
    from benchmarks.levers import predict_v
    from minidiff.scheduler import NoiseSchedule

    schedule = NoiseSchedule()
    t = torch.tensor([0, 300, 999])
    x0, eps = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    x_t = schedule.add_noise(x0, eps, t)
    a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0  # Salimans & Ho 2022

    class Oracle(torch.nn.Module):  # a network that knows v
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, timesteps, context, mask):
            return v + self.weight

    unet = Oracle()
    names = list(unet.state_dict())
    predict_v(unet, schedule.alphas_cumprod)
    assert torch.allclose(unet(x_t, t, None, None), eps, atol=1e-5)
    unet.return_v = True  # training: the network's own output, v
    assert torch.equal(unet(x_t, t, None, None), v)
    assert list(unet.state_dict()) == names  # the EMA and checkpoints see the same weights


@pytest.mark.slow
def test_time_to_quality_trains_a_diffusers_variant_with_its_recipe(run_benchmark):
    """--diffusers-variant: diffusers' UNet with TrainConfig fields and the AdamW/constant-rate options changed."""
    import json

    folder = run_benchmark("time_to_quality", "--runs", "minidiff", "--diffusers-variant",
                           "dd-lr3e-4:objective=ddpm,lr=3e-4,snr_gamma=5,weight_decay=0.01,lr_schedule=constant",
                           "--name", "ttq-variant")
    report = (folder / "scratch" / "ttq-variant.md").read_text()
    assert "dd-lr3e-4: diffusers UNet" in report
    for setting in ("objective=ddpm", "lr=0.0003", "snr_gamma=5.0", "weight_decay=0.01", "lr_schedule=constant"):
        assert setting in report
    assert "dd-lr3e-4" in json.loads((folder / "scratch" / "ttq-variant.json").read_text())


@pytest.mark.slow
def test_time_to_quality_counts_a_latent_runs_autoencoder_and_cache_in_its_clock(run_benchmark, monkeypatch):
    """A latent variant trains its autoencoder and fills its latent cache on the run's clock, through
    train.py's Trainer; both single- and two-object prompts are scored."""
    import json

    from benchmarks import time_to_quality

    runs = []
    original = time_to_quality.Run.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        runs.append(self)

    monkeypatch.setattr(time_to_quality.Run, "__init__", record)
    folder = run_benchmark("time_to_quality", "--runs", "--variant",
                           "lat:image_size=32,latent=true,autoencoder_steps=2,cache_latents=8,batch_size=2,"
                           "two_object_fraction=0.3", "--name", "ttq-latent")
    (run,) = runs
    assert run.state.latent_cache.moments.shape == (8, 8, 8, 8) and run.state.step >= 0
    point = json.loads((folder / "scratch" / "ttq-latent.json").read_text())["lat"]["points"][0]
    assert point["minutes"] >= run.setup_seconds / 60 > 0 and point["two_object"] is not None
    assert "Setup minutes" in (folder / "scratch" / "ttq-latent.md").read_text()
