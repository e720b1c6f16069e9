"""`SD3Bridge`: Stable Diffusion 3.5 (Medium, Large, Large Turbo) through minidiff's calls.

    from bridge import SD3Bridge
    pipe = SD3Bridge.from_pretrained("stabilityai/stable-diffusion-3.5-medium")
    out = pipe.sample("a red circle", generator=torch.Generator().manual_seed(0))
    out.images[0].save("red-circle.png")

Everything after the first line is the same as with `MiniDiffusionPipeline`: the bridge answers
the calls of `minidiff.tools.contract.TextToImagePipeline` by handing them to diffusers'
`StableDiffusion3Pipeline` (loaded once) and its img2img / inpaint siblings, built from the same
component objects (no second copy of the weights, no cast: a quantised transformer, a float32
VAE or T5's float32 `wo` layers stay as they were loaded).

What differs from the toy model, and where it shows here:
- SD3 denoises *latents* (16 channels at 1/8 of the image size), not pixels: the VAE's encoder
  maps an image x to z = (E(x) - shift_factor) * scaling_factor and its decoder goes back with
  D(z / scaling_factor + shift_factor). `vae_latents_to_decoder_input` writes that down once.
- SD3 is trained with rectified flow (Liu et al. 2022; Esser et al. 2024, "Scaling Rectified Flow
  Transformers"), not DDPM: with sigma in [0, 1] (sigma = 0 is data, sigma = 1 is noise),
      x_sigma = (1 - sigma) * x_0 + sigma * noise,
  and the transformer predicts the velocity v = noise - x_0. Hence the predicted clean latents
      x_0 = x_sigma - sigma * v                      (`velocity_to_x0`),
  and an Euler step to the next sigma is x_next = x_sigma + (sigma_next - sigma) * v.
  In diffusers' names: `scheduler.sigmas` -> sigma, `timesteps` = 1000 * sigma, `noise_pred` -> v.
- Skip-layer guidance (SD3.5 Medium; Stability's reference `sd3_infer.py`): on top of
  classifier-free guidance, v += s * (v_cond - v_skip), where v_skip is the conditional
  prediction with some transformer layers skipped, for the steps i with
  start * N < i < stop * N.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from PIL import Image

from minidiff.flow import RectifiedFlow, predict_x0_from_velocity
from minidiff.runtime import pick_device, precision_for
from minidiff.tools.contract import Call, ImageOutput, StepRecorder, TextToImagePipeline
from minidiff.tools.pictures import load_image, load_mask, paste_kept

# Steps and guidance from the model cards' examples (diffusers' own defaults, 50 / 7.0, are
# SD3-era). Recognised by the model's own name (`model_name`); the first match wins, so
# "large-turbo" must come before "large".
MODEL_DEFAULTS = [  # (name, num_inference_steps, guidance_scale)
    ("large-turbo", 4, 0.0),  # stabilityai/stable-diffusion-3.5-large-turbo: distilled, no CFG
    ("large", 28, 3.5),  # stabilityai/stable-diffusion-3.5-large
    ("medium", 40, 4.5),  # stabilityai/stable-diffusion-3.5-medium
]
GENERIC_DEFAULTS = (28, 3.5)  # any other SD3 folder (a fine-tune, a renamed copy): Large's settings
# Skip-layer guidance as Stability's reference inference (sd3_infer.py, CONFIGS["sd3.5_medium"]
# ["skip_layer_config"]) sets it; it is off there unless asked for (--skip_layer_cfg), so here too.
# Only Medium has a recommended set of layers.
SKIP_LAYER_GUIDANCE = {"medium": [7, 8, 9]}
SKIP_LAYER_SETTINGS = dict(skip_layer_guidance_scale=2.5, skip_layer_guidance_start=0.01,
                           skip_layer_guidance_stop=0.2)
OFFLOAD_MODES = (None, "model", "sequential")
# quantization="int8": torchao int8 weight-only (CPU and CUDA); "nf4": bitsandbytes 4-bit NF4,
# as on the SD3.5 model cards (CUDA only). Either applies to the transformer and T5, the two big models.
QUANTIZATION_MODES = ("int8", "nf4")
MAX_T5_TOKENS = 512  # diffusers refuses a longer max_sequence_length
EXAMPLE_ID = "stabilityai/stable-diffusion-3.5-medium"


class BridgeError(ValueError):
    """A model that cannot be loaded, with what to do about it (minidiff.cli prints it as one line)."""


def model_name(model_id_or_path) -> str:
    """The model's own name: the last part of a hub id or folder path (the folders above it say
    nothing about the model), or the repo name in a Hugging Face cache snapshot path."""
    text = str(model_id_or_path).replace("\\", "/").rstrip("/")
    cached = re.search(r"models--[^/]+--([^/]+)/snapshots/", text)
    return cached.group(1) if cached else text.rsplit("/", 1)[-1]


def _model_key(model_id_or_path) -> str | None:
    name = model_name(model_id_or_path).lower().replace("_", "-")
    return next((key for key, _, _ in MODEL_DEFAULTS if key in name), None)


def defaults_for(model_id_or_path) -> tuple[int, float]:
    """(num_inference_steps, guidance_scale) for a model, recognised by its own name."""
    key = _model_key(model_id_or_path)
    return next(((steps, guidance) for k, steps, guidance in MODEL_DEFAULTS if k == key), GENERIC_DEFAULTS)


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 in hardware: the avx512_bf16 or amx_bf16 flags on x86, the
    bf16 feature on Arm (Linux's /proc/cpuinfo). Elsewhere, or when it cannot be read, False: bf16
    would be emulated in float32 instructions, with no speed to gain."""
    try:
        with open(cpuinfo) as f:
            words = set(f.read().split())
    except OSError:
        return False
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA cards that have it natively (Ampere and later): half the memory, and what the
    models were trained in. float16 on older CUDA cards (T4, V100, RTX 20xx), where bf16 is emulated
    and slow; T5 stays finite there because its `wo` layers are kept in float32 (transformers'
    `_keep_in_fp32_modules`, which the bridge never casts away). bf16 also on CPUs that compute it
    natively (`cpu_has_native_bf16`: AVX512-BF16 or AMX, Arm BF16), float32 on other CPUs, where bf16
    is emulated, and on MPS (whose bf16 support depends on the macOS version). The noise once
    reported for bf16 SD3 on CPU (diffusers issue #8593, torch 2.1.2) did not show on the full-size
    SD3.5 Medium architecture (random weights) with torch 2.14: docs/bridge-memory.md, "bf16 on the CPU"."""
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return precision_for(device) or torch.float32  # the same rule the toy's training uses on CUDA


def velocity_to_x0(x_t: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """Predicted clean latents from the flow-matching velocity, x_0 = x_sigma - sigma * v: minidiff's
    own `predict_x0_from_velocity` (the toy's flow models use the same line), in float32."""
    return predict_x0_from_velocity(x_t.float(), v.float(), torch.as_tensor(sigma, dtype=torch.float32,
                                                                            device=x_t.device))


def vae_latents_to_decoder_input(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """Undo the encoder's normalisation z = (E(x) - shift) * scale: the decoder takes z / scale + shift."""
    return latents / vae_config.scaling_factor + vae_config.shift_factor


# --- errors a user can act on -------------------------------------------------------------------

def _causes(error: BaseException):
    """The error and everything it was raised from (diffusers re-raises hub errors as OSError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _network_errors() -> tuple[type, ...]:
    errors = [OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError, AttributeError):
        from huggingface_hub.utils import httpx  # the HTTP client the hub library uses

        errors.append(httpx.TransportError)
    with contextlib.suppress(ImportError):
        import requests

        errors.append(requests.ConnectionError)
    return tuple(errors)


def explain_load_error(model: str, error: BaseException) -> str | None:
    """One sentence saying what went wrong loading `model` and what to do about it, or None
    when the error is not one we recognise."""
    page = f"https://huggingface.co/{model}"
    logged_in = huggingface_hub.get_token() is not None
    login = "run `hf auth login` (or set the HF_TOKEN environment variable to a token from https://huggingface.co/settings/tokens)"
    for cause in _causes(error):
        if isinstance(cause, GatedRepoError):
            if not logged_in:
                return (f"{model} is a gated model and you are not logged in to Hugging Face: {login}, "
                        f"and accept the licence on {page}")
            return (f"your Hugging Face token has no access to the gated model {model}: accept the licence on "
                    f"{page} while logged in as the token's owner (it can take a few minutes), then try again")
        if isinstance(cause, RevisionNotFoundError):
            return f"{model} has no such revision on the Hugging Face Hub; check the revision name"
        if isinstance(cause, RepositoryNotFoundError):
            private = "" if logged_in else f"; if it is a private model, {login}"
            return (f"{model} is not a local folder and the Hugging Face Hub has no model with that id: check the "
                    f"path or the id (for example {EXAMPLE_ID}){private}")
        if isinstance(cause, HFValidationError):
            return (f"{model} is neither an existing folder nor a Hugging Face model id of the form owner/name "
                    f"(for example {EXAMPLE_ID}); check the path")
        if isinstance(cause, _network_errors()):
            offline = " (HF_HUB_OFFLINE is set)" if huggingface_hub.constants.HF_HUB_OFFLINE else ""
            return (f"{model} is not in the local Hugging Face cache and the Hub cannot be reached{offline}: "
                    f"connect to the internet once to download it, or pass the folder of a downloaded copy")
        if isinstance(cause, ValueError) and "text_encoder_3" in str(cause) and "expected" in str(cause):
            return (f"{model} was saved without the T5 text encoder (text_encoder_3); load it with "
                    f"drop_t5=True (sample.py --drop-t5)")
    return None


def _raise_load_error(model: str, error: BaseException):
    """Raise the BridgeError for a failed load, from inside the `except` that caught `error`. A
    recognised error is explained in full, so its chain (~80 lines of diffusers and hub frames)
    would only bury the one line that matters: cut it. An unrecognised one keeps its chain."""
    explained = explain_load_error(model, error)
    if explained is not None:
        raise BridgeError(explained) from None
    lines = str(error).strip().splitlines()
    raise BridgeError(f"could not load {model}: {lines[0] if lines else type(error).__name__}") from error


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def looks_like_hub_id(model: str) -> bool:
    """owner/name and nothing else: the shape of a Hugging Face model id."""
    return bool(_HUB_ID.match(str(model)))


def _check_local_folder(model: str) -> None:
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise BridgeError(f"{model} has no model_index.json, so it is not a diffusers pipeline folder "
                          f"(a minidiff checkpoint is loaded with MiniDiffusionPipeline, or sample.py --backend minidiff)")


def saved_without_t5(model: str) -> bool:
    """A local folder whose model_index.json has no T5 (`"text_encoder_3": [null, null]`, as
    `save_pretrained` writes for a pipeline loaded without it)."""
    index = Path(model).expanduser() / "model_index.json"
    if not index.is_file():
        return False
    try:
        entry = json.loads(index.read_text()).get("text_encoder_3")
    except (OSError, ValueError):
        return False
    return entry is None or entry == [None, None]


def _need(package: str, what: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise BridgeError(f"{what} needs the {package} package: pip install {package}")


def quantization_config(quantization, dtype: torch.dtype, device: torch.device, with_t5: bool):
    """diffusers' PipelineQuantizationConfig for `quantization` ("int8", "nf4"), applied to the
    transformer and T5; a PipelineQuantizationConfig of your own is passed through unchanged."""
    if quantization is None or not isinstance(quantization, str):
        return quantization
    if quantization not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {QUANTIZATION_MODES} or a diffusers "
                         f"PipelineQuantizationConfig, got {quantization!r}")
    diffusers = _diffusers()  # first: the quiet import
    import transformers
    from diffusers.quantizers import PipelineQuantizationConfig

    if quantization == "int8":  # weights stored as int8 with a scale per row, computed in `dtype`
        _need("torchao", "quantization='int8'")
        from torchao.quantization import Int8WeightOnlyConfig

        configs = (diffusers.TorchAoConfig(Int8WeightOnlyConfig()), transformers.TorchAoConfig(Int8WeightOnlyConfig()))
    else:  # nf4: 4-bit NormalFloat weights, as the SD3.5 model cards show
        if device.type != "cuda":
            raise ValueError("quantization='nf4' (bitsandbytes) needs a CUDA GPU; on this device use 'int8'")
        _need("bitsandbytes", "quantization='nf4'")
        nf4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        configs = (diffusers.BitsAndBytesConfig(**nf4), transformers.BitsAndBytesConfig(**nf4))
    mapping = {"transformer": configs[0]}
    if with_t5:
        mapping["text_encoder_3"] = configs[1]
    return PipelineQuantizationConfig(quant_mapping=mapping)


def _token_count(tokenizer, text: str, limit: int) -> int:
    """Tokens of `text` (with the start/end tokens), or 0 when it cannot exceed `limit`: a token
    covers at least one UTF-8 byte, so a short prompt needs no tokenizing (most calls)."""
    if len(text.encode()) + 2 <= limit:
        return 0
    return len(tokenizer(text, truncation=False).input_ids)


# --- the per-step trace ---------------------------------------------------------------------------

class _DiffusersSteps:
    """diffusers' per-step hooks turned into the contract's callback dict, for a `StepRecorder`
    (the one implementation of `callback` and `capture_steps`, shared with minidiff).

    diffusers calls `callback_on_step_end(pipe, i, t, {"latents": x})` after step i, but does not
    hand over the model's output; the scheduler's `step` receives it (the guided velocity v) and the
    x_t it was predicted from, so we listen there during the call and nowhere else."""

    def __init__(self, recorder: StepRecorder):
        self.recorder = recorder
        self._last_step = None

    @contextlib.contextmanager
    def watching(self, scheduler):
        """Yield the keywords for the diffusers call; listen to `scheduler.step` meanwhile."""
        if not (self.recorder.steps or self.recorder.user_callback):
            yield {}
            return
        original_step = scheduler.step

        def step(model_output, timestep, sample, *args, **kwargs):
            out = original_step(model_output, timestep, sample, *args, **kwargs)
            sigma = scheduler.sigmas[scheduler.step_index - 1]  # step() has just moved step_index on
            self._last_step = (sample, model_output, sigma)
            return out

        scheduler.step = step  # an instance attribute shadowing the method, removed below
        try:
            yield {"callback_on_step_end": self.on_step_end}
        finally:
            del scheduler.step

    def on_step_end(self, pipe, i: int, t, tensors: dict) -> dict:
        x = tensors["latents"]  # (B, 16, H/8, W/8): after the step (and, inpainting, after the kept region's blend)
        x_t, v, sigma = self._last_step
        if i == 0:
            self.recorder.start(x_t, float(t))
        if self.recorder.callback is not None:
            self.recorder.callback({"i": i, "t": float(t), "x": x, "denoised": velocity_to_x0(x_t, v, sigma),
                                    "noise_pred": v})
        return {}


def _diffusers():
    """diffusers, with the pipelines loaded. The first import is made quiet: with torchao installed
    (quantization="int8"), torch 2.14 logs two deprecation warnings about torchao's enums and
    diffusers 0.42 one about torchao 0.18's moved tensor classes; harmless, and they would bury
    the one-line errors of sample.py."""
    import logging

    pytree = logging.getLogger("torch.utils._pytree")
    pytree_level = pytree.level
    pytree.setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging

        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            import diffusers
            from diffusers import StableDiffusion3Pipeline  # noqa: F401 (the lazy module loads here)
        finally:
            diffusers_logging.set_verbosity(level)
    finally:
        pytree.setLevel(pytree_level)
    return diffusers


# --- the bridge -------------------------------------------------------------------------------

@dataclass
class SD3Call(Call):
    """The bridge's keywords beyond the contract's."""

    max_sequence_length: int | None = None  # T5 tokens read from the prompt, up to 512 (diffusers: 256)
    skip_layer_guidance: object = None  # text to image: True (the model's recommended layers) or a list



class SD3Bridge(TextToImagePipeline):
    call_type = SD3Call
    load_options = ("dtype", "drop_t5", "offload", "quantization")
    samplers = ("euler",)  # the flow-matching Euler sampler SD3 was made for
    """Stable Diffusion 3.5 behind `sample`, `img2img` and `inpaint`, with minidiff's keywords.

    Extra keywords: `height` and `width` (default: the model's native size, 1024 for SD3.5;
    multiples of `size_multiple`, 16 for SD3.5); `max_sequence_length` (T5 tokens, up to 512;
    diffusers' default 256); `skip_layer_guidance` (sample only). Inputs to img2img/inpaint are
    resized to that size as diffusers' image processor resizes them (Lanczos), with a warning.
    The callback dict carries latents, not pixels; the trace decodes them."""

    def __init__(self, pipe, *, name: str | None = None, device=None, offload: str | None = None):
        diffusers = _diffusers()
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        self.pipe = pipe
        self.dtype = pipe.dtype
        # The siblings get the very same module objects. Not `from_pipe`: it ends with
        # `.to(dtype=...)` on the new pipeline, which casts the shared modules too (a quantised
        # transformer refuses, a float32 VAE or T5's float32 `wo` layers are flattened).
        self.img2img_pipe = diffusers.StableDiffusion3Img2ImgPipeline(**pipe.components)
        self.inpaint_pipe = diffusers.StableDiffusion3InpaintPipeline(**pipe.components)
        self.device = pick_device(device)
        if offload == "model":  # whole models move to the GPU one at a time
            pipe.enable_model_cpu_offload(device=self.device)
        elif offload == "sequential":  # layer by layer: least memory, slowest
            pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        self.offload = offload
        self.name = name or getattr(pipe, "name_or_path", None) or ""  # a pipeline passed in: its own path or id
        self.default_num_inference_steps, self.default_guidance_scale = defaults_for(self.name)
        self.recommended_skip_layers = SKIP_LAYER_GUIDANCE.get(_model_key(self.name))
        self.size_multiple = pipe.vae_scale_factor * pipe.patch_size
        self.native_size = pipe.default_sample_size * pipe.vae_scale_factor  # 128 * 8 = 1024 for SD3.5
        self.loras: dict[str, float] = {}  # adapter name -> scale, in loading order
        self._warned_negative = False

    @classmethod
    def from_pretrained(cls, model_id_or_path, *, device=None, dtype=None, drop_t5: bool = False,
                        offload: str | None = None, quantization=None) -> "SD3Bridge":
        """Load a Hugging Face SD3 model (hub id or folder with model_index.json) once.

        device: "auto"/None picks cuda, then mps, then cpu.
        dtype: bf16 on CUDA cards and CPUs with native bf16, float16 on older CUDA cards, float32 elsewhere.
        drop_t5: leave out the 4.7B-parameter T5 text encoder (prompts then use CLIP alone); a folder
            saved without T5 is loaded that way by itself.
        offload: None, "model" (enable_model_cpu_offload) or "sequential" (enable_sequential_cpu_offload).
        quantization: None, "int8" (torchao, CPU or CUDA), "nf4" (bitsandbytes, CUDA), or a diffusers
            `PipelineQuantizationConfig`; "int8"/"nf4" quantise the transformer and T5."""
        model = str(model_id_or_path)
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        device = pick_device(device)
        dtype = default_dtype(device) if dtype is None else dtype
        if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn("this CPU has no native bf16 (AVX512-BF16, AMX or Arm BF16): bfloat16 is emulated and "
                          "slower than float32, the default here", stacklevel=2)
        if offload is not None and device.type == "cpu":
            raise ValueError(f"offload={offload!r} moves weights between CPU and a GPU, but the device is the CPU; "
                             "leave offload unset")
        if offload is not None and importlib.util.find_spec("accelerate") is None:
            raise BridgeError(f"offload={offload!r} needs the accelerate package: pip install accelerate")
        _check_local_folder(model)
        diffusers = _diffusers()
        drop_t5 = drop_t5 or saved_without_t5(model)
        options = {"text_encoder_3": None, "tokenizer_3": None} if drop_t5 else {}
        quantized = quantization_config(quantization, dtype, device, with_t5=not drop_t5)
        if quantized is not None:
            options["quantization_config"] = quantized
        try:
            pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(model, dtype=dtype, **options)
        except (OSError, ValueError) as error:  # hub errors arrive as OSError (or ValueError for a bad id)
            _raise_load_error(model, error)
        return cls(pipe, name=model, device=device, offload=offload)

    @property
    def image_size(self) -> int:
        """The model's native size in pixels (height = width), as `MiniDiffusionPipeline.image_size`."""
        return self.native_size

    # -- LoRA: the transformer (and text encoders) are shared, so an adapter reaches all three calls --

    def load_lora_weights(self, path_or_id, adapter_name: str | None = None, scale: float = 1.0,
                          **kwargs) -> str:
        """Load a LoRA (a .safetensors file, a folder, or a hub id, as diffusers' `load_lora_weights`
        takes) at weight `scale`; W' = W + scale * B A in every adapted layer. Several LoRAs add up.
        Returns the adapter's name (adapter_name, or "lora_0", "lora_1", ...)."""
        from diffusers.utils import USE_PEFT_BACKEND

        if not USE_PEFT_BACKEND:
            raise BridgeError("LoRA loading needs the peft package: pip install peft")
        name = adapter_name or f"lora_{len(self.loras)}"
        if name in self.loras:
            raise ValueError(f"a LoRA named {name!r} is already loaded; pass another adapter_name")
        try:
            self.pipe.load_lora_weights(path_or_id, adapter_name=name, **kwargs)
        except (OSError, ValueError) as error:
            _raise_load_error(str(path_or_id), error)
        self.loras[name] = float(scale)
        self.pipe.set_adapters(list(self.loras), list(self.loras.values()))
        return name

    def set_lora_scale(self, adapter_name: str, scale: float) -> None:
        """Change one loaded LoRA's weight (0 turns it off without unloading it)."""
        if adapter_name not in self.loras:
            raise ValueError(f"no LoRA named {adapter_name!r} is loaded (loaded: {list(self.loras) or 'none'})")
        self.loras[adapter_name] = float(scale)
        self.pipe.set_adapters(list(self.loras), list(self.loras.values()))

    def unload_lora_weights(self) -> None:
        """Remove every LoRA: the weights are the base model's again."""
        self.pipe.unload_lora_weights()
        self.loras.clear()

    # -- what the contract asks of a backend --

    def size(self, height=None, width=None) -> tuple[int, int]:
        height = self.native_size if height is None else height
        width = self.native_size if width is None else width
        m = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < m or value % m:
                raise ValueError(f"{name} must be a positive multiple of {m} for this model, got {value}")
        return height, width

    def steps_run(self, num_inference_steps: int, strength: float | None = None) -> int:
        """How many of the N steps a call runs: all, or for img2img/inpaint diffusers' `get_timesteps`,
        N - int(N - N * strength) (the rule of minidiff's flow models too)."""
        return num_inference_steps if strength is None else RectifiedFlow.steps_run(num_inference_steps, strength)

    def decode(self, x) -> list[Image.Image]:
        return self.decode_latents(x)

    # -- helpers shared by the three calls --

    def _resize(self, image: Image.Image, height: int, width: int, what: str) -> Image.Image:
        """Resize as diffusers' VaeImageProcessor does (Lanczos, its `resize`), so that the pixels
        diffusers would see are the ones we hand it (and paste back)."""
        if image.size != (width, height):
            warnings.warn(f"{what} of size {image.size[0]}x{image.size[1]} resized to {width}x{height}", stacklevel=3)
            image = self.pipe.image_processor.resize(image, height, width)
        return image

    def _resize_mask(self, mask: Image.Image, height: int, width: int) -> Image.Image:
        """The mask as diffusers' mask processor sees it: resized (Lanczos), binarised at 0.5."""
        if mask.size == (width, height):
            return mask
        binary = self.inpaint_pipe.mask_processor.preprocess(mask, height=height, width=width)  # (1, 1, H, W) in {0, 1}
        return Image.fromarray((binary[0, 0].numpy() * 255).astype("uint8"), mode="L")

    def _skip_layers(self, skip_layer_guidance, guidance: float) -> dict:
        """The diffusers keywords for skip-layer guidance: None/False off (the default, as in the
        reference inference), True the model's recommended layers, or a list of layer indices."""
        if skip_layer_guidance is None or skip_layer_guidance is False:
            return {}
        if skip_layer_guidance is True:
            if self.recommended_skip_layers is None:
                raise ValueError(f"no recommended skip layers for {model_name(self.name) or 'this model'} (only "
                                 "SD3.5 Medium has them, [7, 8, 9]); pass a list of layer indices")
            layers = list(self.recommended_skip_layers)
        else:
            layers = list(skip_layer_guidance)
            count = self.pipe.transformer.config.num_layers
            if not layers or any(isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < count for k in layers):
                raise ValueError(f"skip_layer_guidance must be True or a list of layer indices from 0 to "
                                 f"{count - 1}, got {skip_layer_guidance!r}")
        if guidance <= 1:
            raise ValueError(f"skip-layer guidance works inside classifier-free guidance, which is off at "
                             f"guidance_scale {guidance} (<= 1); raise guidance_scale or drop skip_layer_guidance")
        return {"skip_guidance_layers": layers, **SKIP_LAYER_SETTINGS}

    def _check_prompts(self, prompts, negatives, guidance, max_sequence_length) -> None:
        """Warn about text the model will not read: a negative prompt without CFG, CLIP's 77-token cut,
        T5's max_sequence_length cut."""
        if guidance <= 1 and any(negatives) and not self._warned_negative:
            self._warned_negative = True
            warnings.warn(f"negative_prompt is ignored at guidance_scale {guidance}: it replaces the empty prompt "
                          "of classifier-free guidance, which runs only above 1", stacklevel=4)
        clip = self.pipe.tokenizer
        t5 = self.pipe.tokenizer_3 if self.pipe.text_encoder_3 is not None else None
        t5_limit = 256 if max_sequence_length is None else max_sequence_length
        for text in dict.fromkeys(p for p in prompts + negatives if p):
            clip_tokens = _token_count(clip, text, clip.model_max_length)
            if clip_tokens > clip.model_max_length:
                reader = (f"T5 reads up to {t5_limit} tokens of it" if t5 is not None
                          else "without T5 the rest is lost")
                warnings.warn(f"the prompt {text[:40]!r}... is {clip_tokens} CLIP tokens; the CLIP encoders read "
                              f"the first {clip.model_max_length} ({reader})", stacklevel=4)
            if t5 is not None and _token_count(t5, text, t5_limit) > t5_limit:
                warnings.warn(f"the prompt {text[:40]!r}... is longer than T5's {t5_limit} tokens; raise "
                              f"max_sequence_length (up to {MAX_T5_TOKENS})", stacklevel=4)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents (B, 16, h, w) -> PIL images, through the VAE decoder with scaling *and* shift."""
        vae = self.pipe.vae
        pixels = vae.decode(vae_latents_to_decoder_input(latents, vae.config).to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(pixels, output_type="pil")

    def generate(self, call: SD3Call) -> ImageOutput:
        """One call through diffusers: text to image from pure noise in latent space; img2img encodes
        `call.image` and starts at the shifted sigma where the last `steps_run(N, strength)` steps
        begin (x = (1 - sigma) z + sigma * noise); inpainting likewise, keeping the black part.

        That start is on the *shifted* grid. diffusers' get_timesteps starts at index
        i = int(N - N * strength) = N - steps_run(N, strength) of the N-step schedule, so
            sigma_start = shift(sigma_lin[i]),  sigma_lin = linspace(1, shift(1 / 1000), N),
        with shift(s) = 3 s / (1 + 2 s) for SD3.5. At strength 0.7 sigma_lin[i] is about 0.70, but
        sigma_start is 0.877 for N = 28, 0.871 for N = 40 and 0.874 for N = 100: the input keeps a
        weight 1 - sigma_start of about 0.13, not 0.3 (docs/walkthrough.ipynb computes it against
        FlowMatchEulerDiscreteScheduler(shift=3.0)). Lower strengths keep more of the input.

        diffusers 0.42's StableDiffusion3InpaintPipeline decodes with latents / scaling_factor and
        forgets the VAE's shift_factor (its text-to-image and img2img siblings add it), which
        shifts every colour. So for inpainting we ask it for latents and decode them ourselves,
        with the shift; then the black-mask pixels are pasted back so they equal the input exactly.
        With offload="model" every model goes back to the CPU afterwards, also when the call fails."""
        steps, guidance = self.resolve(call)
        if call.image is not None and call.skip_layer_guidance not in (None, False):
            raise ValueError(f"skip-layer guidance is in diffusers' SD3 text-to-image pipeline only, not in its "
                             f"{'inpaint' if call.mask_image is not None else 'img2img'} pipeline; drop "
                             f"skip_layer_guidance here")
        height, width = self.size(call.height, call.width)
        inputs = self._skip_layers(call.skip_layer_guidance, guidance) if call.image is None else {}
        pipeline, finish = self.pipe, None
        if call.image is not None:
            image = load_image(call.image)
            mask = load_mask(call.mask_image, image_size=image.size) if call.mask_image is not None else None
            image = self._resize(image, height, width, "image")
            inputs.update(image=image, strength=call.strength)
            pipeline = self.img2img_pipe
            if mask is not None:
                mask = self._resize_mask(mask, height, width)
                inputs.update(mask_image=mask, output_type="latent")
                pipeline = self.inpaint_pipe

                def finish(latents):
                    return [paste_kept(generated, image, mask) for generated in self.decode_latents(latents)]

        steps_run = self.steps_run(steps, call.strength)
        prompts, negatives = call.prompts()
        if steps_run == 0:  # strength 0: nothing is noised and no step runs, so the input is the answer
            images = [image.copy() for _ in range(len(prompts) * call.num_images_per_prompt)]
            recorder = StepRecorder(call.capture_steps, 0, decode=lambda pictures: pictures)  # validates capture_steps
            recorder.start(images, 0.0)
            return ImageOutput(images=images, trace=recorder.trace)
        max_sequence_length = call.max_sequence_length
        if max_sequence_length is not None and (isinstance(max_sequence_length, bool) or not isinstance(
                max_sequence_length, int) or not 1 <= max_sequence_length <= MAX_T5_TOKENS):
            raise ValueError(f"max_sequence_length must be a whole number from 1 to {MAX_T5_TOKENS} (T5 tokens), "
                             f"got {max_sequence_length!r}")
        recorder = StepRecorder(call.capture_steps, steps_run, call.callback, decode=self.decode_latents)
        self._check_prompts(prompts, negatives, guidance, max_sequence_length)
        if max_sequence_length is not None:
            inputs["max_sequence_length"] = max_sequence_length
        steps_hooks = _DiffusersSteps(recorder)
        try:
            with steps_hooks.watching(pipeline.scheduler) as hooks:
                images = pipeline(prompts, negative_prompt=negatives, num_inference_steps=steps,
                                  guidance_scale=guidance, generator=call.generator,
                                  num_images_per_prompt=call.num_images_per_prompt, height=height, width=width,
                                  **inputs, **hooks).images
            images = images if finish is None else finish(images)
            return ImageOutput(images=images, trace=recorder.trace)  # the trace decodes here, before the release
        finally:
            self._release()

    def _release(self) -> None:
        """With offload="model", send every model back to the CPU (diffusers does this for its own
        pipeline's last step, not for the VAE decodes we add, nor for the img2img/inpaint siblings,
        nor when a call fails)."""
        if self.offload == "model":
            self.pipe.maybe_free_model_hooks()
