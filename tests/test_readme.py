"""The README and the pages of docs/, run as a new user would: every ```bash and ```python block
of a page, in order, in a fresh copy of the repository (its `git ls-files`, in a temporary
folder), with a tiny model. Each page gets its own copy.

Conventions, for whoever edits README.md or docs/*.md:

- A ```bash block holds shell commands, one command a line (a trailing `# comment` is fine).
  A ```python block is what a user would save as a file in the repository root and run with
  `python FILE`. Both kinds run in the order they appear, in one bash session: what an earlier
  block did (`source .venv/bin/activate`, a file it wrote, a model it trained) is there for the
  later ones, and a later command that would fail on a user's machine (an output that already
  exists, a file nothing created) fails here. Blocks in any other language or none (output,
  file listings) are not run. Commands go in fenced ```bash blocks, not indented ones
  (`test_commands_are_in_fenced_blocks`).
- `<!-- readme-test: skip, REASON -->` on the line right above a block: the block is not run
  (it needs a GPU, a download, several machines, or hours). The reason is required.
- `make demo` and `make test` are not run (the first trains the full default model, the second
  is the suite this test belongs to). In their place, before a page's first block, a tiny
  `runs/shapes` is trained (`train.py` with TINY_TRAIN), the folder `make demo` leaves for the
  blocks that load it. The README's blocks then start in a new terminal (`.venv` not active
  yet); a docs page's start with `.venv` active, as a reader arrives there from the README.
- Shortened so that every page runs in seconds: SHORTEN's flags are appended to each command
  that runs one of its scripts (argparse keeps the last value of a flag, so a page's own
  `--steps 20000` gives way to `--steps 2`; on `--resume`, flags equal to the run's own are
  accepted). Every `train.py` trains a tiny model for 2 steps on the CPU.
- Stable Diffusion 3 model ids (`stabilityai/stable-diffusion-3...`) are replaced by the folder
  of the tiny random SD3 pipeline of tests/sd3_tiny.py; nothing else in an SD3 block changes.
- `source .venv/bin/activate` works in the copy as it does after `make`; before it, `python`
  is whatever the PATH gave, minus the environment running these tests (a README that forgets
  to activate fails here as it would for a user). Its `python` is that environment's, except
  that, to save the ~2 s of CPU a fresh interpreter spends importing torch (some 17 times), it
  runs each `python SCRIPT`, `python -m MODULE` or `python -c CODE` in a process forked from one
  that imported torch once, with the command's own arguments, folder, environment, standard
  streams and exit status. MINIDIFF_FRESH_CLI=1 uses the real environment and interpreter instead.
- The committed files must come out unchanged: a command that would overwrite one (the
  README's figures, the published benchmark results) fails the test.
- The README's reading table is the output of `python -m minidiff.tools.lines`, kept equal
  (`test_reading_table_is_current`): whoever changes the lesson's files refreshes it.
- docs/maths.md names functions on both sides; each dotted name in backquotes that starts with
  minidiff., bridge. or diffusers. must exist (`test_named_functions_exist`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]  # each run in its own fresh copy
TINY_TRAIN = ["--steps", "2", "--batch-size", "4", "--base-channels", "16", "--channel-mults", "1", "2",
              "--attention-levels", "1", "--text-dim", "32", "--sample-every", "0", "--checkpoint-every", "0",
              "--autoencoder-steps", "2", "--device", "cpu"]  # --autoencoder-steps: a latent run's, first
SHORTEN = {  # a command running this script (regex) gets these flags appended
    r"\btrain\.py\b": TINY_TRAIN,
    r"-m\s+minidiff\.evaluate\b": ["--samples-per-prompt", "1", "--steps", "2"],
}
SD3_ID = re.compile(r"stabilityai/stable-diffusion-3[\w.-]*")
SKIP = re.compile(r"^<!--\s*readme-test:\s*skip\s*[,:]\s*(?P<reason>\S.*?)\s*-->$")
MARKER = re.compile(r"<!--\s*readme-test:")
RUN_LANGUAGES = ("bash", "python")


class Block(NamedTuple):
    language: str
    line: int  # of the opening fence, 1-based
    code: str
    skip: str | None  # the reason, when marked not to run


def page_name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def readme_blocks(text: str, name: str = "README.md") -> list[Block]:
    """The fenced code blocks of a Markdown text, with their skip markers. A marker that is not
    right above a block is an error (it would silently mark nothing)."""
    lines, blocks, i = text.splitlines(), [], 0
    markers = [n for n, line in enumerate(lines) if MARKER.search(line) and line.lstrip().startswith("<!--")]
    used = set()
    while i < len(lines):
        stripped = lines[i].strip()
        if not stripped.startswith("```"):
            i += 1
            continue
        indent = len(lines[i]) - len(lines[i].lstrip())
        language, start, i = stripped[3:].strip(), i, i + 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if not lines[i][:indent].strip() else lines[i].lstrip())
            i += 1
        i += 1
        skip = None
        above = start - 1
        if above >= 0 and above in markers:
            match = SKIP.match(lines[above].strip())
            if match is None:
                raise ValueError(f"{name} line {above + 1}: a readme-test marker must read "
                                 "<!-- readme-test: skip, REASON -->")
            skip, _ = match["reason"], used.add(above)
        blocks.append(Block(language, start + 1, "\n".join(body) + "\n", skip))
    dangling = [n + 1 for n in markers if n not in used]
    if dangling:
        raise ValueError(f"{name} line {dangling[0]}: a readme-test marker must be right above a code block")
    return blocks


def split_comment(line: str) -> tuple[str, str]:
    """A shell line -> (command, trailing `# comment` or "")."""
    quote = None
    for k, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k].rstrip(), line[k:]
    return line.rstrip(), ""


def shorten(code: str, sd3_folder: str) -> str:
    """A bash block as the test runs it: SHORTEN's flags appended, SD3 ids replaced."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        command, comment = split_comment(line)
        for pattern, flags in SHORTEN.items():
            if re.search(pattern, command):
                command += " " + shlex.join(flags)
        out.append(SD3_ID.sub(sd3_folder, command) + ("  " + comment if comment else ""))
    return "\n".join(out) + "\n"


