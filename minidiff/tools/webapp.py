"""The web app's logic (`python app.py`), testable without a browser.

    model = AppModel.load("runs/shapes")                       # minidiff, or an SD3 id / folder
    for event in generate(model, "txt2img", Settings("a red circle", seed=1)):
        ...                                                     # Frame every few steps, then one Result
    build_ui(WebApp(model)).launch(css=PAGE_CSS)                # the Gradio page over the same calls

Everything here goes through the calls of `minidiff.tools.contract` (`sample`, `img2img`, `inpaint`)
on either backend. Watching the denoising is their `callback` (every few steps, decoded with a
`StepRecorder`) and `capture_steps=[0]` (the starting point), not a second sampling loop. The
call runs in a worker thread so that the page can be sent each frame while it runs.

Results are PNG files whose text chunks hold the settings, including the `sample.py` command
that makes the same picture; edits save the input picture (and mask) beside them for that command.
Gradio is imported by `build_ui` only: `pip install -e '.[app]'`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import math
import queue
import random
import shlex
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from ..text import UNKNOWN_WORDS_WARNING
from .checkpoint import atomic_write
from .cli import USER_ERRORS, open_pipeline, pick_backend
from .contract import StepRecorder
from .pictures import load_image, load_mask, make_grid, open_image

MODES = ("txt2img", "img2img", "inpaint")
BACKEND_NAMES = {"minidiff": "minidiff", "sd3": "Stable Diffusion 3 (diffusers)"}
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_IMAGES = 8
MAX_SEED = 2**32 - 1
PREVIEW_FRAMES = 20  # about this many pictures per call, live and on the step slider
PREVIEW_PIXELS = 256  # small previews are enlarged (nearest neighbour) to about this width per image
FILLER_WORDS = ("a", "an", "the")  # known to a Shapes model, but they do not say what to draw
STRENGTH_GUIDE = ("how far the picture is noised: 0.2-0.4 changes style, 0.5-0.7 keeps the composition, "
                  "above 0.8 regenerates it")


@dataclass
class Settings:
    """One request, in the page's words. None means the model's default (filled in by `AppModel.resolve`)."""
    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    num_images: int = 1
    sampler: str | None = None  # one of the model's samplers
    height: int | None = None  # a size the model can make (a minidiff model: its trained size)
    width: int | None = None
    strength: float | None = None  # img2img and inpaint


@dataclass
class Frame:
    """The picture after `step` of `total` denoising steps; x_t and pred_x0 as grids (pred_x0 None at step 0)."""
    step: int
    total: int
    timestep: float | None
    x_t: Image.Image | None = None
    pred_x0: Image.Image | None = None


@dataclass
class Result:
    images: list[Image.Image]
    frames: list[Frame]  # the captured steps, step 0 (the start) first: what the step slider moves through
    settings: Settings
    files: list[Path] = field(default_factory=list)  # the PNGs to download (results, then input and mask)
    warnings: list[str] = field(default_factory=list)  # what the call warned about (an input resized, say)


class Cancelled(Exception):
    """Raised inside the pipeline's callback once nobody listens any more (the page was closed)."""


def whole(value, name: str, low: int, high: int | None = None) -> int:
    """A page value (Gradio numbers arrive as floats) -> int, or a ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a whole number {bound}, got {value}")
    return int(value)


def check_settings(settings: Settings, mode: str) -> Settings:
    """Refuse what no backend can use, in the page's words; -> the settings with whole numbers as ints."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not (settings.prompt or "").strip():
        raise ValueError("type a prompt first")
    values = {"seed": whole(settings.seed, "seed", 0, MAX_SEED),
              "num_images": whole(settings.num_images, "number of images", 1, MAX_IMAGES)}
    if settings.steps is not None:
        values["steps"] = whole(settings.steps, "steps", 1)
    if settings.guidance is not None and not settings.guidance >= 0:
        raise ValueError(f"guidance must be >= 0, got {settings.guidance}")
    for name in ("height", "width"):
        if getattr(settings, name) is not None:
            values[name] = whole(getattr(settings, name), name, 1)
    if mode != "txt2img" and (settings.strength is None or not 0 <= settings.strength <= 1):
        raise ValueError(f"strength must be between 0 and 1, got {settings.strength}")
    return dataclasses.replace(settings, **values)


