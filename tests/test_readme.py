"""README.md's examples, run as written, in README order.

What runs: every ```python block, and every line of every ```bash / ```sh block (lines ending in
``\\`` are joined, ``# comments`` dropped, ``a && b`` runs a then b, ``VAR=value`` prefixes set the
environment). Such a line must start a console script of this package (``hiermem``,
``hiermem-lm-eval``, ...) or ``python``; anything else fails the test. Blocks without a language
(diagrams) and other languages (yaml, json) are not run. New README sections are picked up by
themselves.

Skipping: a block that must not run in tests (``make``, long trainings, GPUs, ``torchrun`` /
``accelerate launch``) carries, as the last non-blank line before its opening fence::

    <!-- readme-test: skip (why it cannot run in tests) -->

The reason is required and shown as the skip reason. Nothing else skips a block.

How it runs: blocks share one scratch folder (the working directory) and run in order, so a block
sees what earlier ones wrote; python blocks share one namespace (a later snippet continues the
quick start). Commands run in process (fast) except those in ``LONG_RUNNING``, which start in the
background (with the same stand-ins) for the blocks after them. Interactive commands read ``STDIN``.

Tiny stand-ins (so the whole file runs in about a minute on 2 cores; see ``apply_stand_ins``):

- the bundled backbone (``smollm2-135m``, any bundled or .gguf name) -> a 2-layer, hidden-32 Llama
  with a character tokenizer and a chat template (``tests/tiny.py``);
- other released weights (``hrmlm-shakespeare``, 15 MB) run as they are;
- the released weights (``hmt-smollm2-135m``, the default model) -> an HMT (segments of 16 tokens,
  4 sensory, cache 5) over that backbone;
- the ``shakespeare`` corpus -> the same plays, each cut to its first ``PLAY_CHARS`` characters;
- ``$HIERMEM_CACHE`` -> a folder inside the scratch folder;
- files the README names as the user's own (long.txt, my_docs/, runs/hmt/final, ...) -> ``FIXTURES``;
- sizes: ``SIZES`` options are appended to a command (the last value wins) when it has them;
- ports (``--port 8000``, ``127.0.0.1:8000``; a server started without --port) -> free ones.

``python tests/test_readme.py --stand-ins FOLDER -- hiermem ARGS`` runs one command with the
stand-ins of FOLDER (what ``LONG_RUNNING`` commands run as).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"^<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->$")
MARKER = "readme-test:"
SHELL_LANGS, PYTHON_LANGS = {"bash", "sh", "shell"}, {"python", "py"}
PLAY_CHARS = 3000

# options appended to a command (key: its first words) when its --help lists them
SIZES = {
    ("train",): ["--steps", "2", "--segment-length", "16", "--sensory-length", "4", "--cache-size", "4",
                 "--stage2-segments", "3", "--window", "32", "--batch-size", "2", "--eval-every", "2",
                 "--eval-batches", "1", "--vocab-size", "512", "--warmup", "1", "--lora-r", "2",
                 "--max-minutes", "0.2", "--no-progress", "--no-tensorboard"],
    ("tokenizer", "train"): ["--vocab-size", "512"],
    ("compare",): ["--budget-minutes", "0.02", "--documents", "1", "--max-chars", "400", "--bin-bytes", "100",
                   "--passkey-lengths", "256", "--passkey-samples", "1", "--vocab-size", "512"],
    ("eval",): ["--documents", "2", "--max-tokens", "80", "--recall-lengths", "256", "--recall-samples", "1"],
    ("demo",): ["--tokens", "64", "--max-new-tokens", "8"],
    ("generate",): ["--max-new-tokens", "8"],
    ("chat",): ["--max-new-tokens", "8"],
}
KEPT = {"--batch-size"}  # stand-in sizes that do not override the README's own value
STDIN = {("chat",): "Hello there\n/stats\n/save\n/quit\n"}  # what interactive commands read
LONG_RUNNING = {("serve",)}  # run until stopped: started in the background
PORT = re.compile(r"(--port[ =]|(?:127\.0\.0\.1|localhost):)(\d{2,5})\b")

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light.\n")
FIXTURES = {  # the user's own files the README names -> content
    "long.txt": TEXT * 12,
    "chapter.txt": TEXT * 4,
    "my_docs/scene1.txt": "Scene one.\n" + TEXT * 6,
    "my_docs/scene2.txt": "Scene two.\n" + TEXT * 5,
    "prompts.jsonl": '{"prompt": "Once upon a time", "id": "q1"}\n{"prompt": "The sea", "max_new_tokens": 4}\n',
    "my.yaml": "model:\n  hidden_size: 64\n  num_layers: 2\n  num_heads: 2\n  context_length: 64\n"
               "tokenizer:\n  type: bpe\n  vocab_size: 512\ndata:\n  window: 32\ntraining:\n  steps: 2\n"
               "  batch_size: 2\n",
    "my_tasks/my_task.yaml": "task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                             "    test: {root}/my_tasks/my_task.jsonl\ntest_split: test\n"
                             "output_type: multiple_choice\ndoc_to_text: \"{{{{question}}}}\"\n"
                             "doc_to_choice: \"{{{{choices}}}}\"\ndoc_to_target: \"{{{{label}}}}\"\n"
                             "metric_list:\n  - metric: acc\n",
    "my_tasks/my_task.jsonl": '{"question": "Question: which colour is the sky? Answer:", "choices": ["blue", '
                              '"green"], "label": 0}\n',
}


# --- the README's blocks ------------------------------------------------------------------------
@dataclass
class Block:
    lang: str
    line: int  # of the opening fence (1-based)
    text: str
    skip: str | None  # the reason given in the skip marker

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang}"


def readme_blocks(text: str) -> list[Block]:
    """Fenced code blocks of a Markdown text, each with the skip reason of a marker just before it."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^ {0,3}(`{3,})\s*([\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        before = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
        skip = None
        if MARKER in before:
            m = SKIP.match(before)
            if not m:
                raise ValueError(f"README.md:{i}: malformed marker {before!r}; write <!-- readme-test: skip (reason) -->")
            skip = m["reason"].strip()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence[1]), len(lines))
        blocks.append(Block(fence[2].lower(), i + 1, "\n".join(lines[i + 1:end]), skip))
        i = end + 1
    return blocks


