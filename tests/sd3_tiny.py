"""A tiny random-weight Stable Diffusion 3 pipeline, built and saved locally (no network).

Same classes and layout as stabilityai/stable-diffusion-3.5-*, shrunk: two CLIP text encoders
with projection, a T5 encoder, an SD3 transformer with 16 latent channels (what the SD3 inpaint
pipeline needs), an AutoencoderKL with SD3's latent scaling *and* shift factor, and the
flow-matching Euler scheduler with SD3's shift. Images are 32 x 32; one sample takes well
under a second on one CPU core.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

IMAGE_SIZE = 32  # = transformer sample_size (16) * vae scale factor (2)
PROMPT_WORDS = ["a", "an", "red", "blue", "green", "yellow", "circle", "square", "triangle", "photo", "of", "cat"]


def _clip_tokenizer(folder: Path, max_length: int):
    """A CLIP BPE tokenizer from a small vocabulary: every letter, plus a few whole words."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges, pieces = [], set(vocab)
    for word in PROMPT_WORDS:  # merges that build each whole word left to right: "r e" -> "re", "re d</w>" -> "red</w>"
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if merged not in pieces:
                merges.append(f"{parts[0]} {parts[1]}")
                pieces.add(merged)
                vocab[merged] = len(vocab)
            parts = [merged] + parts[2:]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in PROMPT_WORDS]
    pieces += [(c, -5.0) for c in string.ascii_lowercase] + [("▁", -2.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_tiny_sd3(folder: Path | str, shift_factor: float = 0.0609, scaling_factor: float = 1.5305) -> Path:
    """Write a tiny random SD3 pipeline to `folder` with save_pretrained; return the folder.
    The VAE factors default to SD3.5's own (its vae/config.json), so the shift matters."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    folder = Path(folder)
    max_length = 16  # CLIP tokens; the real models use 77
    with tempfile.TemporaryDirectory() as vocab_folder:
        tokenizer = _clip_tokenizer(Path(vocab_folder), max_length)
    clip_config = CLIPTextConfig(vocab_size=tokenizer.vocab_size + 8, hidden_size=32, intermediate_size=37,
                                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
                                 projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")
    tokenizer_3 = _t5_tokenizer()
    t5_config = T5Config(vocab_size=tokenizer_3.vocab_size + 8, d_model=64, d_ff=64, d_kv=16, num_layers=1,
                         num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(clip_config)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config)
    text_encoder_3 = T5EncoderModel(t5_config)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
        joint_attention_dim=64,  # = T5 d_model; the two CLIP hidden states (2 x 32) are padded to it
        pooled_projection_dim=64,  # = the two CLIP projections (2 x 32) concatenated
        pos_embed_max_size=IMAGE_SIZE // 2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=16, norm_num_groups=4, sample_size=IMAGE_SIZE, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=shift_factor, scaling_factor=scaling_factor)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(folder)
    return folder


# --- shared by the bridge tests -------------------------------------------------------------------

def pixels(images):
    """PIL images -> one uint8 array (N, H, W, 3), to compare exactly."""
    import numpy as np

    return np.stack([np.asarray(im) for im in images])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def diffusers_pipe(folder, kind: str = "sample", **kwargs):
    """diffusers' own SD3 pipeline of `kind` ("sample", "img2img", "inpaint"), loaded on its own from `folder`."""
    import diffusers

    cls = {"sample": diffusers.StableDiffusion3Pipeline, "img2img": diffusers.StableDiffusion3Img2ImgPipeline,
           "inpaint": diffusers.StableDiffusion3InpaintPipeline}[kind]
    pipe = cls.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_lora(pipeline_folder: Path | str, out: Path | str, rank: int = 4, seed: int = 1) -> Path:
    """A LoRA for the tiny transformer's attention projections, made with peft (random A and B,
    so that it visibly changes the output) and saved as diffusers saves SD3 LoRAs; returns `out`."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = SD3Transformer2DModel.from_pretrained(Path(pipeline_folder) / "transformer")
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusion3Pipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return Path(out)