class AppModel:
    """The one model in memory: a pipeline of either backend, its name and backend."""

    def __init__(self, pipe, name: str, backend: str):
        self.pipe, self.name, self.backend = pipe, str(name), backend

    @classmethod
    def load(cls, name: str, backend: str = "auto", device=None) -> "AppModel":
        """Load `name` (backend picked as sample.py picks it); errors are `cli.USER_ERRORS` with one clear line."""
        name = str(name).strip()
        if not name:
            raise ValueError("give a model: a folder written by train.py, or an SD3 Hugging Face id or folder")
        backend = pick_backend(name, backend)
        return cls(open_pipeline(name, backend, device), name, backend)

    def resolve(self, settings: Settings, mode: str) -> Settings:
        """Check the settings and fill in the model's defaults, so that what is saved is what ran."""
        settings = check_settings(settings, mode)
        steps, guidance = self.pipe.defaults(settings.steps, settings.guidance)
        height, width = self.pipe.size(settings.height, settings.width)
        return dataclasses.replace(settings, steps=steps, guidance=float(guidance), height=height, width=width,
                                   sampler=self.pipe.check_sampler(settings.sampler),
                                   strength=settings.strength if mode != "txt2img" else None)

    def steps_run(self, settings: Settings) -> int:
        """How many denoising steps the call runs: all N, or an edit's share of them."""
        return self.pipe.steps_run(settings.steps, settings.strength)

    def check_words(self, settings: Settings) -> list[str]:
        """A minidiff model knows only its captions' words and drops the others. A prompt with none
        of them (articles aside: "a pink hexagon") is refused, naming the unknown words and the
        known ones, instead of drawing what the empty prompt draws; unknown words in a prompt that
        has known ones -> one warning each for the prompt and the negative prompt. SD3's tokenizers
        read any text: nothing to check."""
        tokenizer = getattr(getattr(self.pipe, "model", None), "tokenizer", None)
        if not hasattr(tokenizer, "unknown_words"):
            return []
        known = ", ".join(w for w in tokenizer.vocab if not w.startswith("<"))  # not <pad>, <bos>, <eos>
        messages = []
        for what, text in (("prompt", settings.prompt), ("negative prompt", settings.negative_prompt or "")):
            unknown = list(dict.fromkeys(tokenizer.unknown_words(text)))
            if not unknown:
                continue
            named = ", ".join(f"'{w}'" for w in unknown)
            useful = [w for w in tokenizer.split(text) if w not in unknown and w not in FILLER_WORDS]
            if what == "prompt" and not useful:
                words = "the word" if len(unknown) == 1 else "the words"
                raise ValueError(f"this model does not know {words} {named}, so the prompt names nothing it can "
                                 f"draw; it knows only: {known}")
            messages.append(f"{what}: ignoring {named}, unknown to this model; it knows only: {known}")
        return messages

    def call(self, mode: str, settings: Settings, image=None, mask=None, **watch):
        """The contract's call for `mode`, with the resolved settings and the same generator sample.py seeds."""
        common = dict(negative_prompt=settings.negative_prompt or None, num_inference_steps=settings.steps,
                      guidance_scale=settings.guidance, generator=torch.Generator().manual_seed(settings.seed),
                      num_images_per_prompt=settings.num_images, sampler=settings.sampler, height=settings.height,
                      width=settings.width, **watch)
        if mode == "txt2img":
            return self.pipe.sample(settings.prompt, **common)
        if mode == "img2img":
            return self.pipe.img2img(settings.prompt, image, strength=settings.strength, **common)
        return self.pipe.inpaint(settings.prompt, image, mask, strength=settings.strength, **common)


# --- watching a call ----------------------------------------------------------------------------

