"""Sharded (FSDP) checkpoints: two CPU processes under torchrun (gloo) train a tiny from-scratch
Transformer with FSDP2, are interrupted, resume from the per-rank shards and match the
uninterrupted run exactly; the layout guards and the metadata check refuse what they must."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hiermem.data import TokenizedCorpus, WindowLoader
from hiermem.errors import CheckpointError
from hiermem.io import load_tensors
from hiermem.models import load_model
from hiermem.training import TrainConfig, Trainer
from hiermem.training.sharded import SHARDS_DIR, check_resume, check_shards

TESTS = Path(__file__).resolve().parent

ENTRY = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    import torch
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from hiermem.io import save_tensors
    from hiermem.training import Trainer, make_accelerator
    from test_training_sharded import fsdp_config, tiny_loaders, tiny_model

    torch.set_num_threads(1)
    acc = make_accelerator("cpu")
    # Accelerate switches FSDP on only for accelerators; torch's FSDP2 itself runs on gloo CPU processes.
    # Set what AcceleratorState sets under `accelerate launch --use_fsdp --fsdp_version 2`:
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    acc.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    out = Path(sys.argv[1])

    class Recording(Trainer):
        stop_at = None

        def _train_step(self, batches):
            if self.step + 1 == self.stop_at and acc.process_index == 0:
                os.kill(os.getpid(), signal.SIGINT)  # rank 0 only: every process stops after this step
            res = super()._train_step(batches)
            self.losses = getattr(self, "losses", []) + [res.get("loss")]
            return res

    def run(name, seed=0, stop_at=None, resume=False):
        trainer = Recording(tiny_model(seed), fsdp_config(), *tiny_loaders(acc.process_index, 2),
                            output_dir=out / name, accelerator=acc)
        trainer.stop_at = stop_at
        return trainer, trainer.fit(resume=resume)

    straight, res_a = run("straight")
    first, res_b = run("resumed", stop_at=4)
    torch.manual_seed(123)  # the RNG state comes from the checkpoint
    second, res_c = run("resumed", seed=5, resume=True)  # other initial weights: they come from the shards
    second.export(res_c, out / "final")
    assert acc.distributed_type == DistributedType.FSDP and type(second.wrapped).__name__ == "FSDPTransformer"
    weights = [{k: v.full_tensor() for k, v in t.wrapped.state_dict().items()} for t in (straight, second)]
    if acc.is_main_process:
        for name, w in zip(("straight", "resumed"), weights):
            save_tensors(out / f"{name}.safetensors", {k: v.clone() for k, v in w.items()})
        json.dump({"status": [res_a.status, res_b.status, res_c.status],
                   "losses": [straight.losses, first.losses + second.losses],
                   "evaluations": [res_a.evaluations, res_c.evaluations]}, open(out / "result.json", "w"))
""")


def tiny_model(seed=0):
    from hiermem.models.transformer import Transformer, TransformerConfig

    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, context_length=16))


def tiny_loaders(rank=0, world_size=1):
    def corpus(n, offset):
        docs = [torch.randint(0, 64, (120,), generator=torch.Generator().manual_seed(offset + i)) for i in range(n)]
        return TokenizedCorpus.from_token_lists([d.tolist() for d in docs])

    return (WindowLoader(corpus(8, 0), 16, 2, seed=0, rank=rank, world_size=world_size),
            WindowLoader(corpus(4, 100), 16, 2, seed=0, rank=rank, world_size=world_size))


def fsdp_config():
    return TrainConfig(steps=6, batch_size=2, grad_accum=2, lr=1e-2, warmup=1, schedule="cosine", eval_every=3,
                       eval_batches=2, save_every=3, trainable="full", tensorboard=False, progress=False)