def fresh_copy(folder: Path) -> list[Path]:
    """What a clone holds: the files git tracks (`git add` a new file first), copied. Files the
    README's commands left in the working tree are not copied, so they cannot get in the way."""
    try:
        listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached"],
                                capture_output=True, check=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the README is run on a copy of the repository's files")
    copied = []
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
            copied.append(folder / name)
    return copied


# The warm interpreter: a server that imported torch and minidiff once, and `python`, a client
# that hands it the command line, folder, environment and its stdin/stdout/stderr, then exits
# with the status of the forked child that ran it.
WARM_SERVER = r'''
import json, os, socket, sys
sys.path.insert(0, os.getcwd())
sys.path.append(os.path.join(os.getcwd(), "tests"))
from run_as_main import run_as_main
import torch, minidiff.pipeline, minidiff.training, minidiff.tools.figures, minidiff.tools.evaluate  # the slow imports, once
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen()
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    message, fds, _, _ = socket.recv_fds(conn, 1 << 22, 3)
    job = json.loads(message)
    pid = os.fork()
    if pid == 0:
        for fd, target in zip(fds, (0, 1, 2)):
            os.dup2(fd, target)
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        os._exit(run_as_main(job["argv"]))
    for fd in fds:
        os.close(fd)
    conn.sendall(str(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])).encode())
    conn.close()
'''

WARM_CLIENT = r'''
import json, os, socket, sys
argv = sys.argv[1:]
if not argv or (argv[0].startswith("-") and argv[0] not in ("-m", "-c")) or (argv[0] in ("-m", "-c") and len(argv) < 2):
    os.execv(REAL, [REAL, *argv])  # anything else (an option, a REPL): the real interpreter
client = socket.socket(socket.AF_UNIX)
client.connect(SOCKET)
job = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
socket.send_fds(client, [json.dumps(job).encode()], [0, 1, 2])
sys.exit(int(client.recv(16) or 1))
'''


