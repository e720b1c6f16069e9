"""SD3.5 at its published size through the bridge (issue 25): parameter counts, and every memory
mode run on the full-size architecture with random weights.

    PYTHONPATH=. python -m benchmarks.sd3_full_size counts
    PYTHONPATH=. python -m benchmarks.sd3_full_size build --out /tmp/sd35m [--no-t5] [--tiny]
    PYTHONPATH=. python -m benchmarks.sd3_full_size cpu --folder /tmp/sd35m --modes drop_t5 bf16 int8+drop_t5 ...
    PYTHONPATH=. python -m benchmarks.sd3_full_size bf16-check --folder /tmp/sd35m
    PYTHONPATH=. python -m benchmarks.sd3_full_size gpu --out /tmp/sd35-gpu      # needs a CUDA GPU
    PYTHONPATH=. python -m benchmarks.sd3_full_size all --tiny --out /tmp/tiny    # everything, tiny (the test)

`build` writes a StableDiffusion3Pipeline folder with the published configurations of
stabilityai/stable-diffusion-3.5-medium (written out below, with where each came from), random
weights in bf16 and tokenizers of the real vocabulary sizes built locally (no download), one
component at a time with save_pretrained (so that building never holds the whole pipeline).
`cpu` loads it through `SD3Bridge.from_pretrained(folder, device="cpu", ...)`, the normal loading
path, once per mode in a fresh subprocess, and runs `sample` (N steps), `img2img` (2N steps at
strength 0.6) and `inpaint` (N steps, the right half masked): load seconds, seconds per step,
peak resident memory (VmHWM), whether inpainting kept the unmasked half exactly, and for int8 how
many of the transformer's Linear layers were really quantised. Modes: `default` (the bridge's
defaults on this machine), `float32`, `bf16`, `drop_t5`, `int8`, and combinations with `+`
(`int8+drop_t5`). `bf16-check` runs one forward pass of the transformer in float32 and in bf16 on
the same weights and inputs and reports the relative error. `gpu` is the prepared GPU table:
Medium and Large at 1024 x 1024, default steps, for default, drop_t5, model and sequential
offload, int8, nf4 and torch.compile (peak GPU memory by torch.cuda.max_memory_allocated, s/image).
Large is never built on the CPU here: `counts` builds its components on the meta device.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minidiff.tools.cli import ArgumentParser, UsageError, run

# --- the published configurations -----------------------------------------------------------------
# Transformer, stabilityai/stable-diffusion-3.5-medium transformer/config.json (snapshot b940f670f0ed,
# read here from copies that name that snapshot: huggingface.co/Prgckwb/trpfrog-sd3.5-medium,
# transformer/config.json); the same values are what diffusers' scripts/convert_sd3_to_diffusers.py
# derives from the original checkpoint (num_attention_heads = num_layers, pos_embed_max_size 384 for
# "sd3.5 2b", attn2 in layers 0-12, qk_norm "rms_norm").
MEDIUM_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                          attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                          caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                          dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# stabilityai/stable-diffusion-3.5-large transformer/config.json ("SD3.5 Large Public Release",
# read from huggingface.co/frankjoshua/stable-diffusion-3.5-large, a copy of that commit): no
# dual_attention_layers key (the default, none), pos_embed_max_size 192.
LARGE_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                         attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                         caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                         dual_attention_layers=(), qk_norm="rms_norm")
# text_encoder/config.json (CLIP ViT-L/14 text tower with projection) and text_encoder_2/config.json
# (OpenCLIP ViT-bigG/14), identical in 3.5 Medium and Large (copies naming the snapshots
# stable-diffusion-3.5-medium b940f670f0ed and stable-diffusion-3.5-large ceddf0a7fdf2).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
              bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1280,
              bos_token_id=0, eos_token_id=2, pad_token_id=1)
# text_encoder_3/config.json: T5 v1.1 XXL encoder (same file in Medium and Large).
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
              layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
              decoder_start_token_id=0, tie_word_embeddings=False)
# vae/config.json (the same in Medium and Large).
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16,
           norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
           force_upcast=True, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
SCHEDULER_SHIFT = 3.0  # scheduler/scheduler_config.json: FlowMatchEulerDiscreteScheduler, shift 3.0

# The same structure, shrunk, for --tiny (the test): dual attention in the first layers, QK-norm,
# 16 latent channels, the VAE's factors; real vocabulary sizes for the tokenizers all the same.
TINY_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                        pooled_projection_dim=64, pos_embed_max_size=16, dual_attention_layers=(0, 1),
                        qk_norm="rms_norm")
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, projection_dim=32)
TINY_T5 = dict(d_model=32, d_kv=8, d_ff=37, num_layers=1, num_decoder_layers=1, num_heads=4,
               relative_attention_num_buckets=8)
TINY_VAE = dict(block_out_channels=(8, 8), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=32)

# The announced sizes (Stability AI's release of 22 Oct 2024 and the model cards): the MMDiT(-X)
# transformer alone, without text encoders or VAE.
PUBLISHED = {"medium": 2.5e9, "large": 8.1e9}
PROMPT = "a red circle on a blue square"
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")


# --- building ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def default_dtype(dtype):
    """Build modules directly in `dtype` (random init in bf16: no float32 copy of 8 B parameters)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def component_configs(size: str, with_t5: bool = True) -> dict:
    """{component: (class, config)} for "medium", "large" or "tiny"."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tiny = size == "tiny"
    transformer = {"medium": MEDIUM_TRANSFORMER, "large": LARGE_TRANSFORMER, "tiny": TINY_TRANSFORMER}[size]
    clip_l = {**CLIP_L, **TINY_CLIP} if tiny else CLIP_L
    clip_g = {**CLIP_G, **TINY_CLIP} if tiny else CLIP_G
    t5 = {**T5_XXL, **TINY_T5} if tiny else T5_XXL
    if tiny:  # the joint attention takes T5's width; the pooled projection is the two CLIP projections
        transformer = {**transformer, "joint_attention_dim": t5["d_model"],
                       "pooled_projection_dim": clip_l["projection_dim"] + clip_g["projection_dim"]}
    configs = {
        "transformer": (SD3Transformer2DModel, transformer),
        "text_encoder": (CLIPTextModelWithProjection, CLIPTextConfig(**clip_l)),
        "text_encoder_2": (CLIPTextModelWithProjection, CLIPTextConfig(**clip_g)),
        "vae": (AutoencoderKL, {**VAE, **TINY_VAE} if tiny else VAE),
    }
    if with_t5:
        configs["text_encoder_3"] = (T5EncoderModel, T5Config(**t5))
    return configs


def instantiate(cls, config):
    return cls(config) if not isinstance(config, dict) else cls(**config)


def parameter_counts(size: str) -> dict:
    """Parameters per component, built on the meta device (no memory): `parameters` as PyTorch counts
    them, and `buffers` (the transformer's fixed sin-cos position table is a saved buffer)."""
    import torch
    from accelerate import init_empty_weights

    counts = {}
    for name, (cls, config) in component_configs(size).items():
        with init_empty_weights(include_buffers=True):
            model = instantiate(cls, config)
        counts[name] = {"parameters": sum(p.numel() for p in model.parameters()),
                        "buffers": sum(b.numel() for _, b in model.named_buffers() if b.dtype.is_floating_point),
                        "linear_weights": sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))}
        if name == "transformer":
            attn2 = sum(p.numel() for n, p in model.named_parameters() if ".attn2." in n)
            counts[name]["dual_attention_parameters"] = attn2
        del model
    return counts


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2's and CLIP's `bytes_to_unicode`)."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(extra)) for b in range(256)]


