"""HMT trained in the regime it is tested in: documents read in order, memory carried across windows."""

import pytest
import torch

from hiermem.data.stream import StreamLoader
from hiermem.errors import ConfigError
from hiermem.training import Trainer
from hiermem.training.recipes import HMTRecipe, _phases
from test_training import SEG, config, corpus, make_model, trained


def streams(segments=3, n_docs=4, length=200):
    return (StreamLoader(corpus(n_docs, length), segments * SEG, 1, seed=0),
            StreamLoader(corpus(2, length, seed=100), segments * SEG, 1, seed=0))


@pytest.mark.parametrize("eviction", ["fifo", "attention"])
def test_carried_training_fills_and_evicts_the_bank(eviction):
    """Windows of 3 segments over 200-token documents (4 windows each): the bank fills to N=5 and
    evicts within a document, and starts empty again with the next document."""
    model = make_model(cache_size=5, eviction=eviction)
    trainer = Trainer(model, config(steps=9, batch_size=1, carry_state=True, eval_every=0, save_every=0),
                      *streams())
    before = trained(model)
    result = trainer.fit()
    assert result.status == "completed"
    trace = trainer.state_trace
    assert [t["slots_used"] for t in trace] == [3, 5, 5, 5] * 2 + [3]
    assert [t["evictions"] for t in trace] == [0, 1, 4, 7] * 2 + [0]
    assert [t["segments"] for t in trace] == [3, 6, 9, 12] * 2 + [3]
    assert all(t["pending_tokens"] == 0 for t in trace)
    sources = trainer.carried.bank.sources[0].tolist()
    if eviction == "fifo":
        assert sources == [0, 1, 2]  # a new document: nothing evicted yet
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert {"recall.query.weight", "recall.key.weight", "summary_prompt"} <= set(changed)


def test_attention_eviction_keeps_the_slots_recall_uses():
    """In a carried stream the attention policy evicts the least-attended slot, not the oldest:
    after 12 segments with N=5 its bank differs from FIFO's last five."""
    model = make_model(cache_size=5, eviction="attention")
    trainer = Trainer(model, config(steps=4, batch_size=1, carry_state=True, eval_every=0, save_every=0),
                      *streams())
    trainer.fit()
    assert trainer.state_trace[-1]["evictions"] == 7
    assert sorted(trainer.carried.bank.sources[0].tolist()) != list(range(7, 12))


def test_carried_validation_reads_documents_in_order():
    model = make_model(cache_size=5)
    trainer = Trainer(model, config(steps=2, batch_size=1, carry_state=True, eval_every=2, eval_batches=4,
                                    save_every=0), *streams())
    trainer.fit()
    record = trainer.evaluations[-1]
    assert record["val_tokens"] == 4 * (3 * SEG - 1)


def test_curriculum_phases_split_stage2():
    from hiermem.training.config import TrainConfig

    recipe = HMTRecipe(output_dir="x", stage1=TrainConfig(steps=4, trainable="lora"),
                       stage2=TrainConfig(steps=10, warmup=5),
                       curriculum=[3, 6, 12], carry_state=True)
    recipe.validate()
    phases = _phases(recipe)
    assert [(st, name, cfg.steps, n) for st, name, cfg, n in phases] == [
        (1, "stage1", 4, 2), (2, "stage2-u3", 4, 3), (2, "stage2-u6", 3, 6), (2, "stage2-u12", 3, 12)]
    assert all(cfg.carry_state for _, _, cfg, _ in phases)
    assert phases[1][2].warmup == 4 and phases[2][2].warmup == 3


@pytest.mark.parametrize("bad,match", [
    (dict(curriculum=[2, 6]), ">= 3 segments"),
    (dict(carry_state=True, straddle=True), "straddle"),
    (dict(carry_state=True, batch_size=2), "--batch-size 1"),
])
def test_carried_recipe_refuses_what_it_cannot_do(bad, match):
    from hiermem.training.config import TrainConfig

    batch = bad.pop("batch_size", 1)
    recipe = HMTRecipe(output_dir="x", stage1=TrainConfig(batch_size=batch), stage2=TrainConfig(batch_size=batch),
                       **bad)
    with pytest.raises(ConfigError, match=match):
        recipe.validate()


def test_carried_stage1_with_a_frozen_backbone_is_refused():
    """Over a carried memory stage 1's P_n = m_{n-1} involves no memory parameter: nothing to train."""
    from hiermem.training.config import TrainConfig

    with pytest.raises(ConfigError, match="nothing to train"):
        HMTRecipe(output_dir="x", carry_state=True, stage1=TrainConfig(batch_size=1),
                  stage2=TrainConfig(batch_size=1)).validate()
    HMTRecipe(output_dir="x", carry_state=True, stage1=None, stage2=TrainConfig(batch_size=1)).validate()
    model = make_model(stage=1, cache_size=5)
    trainer = Trainer(model, config(steps=3, batch_size=1, carry_state=True, eval_every=0, save_every=0),
                      *streams())
    with pytest.raises(ConfigError, match="does not depend on any trainable parameter"):
        trainer.fit()
