"""Pictures in and out: pictures <-> tensors (a picture's pixels 0..255 are the tensor's values in
[-1, 1], what the model learns and samples), a user's image or mask loaded with clear errors, grids
with labels, enlarged small images, inpainting's paste-back."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

DISPLAY_SIZE = 96  # pixels a small image is enlarged to (at least), nearest neighbour


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float tensor (B, 3, H, W) in [-1, 1] -> list of PIL RGB images."""
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in array]


class ImageInputError(ValueError):
    """A user-supplied image or mask that cannot be used; the message says why."""


def open_image(image, what: str = "image") -> Image.Image:
    """A PIL image or a path -> PIL image in its own mode; a clear ImageInputError otherwise."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                return opened.copy()  # copy() reads the pixels before the file closes
        except FileNotFoundError:
            raise ImageInputError(f"{what} file not found: {image}") from None
        except (UnidentifiedImageError, OSError) as error:
            raise ImageInputError(f"{what} file {image} is not a readable image ({error})") from None
    if not isinstance(image, Image.Image):
        raise ImageInputError(f"{what} must be a PIL image or a path, got {type(image).__name__}")
    return image


def _resize(image: Image.Image, size, what: str, resample) -> Image.Image:
    size = (size, size) if isinstance(size, int) else tuple(size)
    if image.size != size:
        warnings.warn(f"{what} of size {image.size[0]}x{image.size[1]} resized to {size[0]}x{size[1]}", stacklevel=4)
        image = image.resize(size, resample)
    return image


def load_image(image, size: int | tuple[int, int] | None = None, what: str = "image") -> Image.Image:
    """A PIL image or a path -> RGB PIL image, resized to `size` (with a warning) when given."""
    image = open_image(image, what).convert("RGB")
    return image if size is None else _resize(image, size, what, Image.Resampling.BICUBIC)


def load_mask(mask, size: int | tuple[int, int] | None = None, image_size: tuple[int, int] | None = None,
              what: str = "mask_image") -> Image.Image:
    """An inpainting mask (PIL image or path, any mode) -> binary "L" image: 255 where the
    pixel is replaced (white), 0 where it is kept (black), thresholded at 0.5 as diffusers'
    mask processor does. `image_size`, when given, must equal the mask's own size (we refuse
    to guess how a mask of another shape lines up with the image); then it is resized to `size`."""
    mask = open_image(mask, what).convert("L")
    if image_size is not None and mask.size != tuple(image_size):
        raise ImageInputError(f"{what} is {mask.size[0]}x{mask.size[1]} but image is {image_size[0]}x{image_size[1]}; "
                              "give a mask the size of the image")
    if size is not None:
        mask = _resize(mask, size, what, Image.Resampling.BILINEAR)
    return mask.point(lambda v: 255 if v >= 128 else 0)  # v / 255 >= 0.5 -> white


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """Binary "L" mask -> bool tensor (1, H, W), True where the pixel is replaced."""
    return torch.from_numpy(np.asarray(mask.convert("L")) >= 128)[None]


def noise_to_pil(noise: torch.Tensor, std_range: float = 2.0) -> list[Image.Image]:
    """Noise-like tensors (B, 3, H, W), roughly N(0, 1) -> PIL images, +-`std_range` mapped to white/black."""
    return tensor_to_pil(noise / std_range)


def scale_for(image: Image.Image) -> int:
    """The whole factor that enlarges `image` to about DISPLAY_SIZE pixels a side."""
    return max(1, DISPLAY_SIZE // image.size[0])


def grid_columns(count: int, group: int = 1) -> int:
    """Columns for an about-square grid of `count` tiles: ceil(sqrt(count)), except that
    `group` tiles in a row (one prompt's images) are kept when that is at most twice as wide."""
    square = math.ceil(math.sqrt(count))
    return group if 1 < group <= 2 * square else square


def enlarge(image: Image.Image, scale: int) -> Image.Image:
    """`scale` times larger, nearest neighbour: each pixel stays a visible square."""
    return image if scale == 1 else image.resize((image.size[0] * scale, image.size[1] * scale),
                                                 Image.Resampling.NEAREST)


def make_grid(images: list[Image.Image], labels: list[str] | None = None, columns: int | None = None,
              scale: int = 1) -> Image.Image:
    """Lay images out in a grid, each (optionally) with a text label underneath."""
    columns = columns or len(images)
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size[0] * scale, images[0].size[1] * scale
    font = ImageFont.load_default()
    label_h = 12 if labels else 0
    if labels:  # widen cells so the longest label fits
        w = max(w, max(int(ImageDraw.Draw(images[0]).textlength(lbl, font=font)) + 4 for lbl in labels))
    grid = Image.new("RGB", (columns * w, rows * (h + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % columns) * w, (i // columns) * (h + label_h)
        tile = image.resize((images[0].size[0] * scale, images[0].size[1] * scale), Image.Resampling.NEAREST)
        grid.paste(tile, (x + (w - tile.size[0]) // 2, y))
        if labels:
            draw.text((x + 2, y + h), labels[i], fill=(0, 0, 0), font=font)
    return grid


def paste_kept(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """Inpainting's paste-back: `generated` where `mask` is white, `original` exactly where it is black."""
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), mask)