def preview_steps(total: int, frames: int = PREVIEW_FRAMES) -> list[int]:
    """The steps shown: 0 (the start), then every ceil(total / frames) steps, and always the last."""
    every = max(1, -(-total // frames))
    return sorted({0, *range(every, total, every), total})


def preview(images: list[Image.Image] | None) -> Image.Image | None:
    """A batch of pictures as one grid, small ones enlarged without blurring."""
    if not images:
        return None
    return make_grid(images, columns=min(len(images), 4), scale=max(1, PREVIEW_PIXELS // images[0].size[0]))


def _frame(record: dict, total: int) -> Frame:
    """A `capture_steps` trace record -> Frame."""
    timestep = None if record["timestep"] is None else float(record["timestep"])
    return Frame(record["step"], total, timestep, preview(record["x_t"]), preview(record["pred_x0"]))


def generate(model: AppModel, mode: str, settings: Settings, image=None, mask=None,
             frames: int = PREVIEW_FRAMES) -> Iterator[Frame | Result]:
    """Run one call in a worker thread; yield a Frame after every step (with pictures every few
    steps, None in between: for a progress bar), then one Result. Closing the generator stops the
    call at its next step. Bad settings raise ValueError before anything runs."""
    settings = model.resolve(settings, mode)
    said = model.check_words(settings)  # unknown words: the page's own message, not the tokenizer's
    if mode != "txt2img" and image is None:
        raise ValueError("upload a picture to start from first")
    if mask is not None:  # a thin stroke on a big upload can vanish when the mask shrinks to the model's size
        size = model.pipe.image_size
        if not np.asarray(load_mask(mask, size)).any():
            raise ValueError(f"the mask is empty at the model's {size}x{size}: paint a larger area")
    total = model.steps_run(settings)
    shown = [k for k in preview_steps(total, frames) if k > 0]
    recorder = StepRecorder(shown, total, decode=model.pipe.decode)  # the same records capture_steps makes
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def on_step(step: dict) -> None:
        if stop.is_set():
            raise Cancelled()
        before = len(recorder.trace)
        if recorder.callback is not None:
            recorder.callback(step)
        events.put(("step", step["i"] + 1, recorder.trace[-1] if len(recorder.trace) > before else None))

    def work() -> None:
        try:
            with warnings.catch_warnings(record=True) as caught:  # e.g. "image resized": for the page to show
                warnings.simplefilter("always")
                output = model.call(mode, settings, image, mask, callback=on_step, capture_steps=[0])
            # the record is the whole process's (other threads' too): keep the calls' own kind of warning,
            # not, say, a ResourceWarning from Gradio's event loops being collected meanwhile
            events.put(("done", output, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]))
        except BaseException as error:  # handed to the page's thread, raised there
            events.put(("error", error, None))

    worker = threading.Thread(target=work, name="minidiff-generate", daemon=True)
    worker.start()
    try:
        while True:
            kind, value, record = events.get()
            if kind == "error":
                raise value
            if kind == "done":
                output, caught = value, record
                break
            yield _frame(record, total) if record is not None else Frame(value, total, None)
    finally:
        stop.set()
        worker.join()
    trace = [_frame(r, total) for r in output.trace + recorder.trace]
    caught = said + [m for m in caught if not (said and m.startswith(UNKNOWN_WORDS_WARNING))]
    yield Result(images=output.images, frames=trace, settings=settings, warnings=caught)


# --- the pictures the page receives ---------------------------------------------------------------

def mask_from_editor(value) -> tuple[Image.Image, Image.Image]:
    """Gradio's ImageEditor value {"background", "layers", "composite"} -> (picture RGB, mask "L").
    Whatever was painted, in any colour, on any layer, is white (replaced); the rest is black (kept)."""
    if not isinstance(value, dict) or value.get("background") is None:
        raise ValueError("upload a picture to paint on first")
    background = load_image(value["background"])
    painted = np.zeros((background.size[1], background.size[0]), dtype=bool)  # (H, W)
    for layer in value.get("layers") or ():
        layer = open_image(layer, "mask layer").convert("RGBA")
        if layer.size != background.size:  # the canvas is the picture's size; be safe if it is not
            layer = layer.resize(background.size, Image.Resampling.NEAREST)
        painted |= np.asarray(layer)[..., 3] > 0
    if not painted.any():
        raise ValueError("no mask: paint over the part of the picture to replace (white is replaced)")
    return background, Image.fromarray(np.where(painted, 255, 0).astype(np.uint8), mode="L")


def brush_radius(width: int, height: int, model_size: int) -> int:
    """The brush's default radius in the picture's pixels: one stroke is two of the model's pixels
    wide once the picture is shrunk to the model's size (a 64 px upload on a 16 px model: radius 4,
    where a fixed 2 px brush left an empty mask), and at least 1/16 of the picture on a big model."""
    side = min(width, height)
    return max(2, math.ceil(side / min(model_size, 32)))


def frame_at(frames: list[Frame], value, shown: int | None = None) -> int:
    """The step slider counts denoising steps, but only some are captured (every 3rd of 50, say):
    -> the index of the frame to show at `value`. A captured step is itself; moving up from the
    step `shown`, the next captured one; moving down, the one before (so the arrow keys walk
    through the captured steps); without a direction, the nearest."""
    steps = [f.step for f in frames]
    value = int(round(value))
    if value in steps:
        return steps.index(value)
    if shown is not None and value > shown:
        return next((i for i, s in enumerate(steps) if s > value), len(steps) - 1)
    if shown is not None and value < shown:
        return max((i for i, s in enumerate(steps) if s < value), default=0)
    return min(range(len(steps)), key=lambda i: abs(steps[i] - value))


class PreviewFiles:
    """Pictures for the page as PNG files, each written once under its content's hash. Gradio serves
    what a handler returns from its cache; a PIL picture is (re)written there every time it is
    returned, so sending the same picture twice (the last live frame again with the result, a step
    on the slider revisited) truncated and rewrote a file the browser was still reading:
    uvicorn's "Too little data for declared Content-Length". A path is copied into the cache once."""

    def __init__(self, folder=None):
        self.folder = Path(folder or tempfile.mkdtemp(prefix="minidiff-previews-"))

    def __call__(self, image: Image.Image | None) -> str | None:
        if image is None:
            return None
        data = io.BytesIO()
        image.save(data, format="png")
        path = self.folder / f"{hashlib.sha256(data.getvalue()).hexdigest()[:32]}.png"
        if not path.exists():  # written under another name, then renamed: never seen half-written
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(data.getvalue()))
        return str(path)


# --- saving: PNG text chunks that reproduce the result ---------------------------------------------

def sample_command(model: AppModel, mode: str, settings: Settings, out: str) -> str:
    """The sample.py command line that makes the same picture (a grid when num_images > 1); for an
    edit it reads input.png (and mask.png), which `save_result` writes beside the result.
    Numbers are written with repr, so a float comes back exactly."""
    s = settings
    args = ["python", "sample.py", "--model", model.name, "--backend", model.backend, "--prompt", s.prompt]
    if s.negative_prompt:
        args += ["--negative-prompt", s.negative_prompt]
    args += ["--steps", str(s.steps), "--guidance", repr(s.guidance), "--seed", str(s.seed),
             "--num-images", str(s.num_images)]
    args += ["--sampler", s.sampler, "--height", str(s.height), "--width", str(s.width)]
    if mode != "txt2img":
        args += ["--image", "input.png"] + (["--mask", "mask.png"] if mode == "inpaint" else [])
        args += ["--strength", repr(s.strength)]
    if s.num_images == 1:
        args += ["--raw-size"]  # the app saves a single picture at the model's size, not enlarged
    return shlex.join(args + ["--out", out])


def png_text(model: AppModel, mode: str, settings: Settings, index: int, command: str) -> dict[str, str]:
    """The text chunks of a result: each setting under its own key, plus "parameters" in the
    one-paragraph form the usual Stable Diffusion front ends write and read."""
    s = settings
    parameters = (f"{s.prompt}\nNegative prompt: {s.negative_prompt}\nSteps: {s.steps}, Sampler: {s.sampler}, "
                  f"CFG scale: {s.guidance:g}, Seed: {s.seed}, Size: {s.width}x{s.height}, Model: {model.name}")
    if s.strength is not None:
        parameters += f", Denoising strength: {s.strength:g}"
    text = {"parameters": parameters, "mode": mode, "prompt": s.prompt, "negative_prompt": s.negative_prompt,
            "seed": str(s.seed), "steps": str(s.steps), "guidance_scale": repr(s.guidance), "sampler": s.sampler,
            "model": model.name, "backend": model.backend, "num_images": str(s.num_images),
            "image_index": str(index), "sample.py": command}
    if s.strength is not None:
        text["strength"] = repr(s.strength)
    return text


def save_result(result: Result, model: AppModel, mode: str, folder, image=None, mask=None) -> list[Path]:
    """Write result-N.png (with text chunks), and for edits input.png (and mask.png), into a new
    subfolder of `folder` (nothing there is overwritten). -> the paths, also set on `result.files`."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{mode}-seed{result.settings.seed}-", dir=folder))
    files = []
    if mode != "txt2img":
        files.append(folder / "input.png")
        load_image(image).save(files[-1])
    if mode == "inpaint":
        files.append(folder / "mask.png")
        load_mask(mask).save(files[-1])
    grid = "sample.png" if len(result.images) == 1 else "grid.png"
    command = sample_command(model, mode, result.settings, grid)
    names = [f"{mode}-{i + 1}.png" for i in range(len(result.images))]
    for i, (picture, name) in enumerate(zip(result.images, names)):
        info = PngImagePlugin.PngInfo()
        for key, value in png_text(model, mode, result.settings, i, command).items():
            info.add_itxt(key, value)  # iTXt: UTF-8, so any prompt survives
        picture.save(folder / name, pnginfo=info)
    result.files = [folder / name for name in names] + files
    return result.files


# --- the page --------------------------------------------------------------------------------------

def host_warning(host: str) -> str | None:
    """One line for a --host other than this machine: anyone who can reach it can use the GPU."""
    if host in LOCAL_HOSTS:
        return None
    return (f"warning: serving on {host}: anyone on the network who can reach this machine can use the app "
            f"and its GPU (the default, 127.0.0.1, serves this machine only)")


class WebApp:
    """The page's handlers over the one model in memory, as plain generators: `build_ui` wires them
    to Gradio components; tests call them directly. A user's mistake becomes `gr.Error` (one line
    in the page), and the app keeps serving."""

    def __init__(self, model: AppModel, out_dir=None, device=None):
        self.model, self.device = model, device
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="minidiff-app-"))
        self.previews = PreviewFiles()  # x_t and pred_x0 as files: see PreviewFiles

    def _error(self, error: BaseException):
        import gradio as gr

        return gr.Error(str(error), print_exception=False)

    def load(self, name: str, backend: str = "auto") -> str:
        """Replace the model in memory; on failure keep the old one and say why."""
        try:
            model = AppModel.load(name, backend, self.device)
        except USER_ERRORS as error:
            raise self._error(error) from None
        self.model = None  # let the old one go before the new one settles in
        self.model = model
        return self.describe()

    def describe(self) -> str:
        m = self.model
        return f"**Model:** `{m.name}` ({BACKEND_NAMES[m.backend]}, {m.pipe.image_size}x{m.pipe.image_size})"

    def generate(self, mode: str, settings: Settings, picture=None, progress=None) -> Iterator[tuple]:
        """-> (text, live x_t, live pred_x0, result pictures or None, files or None, frames or None)
        once per frame (text: the step), then once at the end with the results, files and every
        captured frame (text: the seed used and the sample.py command). x_t and pred_x0 are PNG
        files (`PreviewFiles`). Warnings of the call (an input resized, unknown words) are shown in
        the page with `gr.Warning`."""
        import gradio as gr

        mask = None
        try:
            if mode == "inpaint":
                picture, mask = mask_from_editor(picture)
            elif mode == "img2img":
                if picture is None:
                    raise ValueError("upload a picture to start from first (or send a result here)")
                picture = load_image(picture)
            with contextlib.closing(generate(self.model, mode, settings, picture, mask)) as events:
                for event in events:
                    if isinstance(event, Result):
                        break
                    if progress is not None:
                        progress((event.step, event.total), desc="denoising")
                    if event.x_t is not None:
                        yield (frame_label(event), self.previews(event.x_t), self.previews(event.pred_x0),
                               None, None, None)
            result = event
            files = save_result(result, self.model, mode, self.out_dir, picture, mask)
        except USER_ERRORS as error:
            raise self._error(error) from None
        for message in result.warnings:
            gr.Warning(message)
        last = result.frames[-1]
        status = f"seed {result.settings.seed} · `{sample_command(self.model, mode, result.settings, 'sample.png')}`"
        yield (status, self.previews(last.x_t), self.previews(last.pred_x0),
               [str(f) for f in files[:len(result.images)]], [str(f) for f in files], result.frames)

    def show(self, value, frames: list[Frame], shown: int | None = None) -> tuple:
        """The step slider moved to `value` (a step number) -> (the step's label, x_t and pred_x0 files,
        the captured step shown, which the slider snaps to; see `frame_at`)."""
        frame = frames[frame_at(frames, value, shown)]
        return frame_label(frame), self.previews(frame.x_t), self.previews(frame.pred_x0), frame.step


def frame_label(frame: Frame) -> str:
    t = "" if frame.timestep is None else f", t = {frame.timestep:g}"
    return f"step {frame.step} of {frame.total}{t}"


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


# Small pictures (minidiff's 32 px) are shown enlarged, their pixels kept sharp instead of blurred.
PAGE_CSS = """.pixels img, .pixels canvas { image-rendering: pixelated; }
#img2img-picture img { width: 100%; height: 100%; object-fit: contain; }"""
PICTURE_HEIGHT = 320  # the picture to edit: with the prompt and Generate under it, in a 1280x720 window


@functools.cache
def page_class():
    """gr.Blocks whose launch() names app.py's --share in its start-up lines, where Gradio's say
    "set `share=True` in `launch()`", which the app's user has no way to do."""
    import gradio as gr

    class Page(gr.Blocks):
        def launch(self, *args, quiet: bool = False, prevent_thread_lock: bool = False, **kwargs):
            launched = super().launch(*args, quiet=True, prevent_thread_lock=True, **kwargs)
            if not quiet:  # Gradio still prints a share link's own lines
                print(f"* Running on local URL:  {self.local_url}")
                if not self.share:
                    print("* To create a public link, run app.py with --share.")
            if not prevent_thread_lock:
                self.block_thread()
            return launched

    return Page


def build_ui(app: WebApp):
    """The Gradio Blocks page: three tabs over `app`, one generation at a time (a shared queue).
    Launch it with `css=PAGE_CSS`."""
    import gradio as gr

    with page_class()(title="minidiff", analytics_enabled=False) as demo:  # a local app: nothing sent elsewhere
        with gr.Row(equal_height=True):  # one line above the tabs, so that Generate stays in sight
            gr.Markdown("## minidiff: watch a picture denoise")
            status = gr.Markdown(app.describe(), elem_id="model-status")
        with gr.Tabs() as tabs:
            panels = {mode: _panel(gr, app, mode, label) for mode, label in
                      (("txt2img", "Text to image"), ("img2img", "Image to image"), ("inpaint", "Inpainting"))}
        # below the tabs, Load on the left: Gradio's messages pile up from the top right of the
        # window, where they covered the Load button of a row at the top
        with gr.Row():
            load_button = gr.Button("Load", scale=0, min_width=160, elem_id="load")
            model_box = gr.Textbox(app.model.name, label="Model", scale=4, elem_id="model-name",
                                   info="a folder written by train.py, or an SD3 Hugging Face id or folder")
            backend_box = gr.Dropdown(["auto", "minidiff", "sd3"], value="auto", label="Backend", scale=1)

        def send(files, index, target):
            path = _picked(files, index)
            if target == "inpaint":  # a brush that fits the picture, as after an upload
                with Image.open(path) as picture:
                    path = gr.ImageEditor(value=path, brush=_brush(gr, brush_radius(*picture.size,
                                                                                    app.model.pipe.image_size)))
            return path, gr.Tabs(selected=target)

        for target in ("img2img", "inpaint"):  # "send to" buttons under every gallery
            for panel in panels.values():
                panel["send"][target].click(lambda files, i, target=target: send(files, i, target),
                                            [panel["gallery_files"], panel["picked"]],
                                            [panels[target]["picture"], tabs], queue=False)

        def load(name, backend):
            text = app.load(name, backend)
            pipe, updates = app.model.pipe, []
            resizable = pipe.size_multiple is not None
            for _ in panels:
                updates += [gr.Dropdown(choices=list(pipe.samplers), value=pipe.samplers[0],
                                        visible=len(pipe.samplers) > 1),
                            gr.Number(value=pipe.image_size, visible=resizable),
                            gr.Number(value=pipe.image_size, visible=resizable),
                            gr.Number(value=pipe.default_num_inference_steps),
                            gr.Number(value=pipe.default_guidance_scale)]
            return [text] + updates

        load_outputs = [status] + [c for p in panels.values()
                                   for c in (p["sampler"], p["height"], p["width"], p["steps"], p["guidance"])]
        _after_failure(gr, load_button.click(load, [model_box, backend_box], load_outputs, concurrency_limit=1,
                                             concurrency_id="model"), load_outputs)
    demo.queue(default_concurrency_limit=1)
    return demo


def _after_failure(gr, event, outputs) -> None:
    """After a failed call Gradio marks every output with a red "Error" until the next run; the
    message itself is already shown (a toast), so a quick no-op update clears the marks."""
    event.failure(lambda: [gr.skip()] * len(outputs), None, outputs, queue=False, show_progress="hidden")


def _brush(gr, radius: int):
    return gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=radius)