def shell_commands(text: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, && split."""
    commands = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1:]
    return [c for c in commands if c]


def _runnable() -> list[Block]:
    return [b for b in readme_blocks(README.read_text(encoding="utf-8")) if b.lang in SHELL_LANGS | PYTHON_LANGS]


# --- stand-ins ------------------------------------------------------------------------------------
def build_stand_ins(root: Path) -> None:
    """Write the tiny backbone, the tiny release and the user's files under ``root``."""
    import shutil

    import torch

    from hiermem.models.hmt import HMT, HMTConfig
    from tiny import tiny_backbone, tiny_tokenizer

    assets = root / ".stand-ins"
    backbone = tiny_backbone("llama")
    backbone.save_pretrained(assets / "backbone")
    tiny_tokenizer(chat_template=True).save_pretrained(assets / "backbone")
    model = HMT(backbone, HMTConfig(segment_length=16, sensory_length=4, cache_size=5))  # backbone: smollm2-135m
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in model.memory_parameters().values():  # memory that matters, as trained weights would
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    release = assets / "weights" / "hmt-smollm2-135m"
    model.save_pretrained(release)
    import hiermem.models as models

    for real in (Path(models.__file__).resolve().parent.parent / "weights").iterdir():
        if real.name != release.name and (real / "config.json").exists():  # small releases run as they are
            (release.parent / real.name).symlink_to(real, target_is_directory=True)
    shutil.copytree(release, root / "runs" / "hmt" / "final")  # the user's trained checkpoint
    for name, content in FIXTURES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content.format(root=root) if name.endswith(".yaml") else content)