def clip_tokenizer(vocab_size: int = 49408, max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A CLIP byte-level BPE tokenizer with the real vocabulary's size and layout: 256 byte symbols,
    the same with `</w>`, 48,894 merges, then <|startoftext|> (49406) and <|endoftext|> (49407). The
    merges are synthetic (whole prompt words first, then pairs of letters), not OpenAI's."""
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    vocab = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    n_merges = vocab_size - len(vocab) - 2
    merges = []

    def add(a: str, b: str) -> None:
        if a + b not in vocab and len(merges) < n_merges:
            merges.append((a, b))
            vocab[a + b] = len(vocab)

    for word in PROMPT.split() + ["photo", "of", "cat", "dog", "green", "yellow", "triangle"]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            add(parts[0], parts[1])
            parts = [parts[0] + parts[1]] + parts[2:]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("0"), ord("9") + 1)]
    pieces = list(letters)
    for piece in pieces:  # grows while it runs: 2-letter pieces, then 3-letter ones, ...
        if len(merges) >= n_merges:
            break
        for c in letters:
            add(piece, c + "</w>")
            if len(merges) < n_merges and piece + c not in vocab:
                add(piece, c)
                pieces.append(piece + c)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    assert len(vocab) == vocab_size, len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=max_length)


def t5_tokenizer(pieces: int = 32000, extra_ids: int = 100):
    """A T5 unigram tokenizer of the real size: 32,000 sentencepiece pieces (<pad>, </s>, <unk>
    first) and 100 <extra_id_*> tokens = 32,100 tokens, as google/t5-v1_1-xxl's tokenizer; the
    model's embedding has 32,128 rows (rounded up to a multiple of 128). Synthetic pieces."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in dict.fromkeys(PROMPT.split())]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab += [(c, -5.0) for c in letters] + [("▁" + c, -4.0) for c in letters]
    seen = {p for p, _ in vocab}
    frontier = list(letters)
    while len(vocab) < pieces:
        nxt = []
        for piece in frontier:
            for c in letters:
                for candidate in (piece + c, "▁" + piece + c):
                    if len(vocab) < pieces and candidate not in seen:
                        seen.add(candidate)
                        vocab.append((candidate, -6.0 - len(candidate)))
                nxt.append(piece + c)
            if len(vocab) >= pieces:
                break
        frontier = nxt
    return T5Tokenizer(vocab=vocab, extra_ids=extra_ids)


def build(out: Path, size: str = "medium", with_t5: bool = True) -> Path:
    """Write a StableDiffusion3Pipeline folder at `size` ("medium" or "tiny"), random weights in bf16,
    one component at a time; returns the folder. Never "large" on a CPU machine (8 B parameters)."""
    import diffusers
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    if size == "large" and not torch.cuda.is_available():
        raise UsageError("building SD3.5 Large needs about 16 GB (bf16) for its transformer alone; "
                         "use `counts` for its parameter counts on this machine")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__,
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    for name, (cls, config) in component_configs(size, with_t5).items():
        start = time.perf_counter()
        with default_dtype(torch.bfloat16):
            model = instantiate(cls, config)
        model.to(torch.bfloat16)  # the few modules that build in float32 whatever the default
        model.save_pretrained(out / name)
        library = "diffusers" if cls.__module__.startswith("diffusers") else "transformers"
        index[name] = [library, cls.__name__]
        print(f"built {name}: {sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M parameters "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        del model
        gc.collect()
    if not with_t5:
        index["text_encoder_3"] = [None, None]
    tokenizers = {"tokenizer": clip_tokenizer()}
    tokenizers["tokenizer_2"] = copy.deepcopy(tokenizers["tokenizer"])
    tokenizers["tokenizer_2"].pad_token = "!"  # OpenCLIP bigG's tokenizer pads with "!", CLIP-L's with <|endoftext|>
    if with_t5:
        tokenizers["tokenizer_3"] = t5_tokenizer()
    else:
        index["tokenizer_3"] = [None, None]
    for name, tokenizer in tokenizers.items():
        tokenizer.save_pretrained(out / name)
        index[name] = ["transformers", type(tokenizer).__name__]
    FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT).save_pretrained(out / "scheduler")
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


# --- one mode, in its own process -------------------------------------------------------------------

MODE_PARTS = {"default": {}, "float32": {"dtype": "float32"}, "bf16": {"dtype": "bfloat16"},
              "drop_t5": {"drop_t5": True}, "int8": {"quantization": "int8"}}


def mode_options(mode: str) -> dict:
    """`SD3Bridge.from_pretrained` keywords for a mode name such as "int8+drop_t5"."""
    options = {}
    for part in mode.split("+"):
        if part not in MODE_PARTS:
            raise UsageError(f"unknown mode {part!r} in {mode!r}: modes are {', '.join(MODE_PARTS)}, "
                             "combined with + (e.g. int8+drop_t5)")
        options.update(MODE_PARTS[part])
    return options


def memory_status() -> dict:
    """VmRSS, VmHWM (its peak), RssAnon and RssFile of this process, in bytes (Linux)."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def tensor_bytes(t) -> int:
    """Bytes a tensor really holds: for a torchao quantised weight, its inner tensors (int8 data and
    scales), not numel x element_size of the dtype it stands in for."""
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) not in (torch_module().Tensor, torch_module().nn.Parameter):
        return sum(tensor_bytes(getattr(t, name)) for name in inner()[0])
    return t.numel() * t.element_size()


