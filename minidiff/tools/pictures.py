"""Pictures for people: grids with labels, enlarged small images, inpainting's paste-back."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

DISPLAY_SIZE = 96  # pixels a small image is enlarged to (at least), nearest neighbour


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
