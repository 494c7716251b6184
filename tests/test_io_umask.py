"""Atomic writes set file permissions from the umask without ever changing the process umask."""

import os
import threading

import torch

from hiermem.io import atomic_write_bytes, load_tensors, save_tensors


def test_atomic_writes_never_touch_the_process_umask(tmp_path, monkeypatch):
    real_umask = os.umask
    before = real_umask(0o027)
    calls = []
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real_umask(mask))
    try:
        def write(i):
            for j in range(20):
                atomic_write_bytes(tmp_path / f"b{i}-{j}.bin", b"x" * j)
                save_tensors(tmp_path / f"t{i}-{j}.safetensors", {"x": torch.full((3,), float(j))}, {"j": j})

        threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert calls == []  # os.umask sets the mask of every thread: reading it that way is a race
        assert real_umask(0o027) == 0o027
    finally:
        real_umask(before)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 160 and all(f.stat().st_mode & 0o777 == 0o640 for f in files)
    assert load_tensors(tmp_path / "t3-19.safetensors")[1] == {"j": 19}