def apply_stand_ins(root: Path):
    """Point the bundled backbone, the released weights, the shakespeare corpus and the cache at the
    tiny stand-ins under ``root``; returns a function that undoes it."""
    import hiermem.backbones as backbones
    import hiermem.models as models
    from hiermem.data import corpora

    assets = root / ".stand-ins"
    real_play = corpora.CORPORA["shakespeare"]

    def plays():
        try:
            docs = real_play()
        except Exception:  # corpus not installed: same ids, made-up text
            docs = [corpora.Document(f"shakespeare/play{i}", "") for i in range(42)]
        return [corpora.Document(d.id, (d.text[:PLAY_CHARS] or f"{d.id}\n" + TEXT * 20)) for d in docs]

    saved = (backbones.bundled_gguf, backbones.convert_gguf, models.WEIGHTS_ROOT, os.environ.get("HIERMEM_CACHE"))
    backbones.bundled_gguf = lambda name: assets / f"{name}.gguf"
    backbones.convert_gguf = lambda gguf: assets / "backbone"
    models.WEIGHTS_ROOT = assets / "weights"
    corpora.CORPORA["shakespeare"] = plays
    os.environ["HIERMEM_CACHE"] = str(root / ".cache")
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(name, "1")

    def undo():
        backbones.bundled_gguf, backbones.convert_gguf, models.WEIGHTS_ROOT, cache = saved
        corpora.CORPORA["shakespeare"] = real_play
        if cache is None:
            os.environ.pop("HIERMEM_CACHE", None)
        else:
            os.environ["HIERMEM_CACHE"] = cache

    return undo


# --- running ----------------------------------------------------------------------------------------
def console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _key(table, words: list[str]):
    return next((k for k in table if tuple(words[:len(k)]) == k), None)


class Runner:
    """Runs README blocks in one scratch folder, with the stand-ins applied."""

    def __init__(self, root: Path):
        self.root = root
        self.namespace: dict = {"__name__": "__readme__"}
        self.background: list[subprocess.Popen] = []
        self._ports: dict[int, int] = {}  # README port -> free port
        self._options: dict[tuple, set[str]] = {}

    def close(self) -> None:
        """Stop the background commands (SIGTERM, as a user's Ctrl+C would)."""
        for proc in self.background:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def port(self, wanted: int) -> str:
        if wanted not in self._ports:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self._ports[wanted] = s.getsockname()[1]
        return str(self._ports[wanted])

    def ports(self, text: str) -> str:
        return PORT.sub(lambda m: f"{m[1]}{self.port(int(m[2]))}", text)

    def run_python(self, block: Block) -> None:
        code = compile("\n" * block.line + self.ports(block.text), str(README), "exec")  # README line numbers
        exec(code, self.namespace)

    def run_shell(self, block: Block) -> None:
        for words in shell_commands(self.ports(block.text)):
            self.run_command(words, block)

    def options(self, script: str, words: list[str]) -> set[str]:
        """The --options a command of the hiermem console script takes (from its --help)."""
        from hiermem.cli import DISPATCH, main

        head = tuple(words[:2] if words[0] in DISPATCH else words[:1])
        if head not in self._options:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
                main([*head, "--help"])
            self._options[head] = set(re.findall(r"--[a-z][a-z0-9-]*", out.getvalue()))
        return self._options[head]

    def sized(self, words: list[str]) -> list[str]:
        key = _key(SIZES, words)
        if key is None:
            return words
        known, extra, sizes = self.options("hiermem", words), [], SIZES[key]
        for i, flag in enumerate(sizes):
            if flag in KEPT and flag in words:
                continue  # the README's own choice stands (e.g. --batch-size 1 with --carry-state)
            if flag.startswith("--") and flag in known:
                values = [v for v in sizes[i + 1:i + 2] if not v.startswith("--")]
                extra += [flag, *values]
        return words + extra

    def run_command(self, words: list[str], block: Block) -> None:
        env = {}
        while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        program, args = words[0], words[1:]
        scripts = console_scripts()
        if program == "python" and args[:2] == ["-m", "hiermem"]:
            program, args = "hiermem", args[2:]
        if program == "hiermem":
            args = self.sized(args)
            if _key(LONG_RUNNING, args):
                return self.start(args, env)
        with _environ(env), _stdin(STDIN.get(_key(STDIN, args)) if program == "hiermem" else None):
            if program in scripts:
                module, func = scripts[program].split(":")
                code = _call([program, *args], lambda: getattr(__import__(module, fromlist=[func]), func)())
            elif program == "python" and args[:1] == ["-m"]:
                code = _call(args[1:], lambda: runpy.run_module(args[1], run_name="__main__", alter_sys=True))
            elif program == "python" and args and args[0].endswith(".py"):
                code = _call(args, lambda: runpy.run_path(args[0], run_name="__main__"))
            else:
                pytest.fail(f"README.md:{block.line}: cannot run `{' '.join(words)}` in tests; write it with a "
                            "console script of this package or python, or mark the block with "
                            "<!-- readme-test: skip (reason) -->")
        assert code in (None, 0), f"README.md:{block.line}: `{shlex.join([program, *args])}` exited with {code}"

    def start(self, args: list[str], env: dict) -> None:
        """A command that runs until stopped, in the background with the same stand-ins; ready once
        its port answers GET /health."""
        self.close()  # a later server takes over from an earlier one
        args = [x for a in args for x in (a.split("=", 1) if a.startswith("--port=") else [a])]
        if "--port" not in args:
            args = [*args, "--port", self.port(8000)]
        port = args[args.index("--port") + 1]
        log = self.root / f"background-{len(self.background)}.log"
        cmd = [sys.executable, __file__, "--stand-ins", str(self.root), "--", "hiermem", *args]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=self.root, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
        self.background.append(proc)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"`hiermem {shlex.join(args)}` exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as res:
                    if res.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        pytest.fail(f"`hiermem {shlex.join(args)}` did not answer on port {port} within 120 s:\n{log.read_text()}")