def _picked(files, index):
    if not files:
        import gradio as gr

        raise gr.Error("generate a picture first", print_exception=False)
    return files[min(index or 0, len(files) - 1)]


def _panel(gr, app: WebApp, mode: str, label: str) -> dict:
    """One tab: the settings on the left; results, the live pictures and the step slider on the right."""
    m = app.model
    size = m.pipe.image_size
    c = {}
    with gr.Tab(label, id=mode, elem_id=f"tab-{mode}"):
        with gr.Row():
            with gr.Column(scale=1):
                if mode == "img2img":
                    c["picture"] = gr.Image(type="pil", image_mode="RGB", label="Start from", format="png",
                                            sources=["upload", "clipboard"], height=PICTURE_HEIGHT,
                                            elem_id=f"{mode}-picture", elem_classes=["pixels"])
                elif mode == "inpaint":
                    c["picture"] = gr.ImageEditor(type="pil", image_mode="RGBA", format="png",
                                                  label="Paint the region to replace (white is replaced)",
                                                  sources=["upload", "clipboard"], layers=False, transforms=(),
                                                  brush=_brush(gr, brush_radius(size, size, size)),
                                                  height=PICTURE_HEIGHT, elem_id=f"{mode}-picture",
                                                  elem_classes=["pixels"])
                with gr.Row(equal_height=True):  # Generate beside the prompt: in sight without scrolling
                    c["prompt"] = gr.Textbox(label="Prompt", lines=1, scale=3, elem_id=f"{mode}-prompt")
                    c["run"] = gr.Button("Generate", variant="primary", scale=1, elem_id=f"{mode}-run")
                c["negative"] = gr.Textbox(label="Negative prompt", elem_id=f"{mode}-negative")
                if mode != "txt2img":
                    c["strength"] = gr.Slider(0, 1, value=0.7 if mode == "img2img" else 0.99, step=0.01,
                                              label="Strength", info=STRENGTH_GUIDE, elem_id=f"{mode}-strength")
                with gr.Row():
                    c["steps"] = gr.Number(m.pipe.default_num_inference_steps, label="Steps", precision=0,
                                           elem_id=f"{mode}-steps")
                    c["guidance"] = gr.Number(m.pipe.default_guidance_scale, label="Guidance",
                                              elem_id=f"{mode}-guidance")
                    c["num_images"] = gr.Number(1, label="Images", precision=0, elem_id=f"{mode}-num-images")
                with gr.Row():
                    c["seed"] = gr.Number(0, label="Seed", precision=0, elem_id=f"{mode}-seed")
                    c["random"] = gr.Button("Random seed", elem_id=f"{mode}-random")
                c["sampler"] = gr.Dropdown(list(m.pipe.samplers), value=m.pipe.samplers[0], label="Sampler",
                                           visible=len(m.pipe.samplers) > 1, elem_id=f"{mode}-sampler")
                with gr.Row():
                    resizable = m.pipe.size_multiple is not None
                    c["height"] = gr.Number(size, label="Height", precision=0, visible=resizable)
                    c["width"] = gr.Number(size, label="Width", precision=0, visible=resizable)
            with gr.Column(scale=1):
                c["gallery"] = gr.Gallery(label="Result (PNG with its settings)", columns=4, format="png",
                                          height=320, fit_columns=False, elem_id=f"{mode}-gallery",
                                          elem_classes=["pixels"])
                c["status"] = gr.Markdown(elem_id=f"{mode}-status")  # the seed used, the sample.py command
                with gr.Row():
                    c["x_t"] = gr.Image(label="x_t", format="png", interactive=False, elem_id=f"{mode}-x")
                    c["x0"] = gr.Image(label="predicted x_0", format="png", interactive=False, elem_id=f"{mode}-x0")
                c["slider"] = gr.Slider(0, 1, value=0, step=1, label="Denoising step (drag back through them)",
                                        interactive=False, elem_id=f"{mode}-slider")
                c["step"] = gr.Markdown(elem_id=f"{mode}-step")  # which step the pictures above show
                c["files"] = gr.File(label="Download", file_count="multiple", elem_id=f"{mode}-files")
                with gr.Row():
                    c["send"] = {target: gr.Button(f"Send to {name}", size="sm", elem_id=f"{mode}-send-{target}")
                                 for target, name in (("img2img", "image to image"), ("inpaint", "inpainting"))}
        c["frames"] = gr.State([])
        c["shown"] = gr.State(None)  # the step the slider shows
        c["gallery_files"] = gr.State([])
        c["picked"] = gr.State(0)
        for name in ("strength", "picture"):  # text to image has neither
            c.setdefault(name, gr.State(None))

    c["random"].click(random_seed, None, c["seed"], queue=False)
    def selected(event):
        return event.index

    selected.__annotations__ = {"event": gr.SelectData}  # how Gradio knows to pass the event (a real class,
    c["gallery"].select(selected, None, c["picked"], queue=False)  # not the string this module's annotations are)

    if mode == "inpaint":
        def fit_brush(value):
            background = value.get("background") if isinstance(value, dict) else None
            if background is None:
                return gr.skip()
            return gr.ImageEditor(brush=_brush(gr, brush_radius(*background.size, app.model.pipe.image_size)))

        c["picture"].upload(fit_brush, c["picture"], c["picture"], queue=False, show_progress="hidden")

    def run(prompt, negative, steps, guidance, seed, num_images, sampler, height, width, strength, picture,
            progress=gr.Progress()):
        settings = Settings(prompt, negative or "", steps, guidance, seed, num_images, sampler, height, width, strength)
        for text, x_t, x0, pictures, files, frames in app.generate(mode, settings, picture, progress):
            if frames is None:
                yield gr.skip(), text, x_t, x0, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            else:
                total = frames[-1].total  # the slider counts denoising steps, not captured frames
                yield (text, frame_label(frames[-1]), x_t, x0, pictures, files, frames, pictures,
                       gr.Slider(0, total, value=total, step=1, interactive=len(frames) > 1), total)

    inputs = [c["prompt"], c["negative"], c["steps"], c["guidance"], c["seed"], c["num_images"], c["sampler"],
              c["height"], c["width"], c["strength"], c["picture"]]
    outputs = [c["status"], c["step"], c["x_t"], c["x0"], c["gallery"], c["files"], c["frames"], c["gallery_files"],
               c["slider"], c["shown"]]
    for trigger in (c["run"].click, c["prompt"].submit):
        _after_failure(gr, trigger(run, inputs, outputs, concurrency_limit=1, concurrency_id="model"), outputs)

    def show(value, frames, shown):
        if not frames:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        label, x_t, x0, step = app.show(value, frames, shown)
        return label, x_t, x0, step, step

    c["slider"].input(show, [c["slider"], c["frames"], c["shown"]], [c["step"], c["x_t"], c["x0"], c["slider"],
                                                                     c["shown"]], queue=False)
    return c
