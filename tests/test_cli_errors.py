"""Every mistake a user can make with train.py and sample.py: one `error:` line on stderr, exit
status 2, no traceback, and every file that existed before is untouched.

To add a mistake, add a Case to CASES: the argv (with {tmp} for the case's own folder, which
holds a copy of the tiny trained run in {tmp}/model), an optional setup(tmp) that prepares
the mistake, and a fragment the error line must contain.

Each case runs the real script as `__main__` in its own process. A fresh interpreter spends
~1.7 s of CPU importing torch, so by default the processes are forked from one server that
imported torch once; MINIDIFF_FRESH_CLI=1 starts `python script ...` from scratch for every case.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
from PIL import Image

from minidiff.tools.trainer import latest_checkpoint

from conftest import TINY_TRAINING

ROOT = Path(__file__).resolve().parents[1]
MARKER = "UNPICKLED"  # a file the malicious pickles below would create when loaded


class Case(NamedTuple):
    name: str
    argv: list[str]
    setup: Callable[[Path], None] | None
    expect: str  # a fragment of the error line


# ---- what the cases set up --------------------------------------------------------------------

class Payload:
    """Unpickling this calls open(path, "w"): any code could run the same way."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_pickle(path: Path, tmp: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(tmp / MARKER), protocol=4))


def step_dir(tmp: Path) -> Path:
    return latest_checkpoint(tmp / "model")


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def data_folder(tmp: Path, metadata: str | None = None, images=("a.png", "b.png")) -> None:
    folder = tmp / "data"
    folder.mkdir()
    for name in images:
        Image.new("RGB", (20, 20), (200, 30, 30)).save(folder / name)
    if metadata is not None:
        (folder / "metadata.jsonl").write_text(metadata)


GOOD_LINE = '{"file_name": "a.png", "text": "a red square"}\n'
NEW = ["train.py", "--out", "{tmp}/new", "--device", "cpu"]
RESUME = ["train.py", "--out", "{tmp}/model", "--resume", "--device", "cpu"]
SAMPLE = ["sample.py", "--model", "{tmp}/model", "--prompt", "a red circle", "--steps", "2", "--out", "{tmp}/out.png",
          "--device", "cpu"]

