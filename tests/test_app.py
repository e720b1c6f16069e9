"""The web app's handlers without a browser (minidiff/tools/webapp.py): frames while a call runs,
the step history, PNGs whose text chunks make sample.py draw the same picture, bad input as one
gr.Error, one generation at a time. The handlers run on both tiny minidiff models, DDPM and
rectified flow (the `model` fixture), and on the tiny SD3. The browser: tests/test_app_browser.py."""

from __future__ import annotations

import shlex
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")

from minidiff.tools.shapes import Shapes  # noqa: E402
from minidiff.tools.cli import run as run_cli  # noqa: E402
from minidiff.tools.webapp import (AppModel, Frame, PreviewFiles, Result, Settings, WebApp, build_ui,  # noqa: E402
                                   frame_at, frame_label, generate, host_warning, mask_from_editor, preview,
                                   preview_steps, save_result)

STEPS = 6


@pytest.fixture(scope="module", params=["ddpm", "flow"])
def model(request):
    """The app's model in memory: each tiny minidiff model in turn, the DDPM one and the flow one."""
    folder = request.getfixturevalue({"ddpm": "tiny_model_dir", "flow": "tiny_flow_model_dir"}[request.param])
    return AppModel.load(str(folder), device="cpu")


@pytest.fixture(scope="module")
def ddpm_model(tiny_model_dir):
    """For what does not depend on the model's objective (the page's wiring, the command line)."""
    return AppModel.load(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def picture():
    return Shapes(16, seed=3).pil_and_caption(0)[0]  # the tiny model's size


def painted(size, box, colour=(255, 255, 255, 255)) -> Image.Image:
    """An ImageEditor layer: transparent, with `box` painted."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    layer.paste(Image.new("RGBA", (box[2] - box[0], box[3] - box[1]), colour), box[:2])
    return layer


def reproduce(png_path, tmp_path) -> Image.Image:
    """Run the sample.py command stored in a result's text chunks (in the result's folder, where
    input.png and mask.png lie) and return what it drew."""
    import os

    import sample

    argv = shlex.split(Image.open(png_path).text["sample.py"])
    assert argv[:2] == ["python", "sample.py"]
    out = tmp_path / "again.png"
    argv = argv[2:-2] + ["--out", str(out)]
    cwd = os.getcwd()
    os.chdir(png_path.parent)
    try:
        assert run_cli(sample.main, argv) == 0
    finally:
        os.chdir(cwd)
    return Image.open(out).convert("RGB")


def test_preview_steps():
    assert preview_steps(6, 3) == [0, 2, 4, 6]
    assert preview_steps(7, 3) == [0, 3, 6, 7]  # the last step always
    assert preview_steps(2, 20) == [0, 1, 2]
    assert preview_steps(0) == [0]  # strength 0: only the start


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_an_edits_progress_counts_the_steps_the_call_really_runs(model, picture, mode):
    """At 50 steps and strength 0.99 a DDPM model runs int(50 * 0.99) = 49 steps, a flow model
    50 - int(50 - 49.5) = 50 (SD3's rule). The page's "step k of N" must say the N the call really
    runs: every frame's total, and the last step shown, equal the number of steps the pipeline's
    callback saw (the app once kept its own copy of the DDPM rule, and said 49 for flow models)."""
    made = []
    callback_steps = []
    call = model.call

    def counting(mode, settings, image=None, mask=None, callback=None, **watch):
        made.append(1)
        return call(mode, settings, image, mask, callback=lambda step: (callback_steps.append(step["i"]),
                                                                        callback(step)), **watch)

    model.call = counting
    try:
        image = picture if mode == "img2img" else {"background": picture.convert("RGBA"),
                                                   "layers": [painted(picture.size, (4, 4, 12, 10))]}
        image, mask = (image, None) if mode == "img2img" else mask_from_editor(image)
        events = list(generate(model, mode, Settings("a red circle", steps=50, seed=1, strength=0.99), image, mask))
    finally:
        del model.call  # back to the class's method
    frames, result = events[:-1], events[-1]
    runs = {"ddpm": 49, "flow": 50}[model.pipe.config.objective]
    assert made == [1] and callback_steps == list(range(runs))
    assert [f.step for f in frames] == list(range(1, runs + 1))  # one frame per step, as the progress bar
    assert {f.total for f in frames} == {runs} and {f.total for f in result.frames} == {runs}
    assert result.frames[-1].step == result.frames[-1].total == runs  # the slider ends on "step N of N"
    assert frame_label(frames[-1]).startswith(f"step {runs} of {runs}")


def test_txt2img_streams_frames_then_a_result_that_sample_py_reproduces(model, tmp_path):
    settings = Settings("a red circle", steps=STEPS, seed=7, num_images=2, guidance=2.718281828)  # every digit counts
    events = list(generate(model, "txt2img", settings, frames=3))
    frames, result = events[:-1], events[-1]
    assert isinstance(result, Result) and all(isinstance(f, Frame) for f in frames)
    assert [f.step for f in frames] == list(range(1, STEPS + 1))  # every step: the progress bar
    assert [f.step for f in frames if f.x_t is not None] == [2, 4, 6]  # pictures every few steps
    assert [f.step for f in result.frames] == [0, 2, 4, 6]  # the slider's history, the start first
    assert result.frames[0].pred_x0 is None and all(f.pred_x0 is not None for f in result.frames[1:])
    assert result.frames[0].timestep > result.frames[-1].timestep
    # the last frame is the result itself, and a live frame is the same picture as its history entry
    assert np.array_equal(np.asarray(result.frames[-1].x_t), np.asarray(preview(result.images)))
    assert np.array_equal(np.asarray(frames[3].x_t), np.asarray(result.frames[2].x_t))
    default_sampler = {"ddpm": "ddpm", "flow": "euler"}[model.pipe.config.objective]  # the model's own
    assert (result.settings.steps, result.settings.sampler, result.settings.guidance) == (STEPS, default_sampler,
                                                                                          2.718281828)

    files = save_result(result, model, "txt2img", tmp_path / "out")
    assert [f.name for f in files] == ["txt2img-1.png", "txt2img-2.png"]
    text = Image.open(files[1]).text
    assert text["prompt"] == "a red circle" and text["seed"] == "7" and text["image_index"] == "1"
    assert "Seed: 7" in text["parameters"] and "Steps: 6" in text["parameters"]
    # two images: sample.py draws a labelled grid, each image enlarged 6x (nearest) and centred in its cell
    argv = shlex.split(text["sample.py"])
    assert float(argv[argv.index("--guidance") + 1]) == 2.718281828  # exactly, not rounded for show
    grid, tile = np.asarray(reproduce(files[0], tmp_path)), 16 * 6
    cell = grid.shape[1] // 2
    for i, image in enumerate(result.images):
        left = i * cell + (cell - tile) // 2
        assert np.array_equal(grid[:tile:6, left:left + tile:6], np.asarray(image))


def test_inpaint_handler_keeps_the_unpainted_pixels_and_reproduces(model, picture, tmp_path):
    app = WebApp(model, tmp_path / "out")
    editor = {"background": picture.convert("RGBA"), "layers": [painted(picture.size, (4, 4, 12, 10))],
              "composite": None}
    outputs = list(app.generate("inpaint", Settings("a green square", steps=STEPS, seed=3, strength=0.99), editor))
    status, x_t, x0, pictures, files, frames = outputs[-1]
    assert all(o[3] is None for o in outputs[:-1]) and len(frames) > 2 and "seed 3" in status
    assert [f.rsplit("/", 1)[1] for f in files] == ["inpaint-1.png", "input.png", "mask.png"]
    result = np.asarray(Image.open(pictures[0]).convert("RGB"))
    mask = np.asarray(Image.open(files[2])) > 0
    assert mask.sum() == 8 * 6 and mask[4:10, 4:12].all()  # the painted box, nothing else
    assert np.array_equal(result[~mask], np.asarray(picture)[~mask])  # kept exactly
    assert not np.array_equal(result[mask], np.asarray(picture)[mask])  # regenerated
    again = reproduce(Path(pictures[0]), tmp_path)
    assert np.array_equal(np.asarray(again), result)


def test_mask_from_editor_takes_every_painted_pixel_in_any_colour(picture):
    layer = painted(picture.size, (0, 0, 3, 2), colour=(255, 0, 0, 40))  # faint red still counts
    image, mask = mask_from_editor({"background": picture, "layers": [layer, painted(picture.size, (15, 15, 16, 16))]})
    assert image.mode == "RGB" and mask.mode == "L" and mask.size == picture.size
    assert np.asarray(mask).astype(bool).sum() == 3 * 2 + 1
    with pytest.raises(ValueError, match="no mask"):
        mask_from_editor({"background": picture, "layers": [painted(picture.size, (0, 0, 0, 0))]})
    with pytest.raises(ValueError, match="upload a picture"):
        mask_from_editor({"background": None, "layers": []})


@pytest.mark.parametrize("mode,change,message", [
    ("img2img", dict(strength=1.5), "strength must be between 0 and 1"),
    ("txt2img", dict(prompt="  "), "type a prompt"),
    ("txt2img", dict(steps=0), "steps must be a whole number"),
    ("txt2img", dict(steps=2.5), "steps must be a whole number"),
    ("txt2img", dict(seed=-1), "seed must be a whole number"),
    ("txt2img", dict(num_images=0), "number of images"),
    ("txt2img", dict(sampler="euler-a"), "sampler must be one of"),
    ("txt2img", dict(height=64), "renders at its trained size, 16"),
])
def test_bad_settings_are_one_clear_message_and_the_app_keeps_serving(model, picture, tmp_path, mode, change,
                                                                       message):
    app = WebApp(model, tmp_path)
    settings = Settings(**{**dict(prompt="a red circle", steps=2, strength=0.5), **change})
    with pytest.raises(gr.Error, match=message):
        list(app.generate(mode, settings, picture))
    assert list(app.generate("txt2img", Settings("a red circle", steps=2), None))[-1][3]  # the next one works


def test_unreadable_upload_no_mask_and_unknown_model(model, picture, tmp_path):
    app = WebApp(model, tmp_path)
    not_a_picture = tmp_path / "notes.png"
    not_a_picture.write_text("not a picture")
    with pytest.raises(gr.Error, match="not a readable image"):
        list(app.generate("img2img", Settings("a red circle", steps=2, strength=0.5), str(not_a_picture)))
    with pytest.raises(gr.Error, match="upload a picture"):
        list(app.generate("img2img", Settings("a red circle", steps=2, strength=0.5), None))
    with pytest.raises(gr.Error, match="no mask"):
        list(app.generate("inpaint", Settings("a red circle", steps=2, strength=0.5),
                          {"background": picture, "layers": []}))
    with pytest.raises(gr.Error) as error:
        app.load(str(tmp_path / "no-such-model"))
    assert "no-such-model" in str(error.value) and "\n" not in str(error.value)
    assert app.model is model  # the old model stays in memory and serves


def test_closing_the_stream_stops_the_call_at_its_next_step(model, monkeypatch):
    calls = []
    predict = model.pipe.predict
    monkeypatch.setattr(model.pipe, "predict", lambda *args: calls.append(1) or predict(*args))
    events = generate(model, "txt2img", Settings("a red circle", steps=1000))
    assert next(events).step == 1
    events.close()  # what Gradio does when the tab goes away
    assert not [t for t in threading.enumerate() if t.name == "minidiff-generate"]  # the worker has ended
    assert len(calls) < 100  # ... at its next step or so, not after 1000


def test_sd3_through_the_same_handlers(tiny_sd3, tiny_sd3_dir, tmp_path, picture):
    model = AppModel(tiny_sd3, str(tiny_sd3_dir), "sd3")
    events = list(generate(model, "txt2img", Settings("a red circle", steps=3, seed=1, guidance=2.0)))
    result = events[-1]
    assert [f.step for f in result.frames] == [0, 1, 2, 3] and result.images[0].size == (32, 32)
    assert result.settings.height == result.settings.width == 32 and result.settings.sampler == "euler"
    edit = list(generate(model, "img2img", Settings("a red circle", steps=4, seed=1, strength=0.5),
                         picture.resize((32, 32))))[-1]
    assert [f.step for f in edit.frames] == [0, 1, 2] and edit.frames[-1].total == 2  # N * strength of N steps
    command = Image.open(save_result(result, model, "txt2img", tmp_path)[0]).text["sample.py"]
    assert "--backend sd3" in command and "--sampler euler --height 32 --width 32" in command
    with pytest.raises(ValueError, match=r"sampler must be one of \['euler'\]"):
        list(generate(model, "txt2img", Settings("a red circle", sampler="ddim")))


def test_one_generation_at_a_time_across_tabs(ddpm_model, tmp_path):
    demo = build_ui(WebApp(ddpm_model, tmp_path))
    heavy = [fn for fn in demo.fns.values() if fn.name in ("run", "load")]
    assert len(heavy) == 2 * 3 + 1  # Generate and Enter in each tab, and Load
    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in heavy} == {("model", 1)}


def test_host_warning_and_a_bad_model_on_the_command_line(capsys, tmp_path):
    import app

    assert host_warning("127.0.0.1") is None and host_warning("localhost") is None
    assert "anyone on the network" in host_warning("0.0.0.0")
    assert run_cli(app.main, ["--model", str(tmp_path / "missing"), "--host", "0.0.0.0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("warning: serving on 0.0.0.0")
    assert lines[1].startswith("error: ") and "missing" in lines[1]


def test_warnings_of_the_call_reach_the_page(model, picture):
    result = list(generate(model, "img2img", Settings("a red circle", steps=2, strength=0.5),
                           picture.resize((20, 20))))[-1]
    assert result.warnings == ["image of size 20x20 resized to 16x16"]
    assert result.images[0].size == (16, 16)


def test_only_the_calls_own_warnings_reach_the_page(ddpm_model, monkeypatch):
    """The warnings are recorded for the whole process while a call runs: a ResourceWarning of
    another thread ("unclosed event loop", Gradio's loops collected meanwhile) reached the page."""
    import warnings

    call = ddpm_model.call

    def noisy(*args, **kwargs):
        warnings.warn("unclosed event loop", ResourceWarning)
        warnings.warn("image of size 20x20 resized to 16x16")
        return call(*args, **kwargs)

    monkeypatch.setattr(ddpm_model, "call", noisy)
    result = list(generate(ddpm_model, "txt2img", Settings("a red circle", steps=2)))[-1]
    assert result.warnings == ["image of size 20x20 resized to 16x16"]


def test_a_mask_empty_at_the_models_size_is_one_clear_line(model, tmp_path):
    """Issue 24: a 2 px stroke on a 64x64 upload leaves no white pixel at the model's 16 px; the
    page says so instead of returning the input unchanged."""
    app = WebApp(model, tmp_path)
    upload = Shapes(64, seed=3).pil_and_caption(0)[0]
    stroke = {"background": upload, "layers": [painted(upload.size, (10, 30, 12, 32))]}
    size = model.pipe.image_size
    with pytest.raises(gr.Error, match=f"the mask is empty at the model's {size}x{size}: paint a larger area"):
        list(app.generate("inpaint", Settings("a red circle", steps=2, strength=0.99), stroke))
    wide = {"background": upload, "layers": [painted(upload.size, (8, 8, 40, 40))]}
    assert list(app.generate("inpaint", Settings("a red circle", steps=2, strength=0.99), wide))[-1][3]


def page_function(demo, name: str, mode: str | None = None):
    """One of the page's handlers as Gradio calls it (`mode`: the tab whose handler it is)."""
    fns = [fn for fn in demo.fns.values() if fn.name == name
           and (mode is None or any(getattr(b, "elem_id", None) == f"{mode}-prompt" for b in fn.inputs))]
    assert fns, f"no handler {name} for {mode}"
    return fns[0]


def brush_stroke(size, radius: float, start, end) -> Image.Image:
    """A stroke of the editor's brush from `start` to `end` (x, y): every pixel whose centre lies
    within `radius` of the segment (the editor stamps discs along the pointer's path)."""
    ys, xs = np.indices(size[::-1]) + 0.5
    (x0, y0), (x1, y1) = start, end
    along = np.clip(((xs - x0) * (x1 - x0) + (ys - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2), 0, 1)
    inside = np.hypot(xs - x0 - along * (x1 - x0), ys - y0 - along * (y1 - y0)) < radius
    return Image.fromarray(np.where(inside[..., None], 255, 0).astype(np.uint8).repeat(4, axis=2), "RGBA")


def test_the_default_brush_fits_the_uploaded_picture(ddpm_model, tmp_path):
    """Issue 24.4a: one stroke of the default brush on a 64x64 upload left no white pixel at the
    tiny model's 16 px: the fixed 2 px radius drew 4 px, one pixel at 16 px, which the shrinking
    keeps or drops by rounding. The editor's brush is set on every upload (and when a result is sent
    to inpainting) to a stroke two of the model's pixels wide."""
    app = WebApp(ddpm_model, tmp_path)
    demo = build_ui(app)
    fit = next(fn for fn in demo.fns.values() if fn.name == "fit_brush")
    upload = Shapes(64, seed=3).pil_and_caption(0)[0]
    radius = fit.fn({"background": upload, "layers": [], "composite": None}).brush.default_size
    assert radius == 4 == 64 // ddpm_model.pipe.image_size  # two of the model's pixels wide
    for shift in range(4):  # across or along the diagonal, wherever it lands on the model's pixels (4x4 each)
        for start, end in (((16, 30 + shift), (48, 30 + shift)), ((16 + shift, 16), (48 + shift, 48))):
            stroke = {"background": upload, "layers": [brush_stroke(upload.size, radius, start, end)]}
            assert list(app.generate("inpaint", Settings("a red circle", steps=2, strength=0.99), stroke))[-1][3]
    big = upload.resize((512, 512))
    assert fit.fn({"background": big, "layers": []}).brush.default_size == 32
    result = tmp_path / "result.png"  # "Send to inpainting" with a result at the model's size
    Shapes(16, seed=3).pil_and_caption(0)[0].save(result)
    send = next(fn for fn in demo.fns.values() if isinstance(fn.outputs[0], gr.ImageEditor) and fn.name != "fit_brush")
    editor, _ = send.fn([str(result)], 0)
    assert editor.value["background"]["path"].endswith("result.png") and editor.brush.default_size == 2


def test_a_failed_call_leaves_no_error_marks_on_the_outputs(ddpm_model, tmp_path):
    """Issue 24.4b: after a mistake Gradio marked every output panel "Error" until the next run. Each
    Generate, Enter and Load is followed, on failure only, by a no-op update of the same outputs
    (the browser test watches the marks go)."""
    demo = build_ui(WebApp(ddpm_model, tmp_path))
    heavy = [fn for fn in demo.fns.values() if fn.name in ("run", "load")]
    for fn in heavy:
        after = [f for f in demo.fns.values() if f.trigger_after == fn._id]
        assert len(after) == 1 and after[0].trigger_only_on_failure and not after[0].queue
        assert [b._id for b in after[0].outputs] == [b._id for b in fn.outputs]
        assert all(update == gr.skip() for update in after[0].fn())


def test_the_step_slider_counts_denoising_steps(ddpm_model, tmp_path):
    """Issue 24.4d: 50 steps are captured every 3rd (18 frames); the slider counted the frames
    (0-17) while the text said "step 15 of 50". It now runs from 0 to 50 and stops on captured steps."""
    frames = [Frame(step, 50, None) for step in preview_steps(50)]
    assert [f.step for f in frames][:3] == [0, 3, 6] and frames[-1].step == 50 and len(frames) == 18
    assert frame_at(frames, 15) == 5 and frames[frame_at(frames, 16)].step == 15  # the nearest
    assert frames[frame_at(frames, 16, shown=15)].step == 18  # the arrow key up: the next captured step
    assert frames[frame_at(frames, 17, shown=18)].step == 15  # ... down: the one before
    assert frames[frame_at(frames, 49, shown=48)].step == 50 and frame_at(frames, 0, shown=3) == 0

    app = WebApp(ddpm_model, tmp_path)
    demo = build_ui(app)
    run = page_function(demo, "run", "txt2img")
    *_, last = run.fn("a red circle", "", 50, 3.0, 0, 1, "ddpm", 16, 16, None, None)
    slider, shown = last[8], last[9]
    assert (slider.minimum, slider.maximum, slider.value, slider.step, shown) == (0, 50, 50, 1, 50)
    label, x_t, x0, value, shown = page_function(demo, "show").fn(16, last[6], 15)  # dragged up from 15
    assert label.startswith("step 18 of 50") and value == shown == 18 and Path(x_t).is_file()


def test_the_start_up_lines_name_the_apps_share_option(ddpm_model, tmp_path, capsys):
    """Issue 24.4f: Gradio's start-up hint says "set `share=True` in `launch()`"; the app's option is --share."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo = build_ui(WebApp(ddpm_model, tmp_path))
    try:
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    finally:
        demo.close()
    out = capsys.readouterr().out
    assert f"Running on local URL:  http://127.0.0.1:{port}" in out
    assert "run app.py with --share" in out and "share=True" not in out


def test_a_picture_is_handed_to_gradio_once(ddpm_model, tmp_path, monkeypatch):
    """Issue 24.4g: "Too little data for declared Content-Length" in the console. Gradio writes a
    returned PIL picture into its cache each time, over the old copy (truncate, then write), and the
    page returned the last live picture again with the result, while the browser was fetching it:
    uvicorn then sends fewer bytes than it declared. The pictures are now files, written once."""
    import asyncio
    import os

    from gradio import processing_utils
    from gradio.state_holder import SessionState

    save = processing_utils.save_pil_to_cache
    rewritten = []

    def saving(image, cache_dir, *args, **kwargs):
        before = {os.path.join(root, f) for root, _, files in os.walk(cache_dir) for f in files}
        path = save(image, cache_dir, *args, **kwargs)
        if path in before:
            rewritten.append(path)
        return path

    monkeypatch.setattr(processing_utils, "save_pil_to_cache", saving)
    demo = build_ui(WebApp(ddpm_model, tmp_path))
    run, state = page_function(demo, "run", "txt2img"), SessionState(demo)
    outputs = list(run.fn("a red circle", "", 6, 3.0, 0, 1, "ddpm", 16, 16, None, None))
    for output in outputs:  # what Gradio does with every yield before sending it to the page
        asyncio.run(demo.postprocess_data(run, list(output), state))
    assert outputs[-1][2] == outputs[-2][2]  # the last live x_t is the result's: the same file
    assert rewritten == []

    previews = PreviewFiles(tmp_path / "previews")
    picture = Shapes(16, seed=1).pil_and_caption(0)[0]
    path = previews(picture)
    written = os.stat(path).st_mtime_ns
    assert previews(picture.copy()) == path and os.stat(path).st_mtime_ns == written
    assert previews(None) is None
