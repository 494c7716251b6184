"""Adapting a trained model: `expand` grows a Hierarchos while keeping its exact function (logits,
loss, carried state) and the result still trains; LoRA adapters (PEFT) act on every Linear, train
alone (plus the unlocked tail), are saved small and merge into plain weights with equal logits; the
finetune / merge-lora / expand commands run end to end and refuse bad inputs clearly."""

from __future__ import annotations

import json

import pytest
import torch

from hiermem.cli import main
from hiermem.errors import CheckpointError, ConfigError
from hiermem.io import load_tensors
from hiermem.models import load_model
from hiermem.models.hierarchos import Hierarchos, HierarchosConfig
from hiermem.models.hierarchos.expand import expand, expand_state
from hiermem.models.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, add_lora, load_adapted, merge_adapters,
                                 merge_lora, unlocked_tail)
from scratch_family import save_with_byte_tokenizer

SMALL = dict(context_dim=8, persistent_dim=4, ltm_slots=10, ltm_key_dim=6, ltm_val_dim=5, ltm_topk=3, h_hidden=7,
             l_hidden=9, h_stride=3, max_h_steps=4, max_l_steps=3, ltm_lr=0.5, ltm_forget=0.05, h_halt_thresh=0.7,
             commitment_threshold=0.5)
LINEARS = 24  # qproj, val_proj, in_proj, h_in_proj, l_feedback_proj, h_to_context, h_halt_proj, l_input_proj,
# context_drift_proj, l_to_out and 7 per cell


def tiny(vocab=40, dtype=torch.float64, seed=0, **kw) -> Hierarchos:
    torch.manual_seed(seed)
    model = Hierarchos(HierarchosConfig(vocab_size=vocab, **{**SMALL, **kw})).to(dtype)
    with torch.no_grad():  # off the initial values (unit gains, zero biases)
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def ids(b, t, seed=1, vocab=40):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def objective(model, out):
    return out.loss + sum(model.aux_weights[k] * v for k, v in out.aux.items())


@pytest.mark.parametrize("kw", [{}, dict(tie_embeddings=False, h_stride=1)], ids=["tied", "untied"])
@pytest.mark.parametrize("sizes", [dict(context_dim=16), dict(h_hidden=14), dict(l_hidden=27),
                                   dict(context_dim=24, h_hidden=21, l_hidden=18, max_length=99)],
                         ids=["C", "Hh", "Hl", "all"])
def test_expand_keeps_logits_loss_and_state(kw, sizes):
    small = tiny(**kw)
    big = expand(small, **sizes)
    assert big.config.context_dim == sizes.get("context_dim", 8) and big.config.n_ctx == sizes.get("max_length", 256)
    assert sum(p.numel() for p in big.parameters()) > sum(p.numel() for p in small.parameters())
    start = small(ids(2, 7, seed=5)).state.detach()  # memory written, contexts set, clock off the stride phase
    x = ids(2, 9)
    a = small(x, state=start, labels=x)
    b = big(x, state=expand_state(start, small.config, big.config), labels=x)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(objective(big, b), objective(small, a), rtol=0, atol=1e-10)
    carried = expand_state(a.state, small.config, big.config).named_tensors()
    for name, (t, _) in b.state.named_tensors().items():
        torch.testing.assert_close(t, carried[name][0], rtol=0, atol=1e-10, msg=name)
    y = ids(2, 5, seed=3)  # and on, from the states each reached
    torch.testing.assert_close(big(y, state=b.state).logits, small(y, state=a.state).logits, rtol=0, atol=1e-10)