def _call(argv: list[str], fn):
    """Run ``fn`` with ``sys.argv = argv``: the int it returns or exits with (None for success)."""
    saved = sys.argv
    sys.argv = list(argv)
    try:
        out = fn()
        return out if isinstance(out, int) else None
    except SystemExit as exc:
        return exc.code
    finally:
        sys.argv = saved


@contextlib.contextmanager
def _environ(env: dict):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _stdin(text: str | None):
    if text is None:
        yield
        return
    saved = sys.stdin
    sys.stdin = io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = saved


# --- tests ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    build_stand_ins(root)
    undo = apply_stand_ins(root)
    cwd = os.getcwd()
    os.chdir(root)
    run = Runner(root)
    try:
        yield run
    finally:
        run.close()
        os.chdir(cwd)
        undo()


def test_readme_documents_the_convention():
    head = README.read_text(encoding="utf-8")[:3000]
    assert "<!-- readme-test: skip (" in head and "tests/test_readme.py" in head


def test_blocks_are_found_with_their_skip_markers():
    text = ("# T\n\n```bash\nhiermem info\n```\n\n<!-- readme-test: skip (needs a GPU) -->\n\n```sh\nmake x \\\n"
            "  && hiermem eval  # comment\n```\n\n```\ndiagram\n```\n")
    blocks = readme_blocks(text)
    assert [(b.lang, b.line, b.skip) for b in blocks] == [("bash", 3, None), ("sh", 9, "needs a GPU"), ("", 14, None)]
    assert shell_commands(blocks[1].text) == [["make", "x"], ["hiermem", "eval"]]
    with pytest.raises(ValueError, match="malformed marker"):
        readme_blocks("<!-- readme-test: skip -->\n```bash\nmake\n```\n")


@pytest.mark.parametrize("block", _runnable(), ids=lambda b: b.id)
def test_readme_block_runs(block, runner):
    if block.skip:
        pytest.skip(block.skip)
    if block.lang in PYTHON_LANGS:
        runner.run_python(block)
    else:
        runner.run_shell(block)


if __name__ == "__main__":  # python tests/test_readme.py --stand-ins FOLDER -- hiermem ARGS
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    folder, rest = sys.argv[2], sys.argv[sys.argv.index("--") + 1:]
    apply_stand_ins(Path(folder))
    from hiermem.cli import main

    sys.exit(main(rest[1:]))