CASES = [
    Case("train: steps below 1", NEW + ["--steps", "0"], None, "--steps must be at least 1"),
    Case("train: a flag that is not a number", NEW + ["--steps", "many"], None, "invalid int value: 'many'"),
    Case("train: min-SNR weighting on a flow model", NEW + ["--snr-gamma", "5"], None, "needs objective 'ddpm'"),
    Case("train: a size the UNet cannot halve", NEW + ["--image-size", "18"], None, "must be a multiple of 4"),
    Case("train: a size Shapes cannot draw", NEW + ["--image-size", "100"], None, "between 16 and 64"),
    Case("train: unknown data", NEW + ["--data", "imagenet"], None, "neither a folder nor one of"),
    Case("train: a share of two-object pictures above 1", NEW + ["--two-object-fraction", "1.5"], None,
         "--two-object-fraction must be between 0 and 1"),
    Case("train: the torch renderer for data read from files", NEW + ["--renderer", "torch", "--data", "mnist"], None,
         "--renderer torch draws Shapes"),
    Case("train: two objects at 16 px", NEW + ["--two-object-fraction", "0.3"], None,
         "--two-object-fraction needs --image-size 32 or more"),
    Case("train: empty data folder", NEW + ["--data", "{tmp}/data"], lambda t: data_folder(t, images=()),
         "holds no images"),
    Case("train: metadata names a missing file", NEW + ["--data", "{tmp}/data"],
         lambda t: data_folder(t, GOOD_LINE + '{"file_name": "c.png", "text": "a cat"}\n'), "line 2 names c.png"),
    Case("train: malformed metadata line", NEW + ["--data", "{tmp}/data"],
         lambda t: data_folder(t, GOOD_LINE + '{"file_name": "b.png", "text": }\n'), "line 2 is not valid JSON"),
    Case("train: metadata line without text", NEW + ["--data", "{tmp}/data"],
         lambda t: data_folder(t, '{"file_name": "a.png"}\n'), 'line 1 has no string "file_name" and "text"'),
    Case("train: corrupt image", NEW + ["--data", "{tmp}/data"],
         lambda t: (data_folder(t), (t / "data" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")),
         "b.png is not a readable image"),
    Case("train: output folder not writable", ["train.py", "--out", "{tmp}/a_file/run"],
         lambda t: (t / "a_file").write_text("a file, not a folder"), "--out: cannot write to"),
    Case("train: --resume with nothing to resume", NEW + ["--resume"], None, "holds no checkpoint to resume from"),
    Case("train: into an existing run without --resume", ["train.py", "--out", "{tmp}/model"], None,
         "already holds a training run; pass --resume"),
    Case("train: resume a partial checkpoint", RESUME, lambda t: (step_dir(t) / "optimizer.safetensors").unlink(),
         "optimizer.safetensors is missing"),
    Case("train: resume a corrupt checkpoint", RESUME,
         lambda t: (step_dir(t) / "ema.safetensors").write_bytes((step_dir(t) / "ema.safetensors").read_bytes()[:300]),
         "ema.safetensors is not a readable safetensors file"),
    Case("train: resume a checkpoint of another format version", RESUME,
         lambda t: edit_json(step_dir(t) / "state.json", format_version=99), "incompatible minidiff"),
    Case("train: resume a checkpoint holding a pickle", RESUME,
         lambda t: write_pickle(step_dir(t) / "rng.safetensors", t), "rng.safetensors is a pickle file"),
    Case("train: resume with another model size", RESUME + ["--base-channels", "64"], None,
         f"--base-channels 64 differs from the resumed run's {TINY_TRAINING['base_channels']}"),
    Case("train: unknown network", NEW + ["--backbone", "dit"], None, "invalid choice: 'dit'"),
    Case("train: an MMDiT patch that does not cut the image", NEW + ["--backbone", "mmdit", "--patch-size", "3"], None,
         "--patch-size 3 must divide --image-size 16"),
    Case("train: an MMDiT width the position table cannot fill",
         NEW + ["--backbone", "mmdit", "--num-heads", "3", "--head-dim", "5"], None,
         "--num-heads x --head-dim must be a multiple of 4"),
    Case("train: an MMDiT without blocks", NEW + ["--backbone", "mmdit", "--num-layers", "0"], None,
         "--num-layers must be at least 1"),
    Case("train: an MMDiT setting for the UNet", NEW + ["--patch-size", "2"], None,
         "--patch-size sets the mmdit network, but this run trains the unet; drop the flag or add --backbone mmdit"),
    Case("train: a UNet setting for the MMDiT", NEW + ["--backbone", "mmdit", "--base-channels", "32"], None,
         "--base-channels sets the unet network, but this run trains the mmdit"),
    Case("train: resume with another network", RESUME + ["--backbone", "mmdit"], None,
         "--backbone mmdit differs from the resumed run's unet"),
    Case("sample: missing model folder", SAMPLE + ["--model", "{tmp}/nothing"], None, "does not exist"),
    Case("sample: partial model", SAMPLE, lambda t: (t / "model" / "model.safetensors").unlink(),
         "model.safetensors is missing"),
    Case("sample: corrupt model", SAMPLE, lambda t: (t / "model" / "model.safetensors").write_bytes(b"\x00" * 64),
         "is not a readable safetensors file"),
    Case("sample: model of another format version", SAMPLE,
         lambda t: edit_json(t / "model" / "config.json", format_version=99), "incompatible minidiff"),
    Case("sample: model.safetensors that is a pickle", SAMPLE,
         lambda t: write_pickle(t / "model" / "model.safetensors", t), "is a pickle file, not safetensors"),
    Case("sample: a folder with only a pickle", SAMPLE,
         lambda t: ((t / "model" / "model.safetensors").unlink(), write_pickle(t / "model" / "pytorch_model.bin", t)),
         "pytorch_model.bin beside it is not read"),
    Case("sample: steps below 1", SAMPLE + ["--steps", "0"], None, "num_inference_steps must be"),
    Case("sample: negative guidance", SAMPLE + ["--guidance", "-1"], None, "guidance_scale must be >= 0"),
    Case("sample: output exists", SAMPLE, lambda t: Image.new("RGB", (4, 4)).save(t / "out.png"), "pass --overwrite"),
    Case("sample: output folder not writable", SAMPLE + ["--out", "{tmp}/a_file/out.png"],
         lambda t: (t / "a_file").write_text("a file, not a folder"), "--out: cannot write to"),
    Case("sample: no images asked for", SAMPLE + ["--num-images", "0"], None, "--num-images must be at least 1"),
    Case("sample: too many images for one grid", SAMPLE + ["--num-images", "2000"], None,
         "too many for one grid (at most 1,024); write one PNG per image with --out-dir"),
    Case("sample: an image of --out-dir exists", SAMPLE + ["--out-dir", "{tmp}/images"],
         lambda t: ((t / "images").mkdir(), Image.new("RGB", (4, 4)).save(t / "images" / "00000-a-red-circle.png")),
         "pass --overwrite"),
    Case("sample: missing image", SAMPLE + ["--image", "{tmp}/nope.png"], None, "image file not found"),
    Case("sample: corrupt image", SAMPLE + ["--image", "{tmp}/bad.png"],
         lambda t: (t / "bad.png").write_bytes(b"not a png"), "is not a readable image"),
    Case("sample: strength above 1", SAMPLE + ["--image", "{tmp}/in.png", "--strength", "1.5"],
         lambda t: Image.new("RGB", (16, 16)).save(t / "in.png"), "strength must be between 0 and 1"),
    Case("sample: strength below 0", SAMPLE + ["--image", "{tmp}/in.png", "--strength", "-0.1"],
         lambda t: Image.new("RGB", (16, 16)).save(t / "in.png"), "strength must be between 0 and 1"),
    Case("sample: mask of another size", SAMPLE + ["--image", "{tmp}/in.png", "--mask", "{tmp}/mask.png"],
         lambda t: (Image.new("RGB", (16, 16)).save(t / "in.png"), Image.new("L", (8, 8), 255).save(t / "mask.png")),
         "mask_image is 8x8 but image is 16x16"),
    Case("sample: mask without image", SAMPLE + ["--mask", "{tmp}/mask.png"],
         lambda t: Image.new("L", (16, 16), 255).save(t / "mask.png"), "--mask needs --image"),
    Case("sample: unknown backend", SAMPLE + ["--backend", "dalle"], None, "invalid choice: 'dalle'"),
    Case("sample: SD3 folder without model_index.json", SAMPLE + ["--model", "{tmp}/empty", "--backend", "sd3"],
         lambda t: (t / "empty").mkdir(), "no model_index.json"),
]


# ---- running a script like `python script args` -----------------------------------------------

SERVER = r'''
import json, os, sys
sys.path.append(os.path.join(os.getcwd(), "tests"))
from run_as_main import run_as_main
import torch, torch._dynamo, minidiff.tools.trainer, minidiff.pipeline  # the slow imports, done once
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the child runs the script as `python script args` would
        os.chdir(job["cwd"])
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(f, fd)
            os.close(f)
        os._exit(run_as_main(job["argv"]))
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
'''


def script_runner(fresh: bool = os.environ.get("MINIDIFF_FRESH_CLI") == "1"):
    """-> (run(argv, tmp) -> (exit status, stderr), close())."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if fresh:
        def run_fresh(argv, tmp):
            done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=300)
            return done.returncode, done.stderr

        return run_fresh, lambda: None
    server = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def run_forked(argv, tmp):
        job = {"argv": argv, "cwd": str(ROOT), "stdout": str(tmp.parent / "stdout"), "stderr": str(tmp.parent / "stderr")}
        server.stdin.write(json.dumps(job) + "\n")
        server.stdin.flush()
        return int(server.stdout.readline()), Path(job["stderr"]).read_text()

    def close():
        server.kill()  # it holds no state worth a clean exit
        server.wait()

    return run_forked, close


@pytest.fixture(scope="module")
def run_script():
    run, close = script_runner()
    yield run
    close()


def prepare(case: Case, folder: Path, model: Path) -> Path:
    tmp = folder / "case"
    shutil.copytree(model, tmp / "model")
    if case.setup is not None:
        case.setup(tmp)
    return tmp


def command(case: Case, tmp: Path) -> list[str]:
    return [arg.replace("{tmp}", str(tmp)) for arg in case.argv]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_payload_would_run_if_unpickled(tmp_path):
    write_pickle(tmp_path / "payload.bin", tmp_path)
    pickle.loads((tmp_path / "payload.bin").read_bytes())
    assert (tmp_path / MARKER).exists()  # so the marker's absence below means something


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_mistake_gives_one_error_line_and_exit_2_and_keeps_every_file(case, tmp_path, tiny_model_dir, run_script):
    tmp = prepare(case, tmp_path, tiny_model_dir)
    before = snapshot(tmp)
    status, stderr = run_script(command(case, tmp), tmp)
    lines = stderr.strip().splitlines()
    assert status == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert case.expect in lines[0]
    after = snapshot(tmp)
    assert {name: after.get(name) for name in before} == before  # nothing changed or removed
    assert not (tmp / MARKER).exists()  # no pickle was loaded


def as_argparse_reads_it(argv: list[str]) -> list[str]:
    """A repeated flag shown once, with its last value (the one argparse keeps)."""
    pairs, k = [], 1
    while k < len(argv):
        has_value = k + 1 < len(argv) and not argv[k + 1].startswith("--")
        pairs.append((argv[k], argv[k + 1] if has_value else None))
        k += 2 if has_value else 1
    last = dict(pairs)
    return argv[:1] + [w for flag in dict.fromkeys(f for f, _ in pairs)
                       for w in ((flag,) if last[flag] is None else (flag, last[flag]))]


def print_table() -> None:
    """The README's table of mistakes: `python tests/test_cli_errors.py` (paths shown relative)."""
    import tempfile

    from conftest import tiny_train_config
    from minidiff.tools.trainer import Trainer

    run, close = script_runner()
    with tempfile.TemporaryDirectory() as scratch:
        model = Path(scratch) / "model"
        Trainer(tiny_train_config(model)).train()
        print("| mistake | command | what you see |\n|---|---|---|")
        for index, case in enumerate(CASES):
            tmp = prepare(case, Path(scratch) / str(index), model)
            status, stderr = run(command(case, tmp), tmp)
            assert status == 2, stderr
            shown = lambda text: text.replace(f"{tmp}/", "").replace(str(tmp), ".")  # noqa: E731
            argv = as_argparse_reads_it([shown(a) for a in command(case, tmp)])
            print(f"| {case.name.split(': ', 1)[1]} | `` python {' '.join(shlex.quote(a) for a in argv)} `` "
                  f"| `` {shown(stderr.strip())} `` |")
    close()


if __name__ == "__main__":
    print_table()


@pytest.mark.slow
def test_warnings_print_as_one_line_each():
    """Through `run`, as every script's __main__: `warning: ...`, no file, line or source."""
    code = "import warnings; from minidiff.tools.cli import run; run(lambda argv: warnings.warn('two\\n  lines'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stderr == "warning: two lines\n"


def test_a_warning_during_a_progress_bar_prints_on_its_own_line(capsys):
    """Issue 24, item 4: not `...3.34image/s]warning: ignoring words ...`."""
    import warnings

    from tqdm import tqdm

    from minidiff.tools.cli import run as run_cli

    def main(argv):
        with tqdm(total=2, unit="image", file=sys.stderr) as bar:
            bar.update(1)
            warnings.warn("ignoring words the model was not trained on: hexagon")
            bar.update(1)
        return 0

    saved = warnings.showwarning, warnings.formatwarning
    try:
        assert run_cli(main, []) == 0
    finally:
        warnings.showwarning, warnings.formatwarning = saved
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert "warning: ignoring words the model was not trained on: hexagon" in lines
