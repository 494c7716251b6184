"""``hiermem train`` end to end in real processes: the two-stage recipe on a tiny backbone saved to
disk, a real SIGTERM, resuming, and two CPU processes under torchrun (gloo)."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hiermem.backbones import load_backbone
from hiermem.data import TokenizedCorpus
from hiermem.io import load_tensors
from hiermem.models import load_model
from hiermem.training import Trainer, TrainConfig
from tiny import random_ids, tiny_backbone

TESTS = Path(__file__).resolve().parent
WORDS = ("the of and to in memory segment long document read write model train token river stone light "
         "north south winter summer king queen ship harbour").split()



@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama + BPE tokenizer saved as a Hugging Face folder, and a folder of text documents."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(300)) for _ in range(24)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(root / "model")
    tiny_backbone("llama").save_pretrained(root / "model")
    (root / "texts").mkdir()
    for i, text in enumerate(texts):
        (root / "texts" / f"doc{i:02d}.txt").write_text(text)
    return root


def env(root: Path) -> dict:
    return {**os.environ, "HIERMEM_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def train_args(assets: Path, out: Path, stage1: int, stage2: int) -> list[str]:
    return ["train", "hmt", "--backbone", str(assets / "model"), "--source", str(assets / "texts"),
            "--output-dir", str(out), "--stage1-steps", str(stage1), "--stage2-steps", str(stage2),
            "--segment-length", "16", "--sensory-length", "4", "--cache-size", "8", "--eval-every", "4",
            "--eval-batches", "2", "--save-every", "1000", "--warmup", "2", "--device", "cpu", "--no-progress"]


def test_cli_sigterm_then_resume_to_final(assets, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "hiermem", *train_args(assets, out, 100_000, 3)]
    proc = subprocess.Popen(cmd, env=env(assets), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # wait until stage 1 is training, then stop it like a scheduler would
        lines.append(line)
        if line.startswith("INFO hiermem.training.monitor: step 10/"):
            proc.send_signal(signal.SIGTERM)
            break
    stdout, rest = proc.communicate(timeout=120)
    log = "".join(lines) + rest
    assert "interrupted: checkpoint saved" in stdout
    assert proc.returncode == 128 + signal.SIGTERM, log
    assert "Traceback" not in log and "received SIGTERM" in log
    (ckpt,) = sorted((out / "stage1").glob("step-*"))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    stopped = state["step"]
    assert stopped >= 10 and ckpt.name == f"step-{stopped:08d}"
    assert state["hparams"]["stage"] == 1 and state["model_config"]["stage"] == 1

    # the same command with a reachable step count resumes stage 1, then runs stage 2
    cmd = [sys.executable, "-m", "hiermem", *train_args(assets, out, stopped + 2, 5)]
    done = subprocess.run(cmd, env=env(assets), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed from {ckpt}" in done.stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["stages"]["stage1"]["steps"] == stopped + 2 and summary["stages"]["stage2"]["steps"] == 5
    assert summary["stages"]["stage2"]["segments"] == 6 and summary["stages"]["stage2"]["val_history"]
    model = load_model(str(out / "final"), backbone=load_backbone(str(assets / "model")))
    assert model.config.stage == 2 and model.config.segment_length == 16
    # stage 2 starts from stage 1's weights and trains them further
    s1, _ = load_tensors(out / "stage1" / "final" / "memory.safetensors")
    s2 = dict(model.memory_parameters())
    assert not torch.equal(s1["summary_prompt"], s2["summary_prompt"].detach())


ENTRY = textwrap.dedent("""
    import json, sys, torch
    import torch.distributed as dist
    from hiermem.data import WindowLoader
    from hiermem.io import save_tensors
    from hiermem.training import Trainer, make_accelerator
    from test_training_cli import tiny_corpus, tiny_model, two_process_config

    torch.set_num_threads(1)
    acc = make_accelerator("cpu")
    assert dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() == 2
    seen = []

    class Recording(WindowLoader):
        def __next__(self):
            batch = super().__next__()
            seen.append(batch.tolist())
            return batch

    model = tiny_model()
    loader = Recording(tiny_corpus(), 48, 1, seed=0, rank=acc.process_index, world_size=2)
    Trainer(model, two_process_config(), loader, accelerator=acc).fit()
    out = sys.argv[1]
    save_tensors(f"{out}/params{acc.process_index}.safetensors", dict(model.memory_parameters()))
    with open(f"{out}/seen{acc.process_index}.json", "w") as fh:
        json.dump(seen, fh)