def test_expanded_model_trains_and_its_copies_part():
    big = expand(tiny(), context_dim=16, h_hidden=14, l_hidden=18).train()
    x = ids(4, 12, seed=7)
    opt = torch.optim.AdamW(big.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        out = big(x, labels=x)
        loss = objective(big, out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses
    emb = big.tok_emb.weight.detach()
    assert (emb[:, :8] - emb[:, 8:]).abs().max() > 1e-3  # the repeated units no longer move together


def test_expand_refuses_what_would_change_the_function():
    small = tiny()
    with pytest.raises(ConfigError, match="cannot shrink context_dim"):
        expand(small, context_dim=4)
    with pytest.raises(ConfigError, match="whole factor"):
        expand(small, h_hidden=10)
    with pytest.raises(ConfigError, match="ltm_slots cannot change"):
        expand(small, ltm_slots=20)
    with pytest.raises(ConfigError, match="positive"):
        expand(small, max_length=0)
    with pytest.raises(ConfigError, match="merge them first"):
        expand(add_lora(small, r=1), context_dim=16)


def test_lora_acts_everywhere_trains_alone_and_merges_exactly(tmp_path):
    base, _ = save_with_byte_tokenizer(lambda v: tiny(vocab=v, dtype=torch.float32), tmp_path, "base")
    model = add_lora(load_model(tmp_path / "base"), r=2, alpha=4, base_folder=tmp_path / "base")
    assert len(model.lora["targets"]) == LINEARS  # the probe found every adapter acting (fused matmuls too)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == model.trainable_names() and all(".lora_" in n for n in trainable)
    x = ids(2, 10, vocab=len(base.tokenizer))
    before = model(x).logits
    torch.testing.assert_close(before, base(x).logits, rtol=0, atol=0)  # B starts at zero
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.3)
    adapted = model(x).logits
    assert (adapted - before).abs().max() > 1e-2
    model.save_pretrained(tmp_path / "adapters")
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    saved, _ = load_tensors(tmp_path / "adapters" / ADAPTER_WEIGHTS)
    linears = [m for m in base.modules() if type(m) is torch.nn.Linear]
    assert sum(t.numel() for t in saved.values()) == sum(2 * (m.in_features + m.out_features) for m in linears)
    assert (tmp_path / "adapters" / ADAPTER_WEIGHTS).stat().st_size < (tmp_path / "base" / "model.safetensors").stat().st_size
    merged = merge_lora(tmp_path / "adapters", out=tmp_path / "merged")
    assert type(merged) is Hierarchos and not any(".lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(load_model(tmp_path / "merged")(x).logits, adapted, rtol=0, atol=1e-5)
    reloaded = load_adapted(tmp_path / "adapters")  # the recorded base, adapters loaded
    torch.testing.assert_close(reloaded(x).logits, adapted, rtol=0, atol=1e-6)


def test_unlock_takes_the_shortest_tail_holding_the_percent_and_merges():
    model = tiny()
    names = [n for n, _ in model.named_parameters()]
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    total = sum(sizes.values())
    for percent in (0, 3, 30, 100):
        tail = unlocked_tail(model, percent)
        assert tail == names[len(names) - len(tail):]  # a suffix in model order
        held = sum(sizes[n] for n in tail)
        assert held >= percent / 100 * total and (not tail or held - sizes[tail[0]] < percent / 100 * total)
    adapted = add_lora(model, r=2, alpha=2, unlock_percent=30)
    unlocked = adapted.lora["unlocked"]
    assert unlocked and set(adapted.trainable_names()) == {n for n, _ in adapted.named_parameters()
                                                           if ".lora_" in n or n in unlocked}
    x = ids(2, 8)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    want = adapted(x).logits
    torch.testing.assert_close(merge_adapters(adapted)(x).logits, want, rtol=0, atol=1e-11)


def test_lora_refuses_bad_settings():
    with pytest.raises(ConfigError, match="r must be"):
        add_lora(tiny(), r=0)
    with pytest.raises(ConfigError, match="unlock percent"):
        add_lora(tiny(), unlock_percent=150)
    with pytest.raises(ConfigError, match="not untied Linear modules"):
        add_lora(tiny(), targets=["tok_emb"])
    adapted = add_lora(tiny(), r=1)
    with pytest.raises(ConfigError, match="already has LoRA"):
        add_lora(adapted)
    from hiermem.models.hrmlm import HRMLM, HRMLMConfig

    with pytest.raises(ConfigError, match="no untied Linear"):  # its recurrence holds raw parameters
        add_lora(HRMLM(HRMLMConfig(vocab_size=40, n_embd=8, n_high_hidden=6)))


def test_lora_serves_another_family_too(tmp_path):
    from hiermem.models.transformer import Transformer, TransformerConfig

    def make(vocab):
        torch.manual_seed(0)
        return Transformer(TransformerConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4,
                                             num_kv_heads=2, context_length=16, stride=6)).eval()

    save_with_byte_tokenizer(make, tmp_path, "base")
    model = add_lora(load_model(tmp_path / "base"), r=2, alpha=4, base_folder=tmp_path / "base")
    assert len(model.lora["targets"]) == 14 and "lm.lm_head" not in model.lora["targets"]  # tied head left alone
    assert all(".lora_" in n for n in model.trainable_names())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.1)
    x = ids(1, 20, vocab=100)
    want = model(x).logits
    model.save_pretrained(tmp_path / "adapters")
    torch.testing.assert_close(merge_lora(tmp_path / "adapters")(x).logits, want, rtol=0, atol=1e-5)