def readme_environment(copy: Path, scratch: Path):
    """-> (`.venv` for the copy, PATH before activation, a function to stop what was started)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    in_venv = sys.prefix != sys.base_prefix
    if in_venv:  # as in a new terminal: the environment is not active yet
        venv_bin = Path(sys.executable).parent
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != venv_bin)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    if os.environ.get("MINIDIFF_FRESH_CLI") == "1" and in_venv:
        (copy / ".venv").symlink_to(sys.prefix, target_is_directory=True)
        return env, lambda: None
    bin_dir = copy / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    if os.environ.get("MINIDIFF_FRESH_CLI") == "1":
        (bin_dir / "python").symlink_to(sys.executable)
        return env, lambda: None
    socket_path = scratch / "warm.sock"
    client = scratch / "warm_client.py"
    client.write_text(f"REAL, SOCKET = {sys.executable!r}, {str(socket_path)!r}\n" + WARM_CLIENT)
    shim = f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -S -E {shlex.quote(str(client))} "$@"\n'
    (bin_dir / "python").write_text(shim)
    (bin_dir / "python").chmod(0o755)
    server = subprocess.Popen([sys.executable, "-c", WARM_SERVER, str(socket_path)], cwd=copy, env=env,
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"

    def stop():
        server.kill()  # it holds no state worth a clean exit
        server.wait()

    return env, stop


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def script_for(blocks: list[Block], copy: Path, sd3_folder: str, page: str = "README.md") -> str:
    """One bash session running the blocks in order; `::PAGE line N` on stderr before each. First
    the stand-in for `make demo` (a tiny runs/shapes); on a docs page, `.venv` activated."""
    demo = shlex.join([".venv/bin/python", "train.py", "--out", "runs/shapes", *TINY_TRAIN])
    lines = ["set -eo pipefail", f"{demo} >/dev/null"]
    if page != "README.md":
        lines.append("source .venv/bin/activate")
    for block in blocks:
        if block.skip is not None or block.language not in RUN_LANGUAGES:
            continue
        lines.append(f"echo \"::{page} line {block.line} at $(date +%s.%N)\" >&2")
        if block.language == "bash":
            lines.append(shorten(block.code, sd3_folder))
        else:
            name = f"{Path(page).stem.lower()}-line-{block.line}.py"
            (copy / name).write_text(SD3_ID.sub(sd3_folder, block.code))
            lines.append(f"python {name}")
    return "\n".join(lines) + "\n"


# ---- the conventions themselves --------------------------------------------------------------

def test_parser_reads_blocks_markers_and_shortening():
    text = ("<!-- readme-test: skip, needs a GPU -->\n```bash\npython a.py\n```\n\n"
            "```python\nprint(1)\n```\n```\noutput\n```\n")
    blocks = readme_blocks(text)
    assert [(b.language, b.line, b.skip) for b in blocks] == [("bash", 2, "needs a GPU"), ("python", 6, None),
                                                              ("", 9, None)]
    with pytest.raises(ValueError, match="right above a code block"):
        readme_blocks("<!-- readme-test: skip, x -->\n\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match="must read"):
        readme_blocks("<!-- readme-test: skip -->\n```bash\nls\n```\n")
    line = 'python train.py --out "runs/a # b" --steps 9  # a comment\n'
    tiny = shlex.join(TINY_TRAIN)
    assert shorten(line, "/x") == f'python train.py --out "runs/a # b" --steps 9 {tiny}  # a comment\n'
    assert shorten("python sample.py --model stabilityai/stable-diffusion-3.5-large --out a.png\n", "/tiny") == \
        "python sample.py --model /tiny --out a.png\n"


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_commands_are_in_fenced_blocks(page):
    """An indented command would never run here; write it in a ```bash block (skipped if need be)."""
    indented = [n for n, line in enumerate(page.read_text().splitlines(), start=1)
                if re.match(r"    (python|torchrun|make|pip|source)\b", line)]
    assert not indented, f"{page_name(page)} lines {indented}: put commands in fenced ```bash blocks"


def runnable(page: Path) -> list[Block]:
    blocks = readme_blocks(page.read_text(), page_name(page))
    return [b for b in blocks if b.language in RUN_LANGUAGES and b.skip is None]