def torch_module():
    import torch

    return torch


class AnonymousPeak:
    """The largest RssAnon of this process, sampled every 20 ms by a thread. VmHWM also counts the
    pages of the safetensors files that the loaders map into memory: clean file pages, which the
    kernel can drop under pressure; RssAnon is the memory the process really needs."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval):
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError, StopIteration):
                with open("/proc/self/status") as f:
                    line = next(line for line in f if line.startswith("RssAnon:"))
                self.peak = max(self.peak, int(line.split()[1]) * 1024)
            self._stop.wait(interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def linear_census(module) -> dict:
    """The module's nn.Linear layers: how many hold a quantised weight (a torchao tensor subclass),
    and what kinds of parameter-holding layers are left in full precision."""
    import torch

    try:
        from torchao.utils import TorchAOBaseTensor
    except ImportError:  # pragma: no cover - torchao is optional
        TorchAOBaseTensor = ()
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    quantised = [m for m in linears if TorchAOBaseTensor and isinstance(m.weight, TorchAOBaseTensor)]
    full = {}
    for m in module.modules():
        own = list(m.parameters(recurse=False))
        if own and not (TorchAOBaseTensor and isinstance(m, torch.nn.Linear) and isinstance(m.weight, TorchAOBaseTensor)):
            kind = type(m).__name__
            full[kind] = full.get(kind, 0) + sum(p.numel() for p in own)
    not_quantised = sorted({name.rsplit(".", 1)[-1] for name, m in module.named_modules()
                            if isinstance(m, torch.nn.Linear) and m not in quantised})
    return {"linear": len(linears), "quantised_linear": len(quantised), "linear_left_unquantised": not_quantised,
            "full_precision_parameters_by_layer_type": full,
            "full_precision_bytes": sum(p.numel() * p.element_size() for m in module.modules()
                                        for p in m.parameters(recurse=False)
                                        if not (TorchAOBaseTensor and isinstance(p, TorchAOBaseTensor))),
            "buffer_bytes": sum(b.numel() * b.element_size() for b in module.buffers())}


def test_images(size: int):
    """An image with structure (a colour gradient and a disc) and the inpainting mask: right half white."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([x * 255 // size, y * 255 // size, ((x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 4) ** 2) * 200],
                   axis=-1).astype("uint8")
    mask = np.zeros((size, size), dtype="uint8")
    mask[:, size // 2:] = 255
    return Image.fromarray(img), Image.fromarray(mask, mode="L")


def worker(folder: str, mode: str, size: int, steps: int, threads: int, out_json: str, image_dir: str | None) -> None:
    """Load the folder in `mode`, run the three calls, write the measurements to `out_json`."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    options = mode_options(mode)
    if "dtype" in options:
        options["dtype"] = getattr(torch, options["dtype"])
    from bridge import SD3Bridge

    record = {"mode": mode, "size": size, "steps": steps, "threads": threads}
    anonymous = AnonymousPeak()
    start = time.perf_counter()
    bridge = SD3Bridge.from_pretrained(folder, device="cpu", **options)
    bridge.pipe.set_progress_bar_config(disable=True)
    bridge.img2img_pipe.set_progress_bar_config(disable=True)
    bridge.inpaint_pipe.set_progress_bar_config(disable=True)
    record["load_s"] = time.perf_counter() - start
    record["dtype"] = str(bridge.dtype).replace("torch.", "")
    record["t5"] = bridge.pipe.text_encoder_3 is not None
    record["after_load"] = {**memory_status(), "RssAnon_peak": anonymous.peak}
    record["weights_bytes"] = {name: sum(tensor_bytes(p) for p in getattr(bridge.pipe, name).parameters())
                               for name in COMPONENTS if getattr(bridge.pipe, name, None) is not None}
    if options.get("quantization"):
        record["int8"] = {name: linear_census(getattr(bridge.pipe, name)) for name in ("transformer", "text_encoder_3")
                          if getattr(bridge.pipe, name, None) is not None}
    image, mask = test_images(size)
    calls = {
        "sample": lambda cb: bridge.sample(PROMPT, num_inference_steps=steps, guidance_scale=4.5, height=size,
                                           width=size, generator=torch.Generator().manual_seed(0), callback=cb),
        "img2img": lambda cb: bridge.img2img(PROMPT, image, strength=0.6, num_inference_steps=2 * steps,
                                             guidance_scale=4.5, height=size, width=size,
                                             generator=torch.Generator().manual_seed(0), callback=cb),
        "inpaint": lambda cb: bridge.inpaint(PROMPT, image, mask, num_inference_steps=steps, guidance_scale=4.5,
                                             height=size, width=size, generator=torch.Generator().manual_seed(0),
                                             callback=cb),
    }
    record["calls"] = {}
    for name, call in calls.items():
        stamps = []
        start = time.perf_counter()
        out = call(lambda step: stamps.append(time.perf_counter()))
        total = time.perf_counter() - start
        pixels = np.asarray(out.images[0])
        entry = {"seconds": total, "steps_run": len(stamps), "finite": bool(np.isfinite(pixels).all()),
                 # a step's time: between step ends (the first step also carries the prompt encoding)
                 "s_per_step": ((stamps[-1] - stamps[0]) / (len(stamps) - 1)) if len(stamps) > 1 else None,
                 "pixel_std": float(pixels.std())}
        if name == "inpaint":
            kept = np.asarray(image)[:, : size // 2]
            entry["kept_exact"] = bool(np.array_equal(pixels[:, : size // 2], kept))
        if image_dir:
            out.images[0].save(Path(image_dir) / f"{mode}-{name}.png")
        record["calls"][name] = entry
    record["peak"] = {**memory_status(), "RssAnon_peak": anonymous.stop()}
    Path(out_json).write_text(json.dumps(record, indent=2))


def run_mode(folder, mode, size, steps, threads, image_dir=None, timeout=3600) -> dict:
    """One mode in a fresh Python process (its peak memory is its own); the record, or the error."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        command = [sys.executable, "-m", "benchmarks.sd3_full_size", "_worker", "--folder", str(folder), "--mode", mode,
                   "--size", str(size), "--steps", str(steps), "--threads", str(threads), "--json", str(out)]
        if image_dir:
            command += ["--images", str(image_dir)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                            os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode != 0 or not out.exists():
            lines = (done.stderr or done.stdout).strip().splitlines()
            return {"mode": mode, "error": lines[-1] if lines else f"exit {done.returncode}", "returncode": done.returncode}
        return json.loads(out.read_text())


# --- bf16 against float32, one transformer forward -----------------------------------------------------

def bf16_check(transformer_folder, latent_size: int, seed: int = 0, threads: int = 2) -> dict:
    """One forward pass of the transformer in float32 and in bf16, same weights (the saved bf16
    values, exact in both) and inputs; relative error ||bf16 - fp32|| / ||fp32||, and seconds."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.set_num_threads(threads)
    model = SD3Transformer2DModel.from_pretrained(transformer_folder, torch_dtype=torch.float32).eval()
    c = model.config
    g = torch.Generator().manual_seed(seed)
    # 154 text tokens (77 CLIP + 77 padding, as without T5); embeddings of unit scale
    inputs = dict(hidden_states=torch.randn(2, c.in_channels, latent_size, latent_size, generator=g),
                  encoder_hidden_states=torch.randn(2, 154, c.joint_attention_dim, generator=g),
                  pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g),
                  timestep=torch.tensor([500.0, 500.0]))
    results = {}
    with torch.no_grad():
        start = time.perf_counter()
        reference = model(**inputs, return_dict=False)[0]
        results["float32_s"] = time.perf_counter() - start
        model.to(torch.bfloat16)
        start = time.perf_counter()
        low = model(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()},
                    return_dict=False)[0].float()
        results["bf16_s"] = time.perf_counter() - start
    diff = low - reference
    results.update(relative_error=float(diff.norm() / reference.norm()),
                   max_abs_over_std=float(diff.abs().max() / reference.std()),
                   cosine=float(torch.nn.functional.cosine_similarity(low.flatten(), reference.flatten(), dim=0)),
                   finite=bool(torch.isfinite(low).all()), latent_size=latent_size,
                   parameters=sum(p.numel() for p in model.parameters()))
    return results


def load_peak(transformer_folder, how: str) -> dict:
    """Load the transformer alone in float32 from its (bf16) files, in this process: straight
    (`float32`), or in bf16 and cast afterwards (`bf16-then-float32`); VmHWM, the RssAnon peak and
    the RssFile peak (sampled), against the bytes of float32 weights."""
    import torch
    from diffusers import SD3Transformer2DModel

    anonymous = AnonymousPeak()
    before = memory_status()
    start = time.perf_counter()
    if how == "float32":
        model = SD3Transformer2DModel.from_pretrained(transformer_folder, torch_dtype=torch.float32)
    else:
        model = SD3Transformer2DModel.from_pretrained(transformer_folder, torch_dtype=torch.bfloat16).to(torch.float32)
    seconds = time.perf_counter() - start
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    after = memory_status()
    return {"how": how, "seconds": seconds, "weights_bytes": weights, "before": before, "after": after,
            "RssAnon_peak": anonymous.stop(), "VmHWM_over_weights": after["VmHWM"] / weights}


def compare_images(image_dir, mode_a: str, mode_b: str) -> dict:
    """Each call's image from two modes (saved by `cpu --images`): mean and largest absolute pixel
    difference (of 255) and the correlation of the pixel values."""
    import numpy as np
    from PIL import Image

    result = {}
    for call in ("sample", "img2img", "inpaint"):
        a, b = (np.asarray(Image.open(Path(image_dir) / f"{mode}-{call}.png"), dtype=np.float64) for mode in (mode_a, mode_b))
        result[call] = {"mean_abs": float(np.abs(a - b).mean()), "max_abs": float(np.abs(a - b).max()),
                        "correlation": float(np.corrcoef(a.ravel(), b.ravel())[0, 1])}
    return result


# --- the GPU table (prepared; run on a machine with CUDA) ---------------------------------------------

GPU_MODES = {"default": {}, "drop_t5": {"drop_t5": True}, "model_offload": {"offload": "model"},
             "sequential_offload": {"offload": "sequential"}, "int8": {"quantization": "int8"},
             "nf4": {"quantization": "nf4"}, "compile": {"compile": True}}


def gpu_worker(folder: str, mode: str, size: int, out_json: str) -> None:
    import torch

    from bridge import SD3Bridge

    options = dict(GPU_MODES[mode])
    compiled = options.pop("compile", False)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    bridge = SD3Bridge.from_pretrained(folder, device="cuda", **options)
    bridge.pipe.set_progress_bar_config(disable=True)
    record = {"mode": mode, "load_s": time.perf_counter() - start, "dtype": str(bridge.dtype),
              "steps": bridge.default_num_inference_steps, "size": size}
    if compiled:
        bridge.pipe.transformer.compile()  # in place (nn.Module.compile); the first call compiles
        start = time.perf_counter()
        bridge.sample(PROMPT, height=size, width=size, generator=torch.Generator().manual_seed(0))
        record["compile_and_first_image_s"] = time.perf_counter() - start
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    bridge.sample(PROMPT, height=size, width=size, generator=torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    record["s_per_image"] = time.perf_counter() - start
    record["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    Path(out_json).write_text(json.dumps(record, indent=2))


def gpu_table(out: Path, models=("medium", "large"), modes=tuple(GPU_MODES), size=1024, timeout=1800) -> list:
    import torch

    if not torch.cuda.is_available():
        raise UsageError("the gpu table needs a CUDA GPU; on this machine run `cpu` (see --help)")
    rows = []
    for model in models:
        folder = Path(out) / f"sd3.5-{model}"
        if not (folder / "model_index.json").exists():
            build(folder, model)
        for mode in modes:
            with tempfile.TemporaryDirectory() as tmp:
                record_path = Path(tmp) / "r.json"
                command = [sys.executable, "-m", "benchmarks.sd3_full_size", "_gpu_worker", "--folder", str(folder),
                           "--mode", mode, "--size", str(size), "--json", str(record_path)]
                try:
                    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
                    record = (json.loads(record_path.read_text()) if record_path.exists() else
                              {"mode": mode, "error": ((done.stderr or "").strip().splitlines() or ["?"])[-1]})
                except subprocess.TimeoutExpired:
                    record = {"mode": mode, "error": f"over {timeout} s"}
            record["model"] = model
            rows.append(record)
            print(json.dumps(record), flush=True)
    return rows


# --- reports ------------------------------------------------------------------------------------------

def machine() -> dict:
    import torch

    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    from bridge.sd3 import cpu_has_native_bf16

    return {"cpu": name, "cores": os.cpu_count(), "torch": torch.__version__, "native_bf16": cpu_has_native_bf16(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def counts_table(counts: dict) -> str:
    lines = ["| model | component | parameters | + buffers | published |", "| --- | --- | --- | --- | --- |"]
    for model, parts in counts.items():
        for name, c in parts.items():
            published = f"{PUBLISHED[model] / 1e9:.1f} B" if name == "transformer" else ""
            lines.append(f"| {model} | {name} | {c['parameters'] / 1e9:.3f} B | {c['buffers'] / 1e9:.3f} B | {published} |")
        total = sum(c["parameters"] for c in parts.values())
        lines.append(f"| {model} | all | {total / 1e9:.3f} B | | |")
    return "\n".join(lines)


CARDS_GB = (8, 12, 16, 24, 48, 80)


def weights_gb(parts: dict, with_t5: bool, int8: bool) -> float:
    """Bytes of weights (parameters and floating buffers) in bf16, or with the transformer's and T5's
    Linear weights in int8 (all of them are quantised: the `cpu` run's census), in GB."""
    total = 0
    for name, c in parts.items():
        if name == "text_encoder_3" and not with_t5:
            continue
        size = 2 * (c["parameters"] + c["buffers"])
        if int8 and name in ("transformer", "text_encoder_3"):
            size -= c["linear_weights"]  # 1 byte instead of 2 (the per-row scales are left out: < 0.1%)
        total += size
    return total / 1e9


def fits_table(counts: dict) -> str:
    """Weights alone against card sizes: a lower bound (activations, the CUDA context and the
    VAE decode at 1024 px come on top; the measured GPU table is what settles it)."""
    lines = ["| model | weights | GB (weights only) | " + " | ".join(f"{c} GB" for c in CARDS_GB) + " |",
             "| --- " * (3 + len(CARDS_GB)) + "|"]
    for model, parts in counts.items():
        for label, t5, int8 in (("bf16, with T5", True, False), ("bf16, drop_t5", False, False),
                                ("int8 transformer + T5", True, True), ("int8 transformer, drop_t5", False, True)):
            gb = weights_gb(parts, t5, int8)
            marks = " | ".join("yes" if gb < 0.9 * c else "no" for c in CARDS_GB)  # 10% left for the rest
            lines.append(f"| {model} | {label} | {gb:.1f} | {marks} |")
    return "\n".join(lines)


def modes_table(records: list) -> str:
    lines = ["| mode | dtype | T5 | load s | sample s/step | img2img s/step | inpaint s/step | peak RSS GB (VmHWM) | "
             "peak anonymous GB | inpaint kept exact | int8 linears (quantised/total) |", "| --- " * 11 + "|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['mode']} | failed: {r['error']} |" + " |" * 9)
            continue
        step = {k: (f"{v['s_per_step']:.2f}" if v["s_per_step"] else "-") for k, v in r["calls"].items()}
        q = r.get("int8", {}).get("transformer")
        q_text = f"{q['quantised_linear']}/{q['linear']}" if q else ""
        lines.append(f"| {r['mode']} | {r['dtype']} | {'yes' if r['t5'] else 'no'} | {r['load_s']:.1f} | {step['sample']} | "
                     f"{step['img2img']} | {step['inpaint']} | {r['peak']['VmHWM'] / 1e9:.2f} | {r['peak']['RssAnon_peak'] / 1e9:.2f} | "
                     f"{r['calls']['inpaint']['kept_exact']} | {q_text} |")
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------------

def check_size(value: str) -> int:
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if size < 16 or size % 16:
        raise argparse.ArgumentTypeError(f"{size} is not a positive multiple of 16 (SD3's latent patch in pixels)")
    return size


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.sd3_full_size", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    sub.add_parser("counts", help="parameter counts of SD3.5 Medium and Large (meta device) beside the published sizes")
    b = sub.add_parser("build", help="write a random-weight SD3.5 Medium pipeline folder (bf16)")
    b.add_argument("--out", required=True)
    b.add_argument("--tiny", action="store_true", help="the tiny stand-in of the same structure")
    b.add_argument("--no-t5", action="store_true", help="leave out T5-XXL (text_encoder_3)")
    c = sub.add_parser("cpu", help="every mode in a fresh subprocess: load s, s/step, peak RSS")
    c.add_argument("--folder", required=True)
    c.add_argument("--modes", nargs="+", default=["default", "drop_t5", "int8", "bf16"])
    c.add_argument("--size", type=check_size, default=256, help="image size in pixels (multiple of 16)")
    c.add_argument("--steps", type=int, default=2, help="sample and inpaint steps; img2img runs 2x at strength 0.6")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--json", help="append the records to this JSON-lines file")
    c.add_argument("--images", help="save each call's image in this folder")
    k = sub.add_parser("bf16-check", help="one transformer forward, float32 vs bf16")
    k.add_argument("--folder", required=True)
    k.add_argument("--size", type=check_size, default=256)
    k.add_argument("--threads", type=int, default=2)
    lp = sub.add_parser("load-peak", help="the float32 load's peak: the transformer alone, each way in a fresh process")
    lp.add_argument("--folder", required=True)
    lp.add_argument("--how", nargs="+", default=["float32", "bf16-then-float32"], choices=["float32", "bf16-then-float32"])
    lp.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    d = sub.add_parser("compare", help="the images of two modes saved by `cpu --images`: pixel differences")
    d.add_argument("--images", required=True)
    d.add_argument("--modes", nargs=2, required=True)
    g = sub.add_parser("gpu", help="the GPU table at 1024 x 1024 (needs CUDA)")
    g.add_argument("--out", required=True, help="where the Medium and Large folders are built")
    g.add_argument("--models", nargs="+", default=["medium", "large"], choices=["medium", "large"])
    g.add_argument("--modes", nargs="+", default=list(GPU_MODES), choices=list(GPU_MODES))
    g.add_argument("--size", type=check_size, default=1024)
    g.add_argument("--json")
    a = sub.add_parser("all", help="build, counts, cpu modes and bf16-check in one go (what the test runs with --tiny)")
    a.add_argument("--out", required=True)
    a.add_argument("--tiny", action="store_true")
    a.add_argument("--modes", nargs="+", default=["default", "drop_t5", "int8", "bf16"])
    a.add_argument("--size", type=check_size, default=None)
    a.add_argument("--steps", type=int, default=2)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--json", help="write the whole report here")
    w = sub.add_parser("_worker")
    w.add_argument("--folder", required=True)
    w.add_argument("--mode", required=True)
    w.add_argument("--size", type=int, required=True)
    w.add_argument("--steps", type=int, required=True)
    w.add_argument("--threads", type=int, default=1)
    w.add_argument("--json", required=True)
    w.add_argument("--images")
    gw = sub.add_parser("_gpu_worker")
    for flag in ("--folder", "--mode", "--json"):
        gw.add_argument(flag, required=True)
    gw.add_argument("--size", type=int, default=1024)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    for mode in getattr(args, "modes", None) or []:
        if args.command != "gpu":
            mode_options(mode)  # an unknown mode is one error line, before any work
    if args.command == "counts":
        counts = {m: parameter_counts(m) for m in ("medium", "large")}
        print(json.dumps(counts, indent=2))
        print(counts_table(counts))
        print()
        print(fits_table(counts))
    elif args.command == "build":
        print(build(Path(args.out), "tiny" if args.tiny else "medium", with_t5=not args.no_t5))
    elif args.command == "cpu":
        records = []
        for mode in args.modes:
            record = run_mode(args.folder, mode, args.size, args.steps, args.threads, args.images)
            record["machine"] = machine()
            records.append(record)
            print(json.dumps(record), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(record) + "\n")
        print(modes_table(records))
    elif args.command == "bf16-check":
        print(json.dumps(bf16_check(Path(args.folder) / "transformer", args.size // 8, threads=args.threads)))
    elif args.command == "load-peak":
        for how in args.how:
            if args.in_process:
                print(json.dumps(load_peak(Path(args.folder) / "transformer", how)), flush=True)
                continue
            done = subprocess.run([sys.executable, "-m", "benchmarks.sd3_full_size", "load-peak", "--folder",
                                   str(args.folder), "--how", how, "--in-process"], capture_output=True, text=True)
            print((done.stdout.strip().splitlines() or [done.stderr.strip().splitlines()[-1]])[-1], flush=True)
    elif args.command == "compare":
        print(json.dumps(compare_images(args.images, *args.modes), indent=2))
    elif args.command == "gpu":
        rows = gpu_table(Path(args.out), args.models, args.modes, args.size)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    elif args.command == "all":
        size_name = "tiny" if args.tiny else "medium"
        size = args.size or (32 if args.tiny else 256)
        folder = build(Path(args.out) / f"sd3.5-{size_name}", size_name)
        report = {"machine": machine(), "size": size, "steps": args.steps,
                  "counts": {size_name: parameter_counts(size_name)},
                  "modes": [run_mode(folder, mode, size, args.steps, args.threads) for mode in args.modes],
                  "bf16_check": bf16_check(folder / "transformer", size // 8, threads=args.threads)}
        print(modes_table(report["modes"]))
        print(json.dumps(report["bf16_check"]))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
    elif args.command == "_worker":
        worker(args.folder, args.mode, args.size, args.steps, args.threads, args.json, args.images)
    elif args.command == "_gpu_worker":
        gpu_worker(args.folder, args.mode, args.size, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
