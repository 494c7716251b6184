"""What a user sees in the terminal: no deprecation noise, no progress bars of other libraries, and
a chat whose prompt and replies stay on stdout with no warning in between."""

import os
import pty
import select
import subprocess
import sys
import time
import warnings

import pytest

from tiny import random_ids, tiny_hmt, tiny_model_folder


def test_hmt_reads_and_decodes_with_the_current_cache_api():
    from hiermem.models.hmt import HMTDecoder

    model = tiny_hmt("llama", cache_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning (past_key_values is deprecated) fails here
        model(random_ids(1, 40), labels=random_ids(1, 40))
        dec = HMTDecoder(model)
        dec.feed(random_ids(1, 20))
        dec.feed(random_ids(1, 3))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("quiet"))


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}


def test_generate_prints_no_progress_bars_or_deprecations(folder):
    res = subprocess.run([sys.executable, "-m", "hiermem", "generate", "--model", str(folder), "--prompt", "Hello",
                          "--max-new-tokens", "20"], capture_output=True, text=True, timeout=120, env=_env())
    assert res.returncode == 0, res.stderr
    assert "Loading weights" not in res.stderr and "deprecated" not in res.stderr.lower()
    assert res.stderr.strip().splitlines()[-1].startswith("[5 prompt + ")  # only the summary line


def _read_until_exit(proc, fd: int, timeout: float = 120) -> str:
    chunks, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            chunks.append(data.decode(errors="replace"))
        elif proc.poll() is not None:
            break
    return "".join(chunks)


def test_chat_prompt_and_replies_stay_on_stdout_without_warnings(folder):
    """On a terminal (stdin and stdout a tty, as a user runs it), `> ` goes to stdout, and stderr
    holds nothing but what comes before the conversation."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "hiermem", "chat", "--model", str(folder), "--max-new-tokens",
                             "12", "--seed", "0"], stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=_env(),
                            close_fds=True)
    os.close(slave)
    os.write(master, b"Hello there\n/stats\n/quit\n")
    screen = _read_until_exit(proc, master)
    proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    os.close(master)
    assert proc.returncode == 0, err
    assert screen.count("> ") >= 3 and "turns=1" in screen
    assert "> " not in err and "warn" not in err.lower() and "deprecat" not in err.lower(), err
