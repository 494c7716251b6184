"""The trainer on tiny models: exact resume, signals, non-finite steps, accumulation, trainable sets."""

import importlib.util
import json
import math
import os
import signal

import pytest
import torch

from hiermem.data import TokenizedCorpus, WindowLoader
from hiermem.errors import CheckpointError, ConfigError
from hiermem.models.hmt import HMT, HMTConfig
from hiermem.training import Trainer, TrainConfig, TrainingError
from hiermem.training.checkpoint import flatten_state, list_checkpoints, unflatten_state
from hiermem.training.schedules import lr_factor
from tiny import random_ids, tiny_backbone

SEG = 16
LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}


class ScriptedHMT(HMT):
    """A real HMT with injected faults: ``events`` maps a training forward call (1-based) to
    "nan" (the loss becomes NaN) or "sigint" (the process sends itself SIGINT)."""

    def __init__(self, *args, events=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.events, self.calls = dict(events or {}), 0

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if self.training:
            self.calls += 1
            event = self.events.get(self.calls)
            if event == "nan":
                out.loss = out.loss * float("nan")
            elif event == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
        return out



def make_model(events=None, **config):
    backbone = tiny_backbone("llama")
    for p in backbone.parameters():
        p.requires_grad_(False)
    cfg = HMTConfig(**{"backbone": "tiny-llama", "segment_length": SEG, "sensory_length": 4, "cache_size": 5,
                       **config})
    return ScriptedHMT(backbone, cfg, events=events)


def corpus(n_docs=10, length=200, seed=0):
    return TokenizedCorpus.from_token_lists([random_ids(1, length, seed=seed + i)[0].tolist() for i in range(n_docs)])


def loaders(batch=2, segments=3, seed=0):
    return (WindowLoader(corpus(), segments * SEG, batch, seed=seed),
            WindowLoader(corpus(3, seed=100), segments * SEG, batch, seed=seed))


def config(**kw):
    base = dict(steps=8, batch_size=2, lr=1e-2, warmup=2, schedule="cosine", eval_every=3, eval_batches=2,
                save_every=3, keep_last=2, tensorboard=False, progress=False, log_every=2)
    return TrainConfig(**{**base, **kw})


def trained(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_schedules():
    step = TrainConfig(steps=500, warmup=10, schedule="step", decay_every=100, decay_gamma=0.5)
    assert lr_factor(0, step) == pytest.approx(1 / 11) and lr_factor(9, step) == pytest.approx(10 / 11)
    assert [lr_factor(s, step) for s in (10, 109, 110, 310)] == [1.0, 1.0, 0.5, 0.125]
    cos = TrainConfig(steps=101, warmup=0, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cos) == 1.0 and lr_factor(100, cos) == pytest.approx(0.1)
    assert lr_factor(50, cos) == pytest.approx(0.55)
    lin = TrainConfig(steps=11, warmup=0, schedule="linear", min_lr_ratio=0.0)
    assert [round(lr_factor(s, lin), 6) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert lr_factor(7, TrainConfig(steps=20, warmup=0, schedule="constant")) == 1.0


def test_time_schedule_follows_the_budget():
    cos = TrainConfig(steps=10**6, warmup=2, schedule="cosine", schedule_by="time", max_minutes=1.0)
    assert lr_factor(0, cos, 50.0) == pytest.approx(1 / 3)  # warm-up still counts steps
    assert [lr_factor(9, cos, s) for s in (0.0, 30.0, 60.0, 600.0)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    lin = cos.replace(schedule="linear", min_lr_ratio=0.0)
    assert lr_factor(10**5, lin, 15.0) == pytest.approx(0.75)  # the step count does not matter
    for bad in (dict(max_minutes=None), dict(schedule="step")):
        with pytest.raises(ConfigError, match="schedule_by time"):
            cos.replace(**bad)


def test_time_budget_decays_lr_to_min_and_resume_accumulates_time(tmp_path):
    minutes, low = 0.04, 0.1  # 2.4 s of training; a step takes about 0.1 s
    cfg = config(steps=10**6, warmup=0, schedule="cosine", schedule_by="time", max_minutes=minutes,
                 min_lr_ratio=low, eval_every=0, save_every=0)
    first = Trainer(make_model(events={3: "sigint"}), cfg, *loaders(), output_dir=tmp_path)
    assert first.fit().status == "interrupted"
    state = json.loads((tmp_path / "step-00000003" / "trainer_state.json").read_text())
    spent = state["train_seconds"]
    assert 0 < spent < 60 * minutes and spent == first.train_seconds

    second = Trainer(make_model(), cfg, *loaders(), output_dir=tmp_path)
    second.resume(tmp_path / "step-00000003")
    assert second.train_seconds == spent  # the decay continues where it stopped
    res = second.fit(resume=True)
    assert res.status == "budget" and res.train_seconds >= 60 * minutes
    final_lr = second.optimizer.param_groups[0]["lr"]  # set from the time spent before the last step
    assert cfg.lr * low <= final_lr <= cfg.lr * (low + 0.25 * (1 - low))  # near the end of the decay
    assert json.loads((res.last_checkpoint / "trainer_state.json").read_text())["train_seconds"] == res.train_seconds

    again = Trainer(make_model(), cfg, *loaders(), output_dir=tmp_path).fit(resume=True)
    assert again.status == "budget" and again.step == res.step  # the whole run's budget is spent


@pytest.mark.parametrize("bad", [dict(steps=0), dict(lr=-1.0), dict(schedule="exp"), dict(precision="fp8"),
                                 dict(trainable="head"), dict(betas=(0.9, 1.5)), dict(grad_accum=0)])
def test_bad_config_is_refused(bad):
    with pytest.raises(ConfigError):
        TrainConfig(**bad)


def test_optimizer_state_roundtrips_without_pickle():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], betas=(0.8, 0.9))
    p.grad = torch.randn(3, 2)
    opt.step()
    skeleton, tensors = flatten_state({"optimizer": opt.state_dict(), "numbers": (1, 2.5, None)})
    json.dumps(skeleton)  # the structure is plain JSON
    back = unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert back["numbers"] == (1, 2.5, None)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    for key, value in opt.state_dict()["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][key], value)


def test_resume_after_signal_is_bit_exact(tmp_path):
    """2k steps straight == k steps, SIGINT (checkpoint), resume in a fresh trainer, k more steps."""
    k, accum = 4, 2
    cfg = config(steps=2 * k, grad_accum=accum, trainable="lora")
    straight = make_model(lora=LORA)
    Trainer(straight, cfg, *loaders(), output_dir=tmp_path / "a").fit()

    first = make_model(events={(k - 1) * accum + 1: "sigint"}, lora=LORA)
    handler = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under `nohup ... &`
    res = Trainer(first, cfg, *loaders(), output_dir=tmp_path / "b").fit()
    assert res.status == "interrupted" and res.step == k and res.signal == signal.SIGINT
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [3, 4]  # keep_last=2
    assert signal.getsignal(signal.SIGINT) is handler  # the handler found before the run is back

    second = make_model(lora=LORA)
    res = Trainer(second, cfg, *loaders(), output_dir=tmp_path / "b").fit(resume=True)
    assert res.status == "completed" and res.step == 2 * k
    a, b = trained(straight), trained(second)
    assert any("lora_" in n for n in a) and a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(a["summary_prompt"], trained(make_model(lora=LORA))["summary_prompt"])
    state = json.loads((tmp_path / "b" / "step-00000008" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["evaluations"]] == [3, 6, 8]
    assert state["train_config"]["grad_accum"] == accum and state["model_config"]["lora"] == LORA


def test_gradient_accumulation_is_token_weighted():
    """batch 2 in one step == two micro-batches of 1 (same windows, same update)."""
    cfg = config(steps=3, warmup=0, schedule="constant", eval_every=0, eps=1.0, lr=0.1)
    big = make_model()
    Trainer(big, cfg.replace(batch_size=2), WindowLoader(corpus(), 3 * SEG, 2, shuffle=False)).fit()
    small = make_model()
    Trainer(small, cfg.replace(batch_size=1, grad_accum=2), WindowLoader(corpus(), 3 * SEG, 1, shuffle=False)).fit()
    for name, value in trained(big).items():
        torch.testing.assert_close(trained(small)[name], value, rtol=1e-5, atol=1e-7)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    model = make_model(events={2: "nan", 5: "nan"})
    res = Trainer(model, config(steps=6), *loaders(), output_dir=tmp_path).fit()
    assert res.status == "completed" and res.nonfinite_steps == 2
    assert all(torch.isfinite(p).all() for p in trained(model).values())
    assert res.tokens == 4 * 2 * (3 * SEG - 1)  # only the 4 good steps count


def test_too_many_nonfinite_steps_stop_and_keep_last_checkpoint(tmp_path):
    model = make_model(events={s: "nan" for s in range(5, 40)})
    cfg = config(steps=30, save_every=2, max_nonfinite=4, eval_every=0)
    with pytest.raises(TrainingError, match="non-finite for 4 steps in a row.*step-00000004"):
        Trainer(model, cfg, *loaders(), output_dir=tmp_path).fit()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    good = make_model()  # the last good checkpoint resumes and its weights are finite
    trainer = Trainer(good, cfg.replace(steps=5), *loaders(), output_dir=tmp_path)
    assert trainer.fit(resume=True).step == 5
    assert all(torch.isfinite(p).all() for p in trained(good).values())


@pytest.mark.parametrize("mode", ["memory", "lora", "full"])
def test_trainable_sets(mode):
    model = make_model(lora=LORA if mode == "lora" else None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(model, config(steps=2, trainable=mode, eval_every=0), *loaders()).fit()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    memory = set(model.memory_parameters())
    assert memory <= changed
    backbone_changed = {n for n in changed if n.startswith("backbone.")}
    if mode == "memory":
        assert not backbone_changed
    elif mode == "lora":
        assert backbone_changed and all("lora_" in n for n in backbone_changed)
    else:
        assert any("embed_tokens" in n for n in backbone_changed) and any("mlp" in n for n in backbone_changed)


def test_lora_set_needs_adapters():
    with pytest.raises(ConfigError, match="LoRA"):
        Trainer(make_model(), config(trainable="lora"), *loaders())


def test_checkpoint_and_best_load_as_models(tmp_path):
    model = make_model()
    res = Trainer(model, config(steps=4, save_every=2, eval_every=2, tensorboard=True), *loaders(),
                  output_dir=tmp_path).fit()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/ppl")] == [2, 4]
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    assert res.best_checkpoint == tmp_path / "best" and res.best_metric == min(
        e["val_ppl"] for e in res.evaluations)
    files = {p.name for p in res.last_checkpoint.iterdir()}
    assert files == {"config.json", "memory.safetensors", "trainer_state.json", "trainer_state.safetensors",
                     "trainer_rank-00000.safetensors"}
    ids = random_ids(1, 40)
    last, best, at_best = (HMT.from_pretrained(folder, backbone=tiny_backbone("llama")) for folder in
                           (res.last_checkpoint, res.best_checkpoint, dict(list_checkpoints(tmp_path))[res.best_step]))
    with torch.no_grad():
        model.eval()
        assert torch.equal(last(ids).logits, model(ids).logits)
        assert torch.equal(best(ids).logits, at_best(ids).logits)  # whichever step was best
    # and the best weights reproduce the best validation perplexity
    assert Trainer(best, config(), *loaders()).evaluate()["val_ppl"] == pytest.approx(res.best_metric, rel=1e-6)


def test_validation_perplexity_is_exp_of_token_mean():
    model = make_model()
    val = WindowLoader(corpus(3, seed=100), 3 * SEG, 2, shuffle=False)
    record = Trainer(model, config(eval_batches=None), loaders()[0], val).evaluate()
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(val)):
            out = model(val.batch(0, i), labels=val.batch(0, i))
            nll, n = nll + float(out.loss) * out.num_tokens, n + out.num_tokens
    assert record["val_tokens"] == n and record["val_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-6)


def test_early_stopping(tmp_path):
    # lr too small to move fp32 weights: validation never improves after the first evaluation
    cfg = config(steps=50, lr=1e-12, warmup=0, schedule="constant", eval_every=2, patience=2)
    res = Trainer(make_model(), cfg, *loaders(), output_dir=tmp_path).fit()
    assert res.status == "early_stopped" and res.step == 6 and res.best_step == 2
    assert res.last_checkpoint.name == "step-00000006"


def test_resume_guards(tmp_path):
    Trainer(make_model(), config(steps=2, eval_every=0), *loaders(), output_dir=tmp_path).fit()
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        Trainer(make_model(), config(steps=4), *loaders(), output_dir=tmp_path).fit(resume=False)
    with pytest.raises(CheckpointError, match="other settings.*cache_size"):
        Trainer(make_model(cache_size=7), config(steps=4), *loaders(), output_dir=tmp_path).fit(resume=True)
    with pytest.raises(ConfigError, match="cannot resume the data position"):
        Trainer(make_model(), config(steps=4), *loaders(seed=1), output_dir=tmp_path).fit(resume=True)


def test_gradient_checkpointing_gives_the_same_training():
    cfg = config(steps=2, eval_every=0, trainable="full")
    plain, ckpt = make_model(), make_model()
    Trainer(plain, cfg, *loaders()).fit()
    Trainer(ckpt, cfg.replace(gradient_checkpointing=True), *loaders()).fit()
    assert ckpt.backbone.is_activation_checkpointing
    for name, value in trained(plain).items():
        torch.testing.assert_close(trained(ckpt)[name], value, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_on_cpu_keeps_fp32_weights():
    model = make_model()
    res = Trainer(model, config(steps=2, precision="bf16", eval_every=0), *loaders()).fit()
    assert res.status == "completed" and all(p.dtype == torch.float32 for p in trained(model).values())


def test_clear_errors():
    with pytest.raises(ConfigError, match="fp16 mixed precision needs CUDA"):
        Trainer(make_model(), config(precision="fp16"), *loaders())
    with pytest.raises(ConfigError, match="no token is scored"):
        Trainer(make_model(), config(loss_skip_segments=3, eval_every=0), *loaders()).fit()
    with pytest.raises(ConfigError, match="state_dict"):
        Trainer(make_model(), config(), [random_ids(2, 48)])
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="pip install wandb"):
            Trainer(make_model(), config(wandb_project="p", steps=1), *loaders()).fit()


def test_cli_defaults_are_the_recipe_defaults():
    import dataclasses
    import inspect

    from hiermem.training.cli import train
    from hiermem.training.recipes import HMTRecipe

    params = inspect.signature(train).parameters
    defaults = TrainConfig()
    shared = [f.name for f in dataclasses.fields(TrainConfig) if f.name in params and f.name != "steps"]
    assert len(shared) > 20
    for name in shared:
        assert params[name].default == getattr(defaults, name), name
    assert params["stage1_steps"].default == params["stage2_steps"].default == defaults.steps
    recipe = HMTRecipe(output_dir="x")
    assert params["stage2_segments"].default == recipe.stage2_segments and recipe.stage1 == defaults
    model_defaults = HMTConfig()
    for name in ("segment_length", "sensory_length", "cache_size", "eviction", "bptt_depth", "memory_projection"):
        assert params[name].default == getattr(model_defaults, name), name


def test_recipe_refuses_a_two_segment_stage2():
    from hiermem.training.recipes import HMTRecipe

    with pytest.raises(ConfigError, match=">= 3"):
        HMTRecipe(output_dir="x", stage2_segments=2).validate()
    with pytest.raises(ConfigError, match="nothing to train"):
        HMTRecipe(output_dir="x", stage1=None, stage2=None).validate()
