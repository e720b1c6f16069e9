"""Text conditioning: a word-level tokenizer and a small transformer encoder.

The encoder is trained jointly with the UNet (no pretrained CLIP: the toy captions use a few dozen words).
Its output, one vector per token, is what the UNet's cross-attention reads. The empty prompt encodes
to the unconditional embedding used by classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
UNKNOWN_WORDS_WARNING = "ignoring words the model was not trained on"  # then ": " and the words


class Tokenizer:
    """Lower-cased words -> integer ids, padded to `max_length`; unknown words dropped with one warning."""

    def __init__(self, vocab: list[str], max_length: int = 16):
        self.vocab = [PAD, BOS, EOS] + [w for w in vocab if w not in (PAD, BOS, EOS)]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = max_length

    @classmethod
    def from_captions(cls, captions, max_length: int | None = None) -> "Tokenizer":
        words = sorted({w for c in captions for w in cls.split(c)})
        longest = max((len(cls.split(c)) for c in captions), default=0)
        return cls(words, max_length=max_length or longest + 2)

    @staticmethod
    def split(text: str) -> list[str]:
        """Lower-cased words; the article "an" is read as "a" (captions say "a orange ...")."""
        return ["a" if w == "an" else w for w in re.findall(r"[a-z0-9']+", text.lower())]

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in self.split(text) if w not in self.index]

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (ids (B, L) int64, mask (B, L) bool, True where a real token is)."""
        unknown = sorted({w for t in texts for w in self.unknown_words(t)})
        if unknown:
            warnings.warn(f"{UNKNOWN_WORDS_WARNING}: {', '.join(unknown)}", stacklevel=2)
        ids = torch.full((len(texts), self.max_length), self.index[PAD], dtype=torch.int64)
        for row, text in enumerate(texts):
            tokens = [BOS] + [w for w in self.split(text) if w in self.index][: self.max_length - 2] + [EOS]
            ids[row, : len(tokens)] = torch.tensor([self.index[w] for w in tokens])
        return ids, ids != self.index[PAD]


@dataclass
class TextEncoderConfig:
    vocab_size: int = 32
    max_length: int = 16
    dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    clip_init: bool = False  # words start N(0, 1) (nn.Embedding's), or at std 0.02 as the positions (CLIP's)


class TextEncoder(nn.Module):
    """Token + position embeddings, then a pre-norm transformer encoder: (B, L) -> (B, L, dim)."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        if config.clip_init:  # else words 50x the positions: a near bag of words, blind to order (BENCHMARKS §9)
            nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.position_embedding = nn.Parameter(torch.randn(config.max_length, config.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(config.dim, config.num_heads, dim_feedforward=4 * config.dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(config.dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]  # (B, L, D)
        with sdpa_kernel(SDPBackend.MATH):  # bf16 flash on a CPU: 7x slower here (benchmarks/attention_kernels.py)
            x = self.encoder(x, src_key_padding_mask=~mask)
        return self.final_norm(x)