""")


def tiny_corpus():
    return TokenizedCorpus.from_token_lists([random_ids(1, 200, seed=i)[0].tolist() for i in range(8)])


def tiny_model():
    from tiny import tiny_hmt

    return tiny_hmt("llama")


def two_process_config():
    # a large eps keeps AdamW smooth in small gradients, so rounding cannot flip an update
    return TrainConfig(steps=3, batch_size=1, lr=0.1, eps=1e-3, warmup=0, schedule="constant", eval_every=0,
                       save_every=0, tensorboard=False, progress=False)


class Batches:
    """Replays fixed batches (the two ranks' windows side by side) with the loader interface."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        return self.batches[self.i - 1]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def test_torchrun_two_cpu_processes(tmp_path):
    (tmp_path / "entry.py").write_text(ENTRY)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "entry.py"), str(tmp_path)]
    done = subprocess.run(cmd, env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in (0, 1)]
    params = [load_tensors(tmp_path / f"params{r}.safetensors")[0] for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 3
    windows = [{tuple(w) for batch in s for w in batch} for s in seen]
    assert not windows[0] & windows[1]  # the ranks read different windows
    initial = dict(tiny_model().memory_parameters())
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), name  # and hold identical parameters
        assert not torch.equal(params[0][name], initial[name].detach()), name
    # one process on both ranks' windows at once reaches the same parameters
    model = tiny_model()
    both = [torch.tensor(seen[0][i] + seen[1][i]) for i in range(3)]
    Trainer(model, two_process_config().replace(batch_size=2), Batches(both)).fit()
    for name, value in model.memory_parameters().items():
        torch.testing.assert_close(value.detach(), params[0][name], rtol=1e-5, atol=1e-6)


def test_torchrun_cli(assets, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hiermem",
           *train_args(assets, out, 2, 0)]
    done = subprocess.run(cmd, env=env(assets), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (ckpt,) = (out / "stage1").glob("step-*")
    assert {p.name for p in ckpt.glob("trainer_rank-*")} == {"trainer_rank-00000.safetensors",
                                                            "trainer_rank-00001.safetensors"}
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2 and (out / "final" / "memory.safetensors").exists()


@pytest.mark.slow
def test_recipe_on_the_bundled_backbone_with_lora(tmp_path):
    from hiermem.cli import main

    out = tmp_path / "run"
    args = ["train", "hmt", "--output-dir", str(out), "--stage1-steps", "1", "--stage2-steps", "1",
            "--segment-length", "32", "--sensory-length", "8", "--cache-size", "4", "--eval-batches", "1",
            "--trainable", "lora", "--lora-r", "2", "--no-progress", "--no-tensorboard", "--device", "cpu"]
    assert main(args) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert [s["steps"] for s in summary["stages"].values()] == [1, 1]
    assert all(s["best_val_ppl"] and math.isfinite(s["best_val_ppl"]) for s in summary["stages"].values())
    weights, _ = load_tensors(out / "final" / "memory.safetensors")
    assert any("lora_" in name for name in weights) and "summary_prompt" in weights
    model = load_model(str(out / "final"))
    assert model.config.stage == 2 and model.config.lora["r"] == 2
    ids = torch.arange(100, 164).view(1, 64)
    with torch.no_grad():
        assert torch.isfinite(model(ids, labels=ids).loss)