def test_fsdp_two_cpu_processes_resume_exactly(tmp_path):
    (tmp_path / "entry.py").write_text(ENTRY)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HIERMEM_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "entry.py"), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, "\n".join([l for l in done.stderr.splitlines() if "[rank" in l][-40:])
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == ["completed", "interrupted", "completed"]
    straight, resumed = result["losses"]
    assert len(straight) == 6 and straight == resumed  # the same loss at every step, bit for bit
    evaluations = result["evaluations"]
    assert [e["step"] for e in evaluations[0]] == [3, 6] and evaluations[0] == evaluations[1]
    a, b = (load_tensors(tmp_path / f"{n}.safetensors")[0] for n in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm.model.norm.weight"], tiny_model().lm.model.norm.weight.detach())

    folder = tmp_path / "resumed" / "step-00000006"
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "trainer_state.json", "trainer_state.safetensors",
            "trainer_rank-00000.safetensors", "trainer_rank-00001.safetensors"} <= files
    assert {f"{SHARDS_DIR}/{part}/{name}" for part in ("pytorch_model_fsdp_0", "optimizer_0")
            for name in (".metadata", "__0_0.distcp", "__1_0.distcp")} <= files
    assert not [f for f in files if f.endswith((".pkl", ".bin", ".pt"))]
    state = json.loads((folder / "trainer_state.json").read_text())
    assert (state["sharding"], state["world_size"], state["distributed_type"], state["fsdp_version"]) == (
        "fsdp", 2, "FSDP", 2)
    for saved in (folder, tmp_path / "final"):  # the gathered weights load as a plain model
        model = load_model(str(saved))
        assert all(torch.equal(v, a[k]) for k, v in model.state_dict().items() if k in a)

    # one process cannot continue the two FSDP shards
    single = tmp_path / "single"
    shutil.copytree(tmp_path / "resumed", single)
    with pytest.raises(CheckpointError, match=r"FSDP v2 \(FSDP\) on 2 processes.*unsharded .* on 1 processes"):
        Trainer(tiny_model(), fsdp_config().replace(steps=8), *tiny_loaders(), output_dir=single).fit(resume=True)
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        check_shards(folder / SHARDS_DIR / part)  # what FSDP wrote passes the safety check


@pytest.mark.parametrize("family", ["hmt-lora", "transformer"])
def test_meta_twin_writes_what_save_pretrained_writes(tmp_path, family):
    from tiny import tiny_hmt

    from hiermem.training import make_accelerator
    from hiermem.training.sharded import meta_twin, save_pretrained_full
    from hiermem.training.trainer import select_trainable

    if family == "transformer":
        model, mode = tiny_model(), "full"
    else:
        model, mode = tiny_hmt(lora={"r": 2, "alpha": 4, "target_modules": ["q_proj"]}), "lora"
    select_trainable(model, mode)
    twin = meta_twin(model)
    assert all(t.is_meta for t in [*twin.parameters(), *twin.buffers()])
    assert [n for n, p in twin.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad]
    save_pretrained_full(make_accelerator("cpu"), model, twin, tmp_path / "gathered")
    model.save_pretrained(tmp_path / "direct")
    names = sorted(p.name for p in (tmp_path / "direct").iterdir())
    assert sorted(p.name for p in (tmp_path / "gathered").iterdir()) == names
    for name in names:
        if name.endswith(".safetensors"):
            a, b = (load_tensors(tmp_path / d / name)[0] for d in ("direct", "gathered"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(t.is_meta for t in twin.parameters())  # each save fills a copy, the twin stays empty


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_shard_check_refuses_pickled_code(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    monkeypatch.chdir(tmp_path)
    plain = {"w": torch.ones(3), "group": {"lr": 0.1, "betas": (0.9, 0.95), "name": "decay"}}
    dcp.save(plain, checkpoint_id=tmp_path / "plain")  # one process, as torch allows
    check_shards(tmp_path / "plain")
    dcp.save({"w": torch.ones(3), "group": _Payload()}, checkpoint_id=tmp_path / "item")  # a pickled non-tensor item
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": _Payload()}))
    for bad in ("item", "index"):
        with pytest.raises(CheckpointError, match=f"refusing to load .*{bad}: .*system"):
            check_shards(tmp_path / bad)
    assert not (tmp_path / "pwned").exists()


def test_layout_guards():
    plain = {"sharding": None, "world_size": 2, "distributed_type": "MULTI_CPU"}
    check_resume({"world_size": 2}, plain, Path("ck"))  # checkpoints written before these fields
    check_resume(plain, {**plain, "distributed_type": "MULTI_GPU"}, Path("ck"))  # unsharded: devices may change
    with pytest.raises(CheckpointError, match="written by 2 processes, this run has 4"):
        check_resume(plain, {**plain, "world_size": 4}, Path("ck"))
    fsdp = {"sharding": "fsdp", "world_size": 2, "distributed_type": "FSDP", "fsdp_version": 2}
    check_resume(fsdp, dict(fsdp), Path("ck"))
    for now in ({**fsdp, "world_size": 4}, {**fsdp, "fsdp_version": 1}, plain):
        with pytest.raises(CheckpointError, match="same launch settings.*--num_processes 2"):
            check_resume(fsdp, now, Path("ck"))
    with pytest.raises(CheckpointError, match="unsharded"):
        check_resume(plain, fsdp, Path("ck"))