def _text(tmp_path):
    path = tmp_path / "new.txt"
    path.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 30)
    return path


def test_cli_finetune_merge_and_expand_end_to_end(tmp_path, capsys):
    save_with_byte_tokenizer(lambda v: tiny(vocab=v, dtype=torch.float32), tmp_path, "base")
    base, out, text = tmp_path / "base", tmp_path / "ft", _text(tmp_path)
    common = ["--steps", "4", "--batch-size", "2", "--window", "16", "--lr", "3e-2", "--warmup", "0",
              "--eval-every", "0", "--save-every", "0", "--log-every", "1", "--no-tensorboard", "--no-progress"]
    assert main(["finetune", "--model", str(base), "--data", str(text), "--output", str(out), "--lora-r", "4",
                 "--lora-alpha", "8", "--finetune-unlock-percent", "5", *common]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4 and summary["recipe"] == "finetune"
    final = out / "final"
    assert sorted(p.name for p in final.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    record = json.loads((final / ADAPTER_CONFIG).read_text())
    assert record["r"] == 4 and record["unlock_percent"] == 5 and record["unlocked"]
    assert "merge-lora" in capsys.readouterr().out
    assert main(["merge-lora", "--model", str(final), "--output", str(tmp_path / "merged")]) == 0
    x = ids(2, 12, vocab=259)
    merged = load_model(tmp_path / "merged")
    # equal up to float32 rounding, which this small fast-trained recurrence amplifies: the merged
    # model may differ from the adapted one by no more than the adapted one differs from itself in float64
    adapted = load_adapted(final)
    with torch.no_grad():
        exact = load_adapted(final).double()(x).logits
        rounding = float((adapted(x).logits.double() - exact).abs().max())
        assert float((merged(x).logits - adapted(x).logits).abs().max()) <= 2 * rounding + 1e-6
    assert (merged(x).logits - load_model(base)(x).logits).abs().max() > 1e-3  # the fine-tuning changed it
    assert main(["expand", "--model", str(tmp_path / "merged"), "--output", str(tmp_path / "big"),
                 "--context-dim", "16", "--l-hidden", "18", "--max-length", "32"]) == 0
    big = load_model(tmp_path / "big")
    assert (big.config.context_dim, big.config.l_hidden, big.config.n_ctx) == (16, 18, 32)
    torch.testing.assert_close(big(x).logits, merged(x).logits, rtol=0, atol=1e-4)
    assert main(["finetune", "--model", str(tmp_path / "big"), "--data", str(text), "--output",
                 str(tmp_path / "ft-big"), "--lora-r", "0", *common]) == 0  # every weight of the grown model trains
    assert load_model(tmp_path / "ft-big" / "final").config.context_dim == 16


def test_cli_refuses_bad_inputs_clearly(tmp_path, capsys):
    save_with_byte_tokenizer(lambda v: tiny(vocab=v, dtype=torch.float32), tmp_path, "base")
    save_with_byte_tokenizer(lambda v: tiny(vocab=v, dtype=torch.float32, seed=1), tmp_path, "other")
    model = add_lora(load_model(tmp_path / "base"), r=2, base_folder=tmp_path / "base")
    model.save_pretrained(tmp_path / "adapters")
    cases = [
        (["merge-lora", "--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "m")], "no adapter_config"),
        (["merge-lora", "--model", str(tmp_path / "adapters"), "--output", str(tmp_path / "m"),
          "--base", str(tmp_path / "other")], "another base model"),
        (["merge-lora", "--model", str(tmp_path / "adapters"), "--output", str(tmp_path / "m"),
          "--base", str(tmp_path / "nowhere")], "neither a checkpoint folder"),
        (["expand", "--model", str(tmp_path / "base"), "--output", str(tmp_path / "e"), "--context-dim", "4"],
         "cannot shrink"),
        (["expand", "--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "e")], "neither a checkpoint"),
        (["finetune", "--model", str(tmp_path / "base"), "--output", str(tmp_path / "f")], "needs --model"),
        (["finetune", "--model", str(tmp_path / "base"), "--data", str(_text(tmp_path)), "--output",
          str(tmp_path / "f"), "--lora-r", "0", "--finetune-unlock-percent", "5"], "trains every weight"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "m").exists() and not (tmp_path / "e").exists()
    with pytest.raises(CheckpointError, match="another base model"):
        load_adapted(tmp_path / "adapters", base=tmp_path / "other")