def test_the_pages_run_code():
    """The README and the pages about calling and training the models are run, not only read."""
    counts = {page_name(page): len(runnable(page)) for page in PAGES}
    assert counts["README.md"] >= 2 and any(b.language == "python" for b in runnable(README))
    for name in ("docs/sampling.md", "docs/training.md", "docs/sd3-bridge.md"):
        assert counts[name] >= 2, counts


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)], ids=page_name)
def test_page_runs_as_written(page, tmp_path, tiny_sd3_dir):
    blocks = readme_blocks(page.read_text(), page_name(page))
    run = [b for b in blocks if b.language in RUN_LANGUAGES and b.skip is None]
    copy = tmp_path / "minidiff"
    committed = {path: digest(path) for path in fresh_copy(copy)}
    env, stop = readme_environment(copy, tmp_path)
    script = tmp_path / "page.sh"
    script.write_text(script_for(blocks, copy, str(tiny_sd3_dir), page_name(page)))
    try:
        done = subprocess.run(["bash", str(script)], cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    finally:
        stop()
    output = done.stdout + done.stderr
    where = re.findall(r"::\S+\.md line \d+", done.stderr)
    assert done.returncode == 0, f"failed at {where[-1] if where else 'the start'}:\n{output[-4000:]}"
    assert "Traceback" not in output, output[-4000:]
    assert len(where) == len(run)  # every block ran
    changed = [str(path.relative_to(copy)) for path, hashed in committed.items()
               if not path.exists() or digest(path) != hashed]
    assert not changed, f"{page_name(page)} commands changed committed files: {changed}"
    created = [str(path.relative_to(copy)) for path in copy.rglob("*") if path.is_file() and path not in committed
               and not re.fullmatch(r"[a-z0-9_-]+-line-\d+\.py", str(path.relative_to(copy)))]  # the blocks run
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--no-index", "--stdin"], input="\n".join(created),
                             capture_output=True, text=True).stdout.splitlines()
    stray = sorted(set(created) - set(ignored))
    assert not stray, f"{page_name(page)} commands left files that `git status` would show: {stray[:10]}"


# ---- what the pages say must stay true -----------------------------------------------------------

def test_reading_table_is_current():
    """The README's reading table is `python -m minidiff.tools.lines`: refresh it when the lesson changes."""
    from minidiff.tools.lines import table

    lines = README.read_text().splitlines()
    start = lines.index(table().splitlines()[0])  # the header row
    end = next((k for k in range(start, len(lines)) if not lines[k].startswith("|")), len(lines))
    shown = "\n".join(lines[start:end])
    assert shown == table(), ("README.md's reading table differs from `python -m minidiff.tools.lines`; "
                              "paste its output into README.md")


def test_lesson_imports_only_itself_and_third_party_libraries():
    """The lesson's files (those `minidiff.tools.lines` counts) import each other and third-party libraries:
    not the machinery (minidiff.tools), the bridge, Gradio, argparse or matplotlib. The entry points it
    lists apart are the files that do."""
    import ast

    from minidiff.tools.lines import ENTRY_POINTS, lesson_files

    banned = {"minidiff", "bridge", "gradio", "argparse", "matplotlib"}
    found = []
    for path in lesson_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: a sibling file of the lesson only
                target = (node.module or "").split(".")[0]
                if node.level > 1 or not target or target == "tools" or f"{target}.py" in ENTRY_POINTS:
                    found.append(f"{path.name}: from {'.' * node.level}{node.module or ''} import ...")
            else:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) else []
                found += [f"{path.name}: {name}" for name in names if name.split(".")[0] in banned]
    assert len(lesson_files()) >= 8 and not found, found


NAMED = re.compile(r"`((?:minidiff|bridge|diffusers)(?:\.\w+)+)`")


def resolve(dotted: str):
    """The object a dotted name names: the longest importable module, then attributes."""
    import importlib

    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for attribute in parts[k:]:
            found = getattr(found, attribute)
        return found
    raise ImportError(dotted)


def test_named_functions_exist():
    names = sorted({name for page in PAGES for name in NAMED.findall(page.read_text())})
    assert len(names) >= 20  # docs/maths.md names about 30
    missing = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"named in README.md or docs/ but not found: {missing}"


def test_relative_links_point_at_files():
    """Every relative link or picture of the README and docs/ exists, and the README links every docs page."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page_name(page)}: {target}")
    assert not broken, broken
    readme = README.read_text()
    unlinked = [page_name(p) for p in PAGES[1:] if f"({page_name(p)})" not in readme]
    assert not unlinked, f"README.md does not link {unlinked}"
