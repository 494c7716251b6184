"""HMST meta-controller, PPO and critic: the reward terms and GAE against hand-computed values, the
clipped surrogate by hand, PPO on a toy contextual bandit whose optimal gates are known (found here
by enumerating all 32 gate settings) reaches that optimum, and the critic trained on a known noisy
wrongness function is calibrated (low ECE) and beats the majority class."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hiermem.errors import ConfigError
from hiermem.models.hmst.controller import GATES, NUM_STATS, ControllerConfig, MetaController, step_features
from hiermem.models.hmst.critic import Critic, CriticConfig, expected_calibration_error, fit_critic
from hiermem.training.ppo import (PPO, PPOConfig, Reward, Rollout, compute_fraction, gae, latency_cost,
                                  ppo_losses)

# --- reward, GAE, surrogate by hand ---------------------------------------------------------------


def test_reward_terms_by_hand():
    terms = Reward()(correct=[1.0, 0.0], latency=[0.5, 1.0], compute=[0.4, 1.0], confidence=[0.9, 0.9])
    assert torch.allclose(terms["calibration"], torch.tensor([0.9, 0.1]))
    # 1 - 0.3*0.5 - 0.2*0.4 + 0.5*0.9 = 1.22 ; 0 - 0.3 - 0.2 + 0.5*0.1 = -0.45
    assert torch.allclose(terms["total"], torch.tensor([1.22, -0.45]))
    assert torch.equal(terms["accuracy"], torch.tensor([1.0, 0.0]))
    assert torch.allclose(latency_cost(torch.tensor([1.0, 3.0]), budget=2.0), torch.tensor([0.5, 1.0]))
    assert float(compute_fraction(2, 8)) == 0.25
    with pytest.raises(ValueError, match="latency"):
        Reward()(correct=1, latency=1.5, compute=0.0, confidence=1.0)
    with pytest.raises(ValueError, match="correct"):
        Reward()(correct=0.5, latency=0.0, compute=0.0, confidence=1.0)


def test_gae_by_hand():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])  # (T=3, B=2)
    values = torch.tensor([[0.5, 0.0], [1.0, 0.0], [1.5, 0.0]])
    dones = torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    last = torch.tensor([10.0, 1.0])  # env 0 ended at t=2 (no bootstrap); env 1 bootstraps from 1.0
    adv, ret = gae(rewards, values, dones, last, gamma, lam)
    # env 0: d2 = 2 - 1.5 = .5; d1 = .9*1.5 - 1 = .35 -> .35 + .72*.5 = .71; d0 = 1 + .9 - .5 -> 1.4 + .72*.71
    # env 1: d2 = .9*1 = .9; d1 = 1 -> 1 + .72*.9 = 1.648; t=0 ended its episode: d0 = 0
    want = torch.tensor([[1.4 + 0.72 * 0.71, 0.0], [0.71, 1.648], [0.5, 0.9]])
    assert torch.allclose(adv, want)
    assert torch.allclose(ret, want + values)


def test_clipped_surrogate_by_hand():
    cfg = PPOConfig(clip=0.2, value_coef=0.0, entropy_coef=0.0)
    new, old, zero = torch.tensor([math.log(1.5)]), torch.zeros(1), torch.zeros(1)
    up = ppo_losses(new, old, torch.ones(1), zero, zero, zero, zero, cfg)
    down = ppo_losses(new, old, -torch.ones(1), zero, zero, zero, zero, cfg)
    assert math.isclose(float(up["policy"]), -1.2, rel_tol=1e-6)  # gain capped at ratio 1 + clip
    assert math.isclose(float(down["policy"]), 1.5, rel_tol=1e-6)  # loss never capped
    assert float(up["clip_frac"]) == 1.0


# --- controller -----------------------------------------------------------------------------------


def test_controller_shapes_mask_and_sampling():
    torch.manual_seed(0)
    ctl = MetaController(ControllerConfig(feature_dim=6, d_model=16, num_layers=1, num_heads=2, max_steps=4))
    with torch.no_grad():
        ctl.gate_head.weight.normal_()
    x = torch.randn(3, 4, 6)
    logits, value = ctl(x)
    assert logits.shape == (3, len(GATES)) and value.shape == (3,)
    mask = torch.tensor([[True, True, False, False]] * 3)  # padded steps do not change the output
    a, _ = ctl(x, mask)
    b, _ = ctl(torch.cat([x[:, :2], torch.randn(3, 2, 6) * 100], 1), mask)
    assert torch.allclose(a, b, atol=1e-5)
    d1 = ctl.act(x, torch.Generator().manual_seed(1))
    d2 = ctl.act(x, torch.Generator().manual_seed(1))
    assert torch.equal(d1.actions, d2.actions)
    log_prob, entropy, v = ctl.evaluate(x, d1.actions)
    assert torch.allclose(log_prob, d1.log_prob) and torch.allclose(v, d1.value)
    assert bool((entropy > 0).all()) and bool((entropy <= len(GATES) * math.log(2) + 1e-6).all())
    g = ctl.greedy(x)
    assert torch.equal(g.actions, (logits > 0).float()) and set(g.gates()) == set(GATES)
    with pytest.raises(ConfigError, match="at most 4 steps"):
        ctl(torch.randn(1, 5, 6))


def test_step_features():
    hidden, logits = torch.randn(2, 8), torch.zeros(2, 50)  # uniform next-token distribution
    f = step_features(hidden, logits, position=torch.tensor([10, 400]), max_position=100, memory_fill=0.25)
    assert f.shape == (2, 8 + NUM_STATS)
    assert torch.allclose(f[:, 8:], torch.tensor([[1.0, 0.1, 0.25], [1.0, 1.0, 0.25]]), atol=1e-6)


# --- PPO on a contextual bandit with a known optimum ---------------------------------------------
# Context: r = the question needs retrieval, h = it is hard. The answer is right iff the semantic
# gate equals r. Retrieval and verification each cost 0.5 latency; every open gate costs 1/5 compute.
# Without verification the stated confidence is 1.0 (easy) or 0.2 (hard); with it, it is exact.
# Optimal: semantic = r, verify = h, the other gates closed.

T_STEPS, F_DIM = 4, 6


def toy_contexts(n: int, gen: torch.Generator):
    r = torch.randint(0, 2, (n,), generator=gen).float()
    h = torch.randint(0, 2, (n,), generator=gen).float()
    x = 0.3 * torch.randn(n, T_STEPS, F_DIM, generator=gen)
    x[:, 1, 0] += 2 * r - 1  # the two bits sit at different steps: the encoder must read across them
    x[:, 3, 2] += 2 * h - 1
    return x, r, h


def toy_reward(actions: torch.Tensor, r: torch.Tensor, h: torch.Tensor) -> dict[str, torch.Tensor]:
    sem, ver = actions[:, GATES.index("semantic")], actions[:, GATES.index("verify")]
    correct = (sem == r).float()
    confidence = torch.where(ver > 0.5, correct, torch.where(h > 0.5, 0.2, 1.0))
    return Reward()(correct, 0.5 * sem + 0.5 * ver, compute_fraction(actions.sum(-1), len(GATES)), confidence)


def optimal_actions(r: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Enumerate all 32 gate settings for each (r, h) and keep the best (asserted unique)."""
    table = {}
    combos = torch.tensor(list(itertools.product([0.0, 1.0], repeat=len(GATES))))
    for rv, hv in itertools.product([0.0, 1.0], repeat=2):
        total = toy_reward(combos, torch.full((32,), rv), torch.full((32,), hv))["total"]
        top = total.topk(2).values
        assert top[0] - top[1] > 0.03  # at least one needless gate's compute cost, 0.2 / 5
        table[(rv, hv)] = combos[total.argmax()]
    assert torch.equal(table[(1.0, 0.0)], torch.tensor([0.0, 0, 1, 0, 0]))
    assert torch.equal(table[(0.0, 1.0)], torch.tensor([0.0, 0, 0, 0, 1]))
    return torch.stack([table[(float(a), float(b))] for a, b in zip(r, h)])


def test_ppo_reaches_the_known_optimum_of_a_contextual_bandit():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    ctl = MetaController(ControllerConfig(feature_dim=F_DIM, d_model=32, num_layers=1, num_heads=2, max_steps=T_STEPS))
    ppo = PPO(ctl, PPOConfig(lr=3e-3, epochs=4, minibatch_size=128, entropy_coef=0.01, max_grad_norm=1.0))
    batch = 512
    for _ in range(60):
        x, r, h = toy_contexts(batch, gen)
        dec = ctl.act(x, gen)
        reward = toy_reward(dec.actions, r, h)["total"]
        ones = torch.ones(1, batch)  # every episode is one decision
        adv, ret = gae(reward[None], dec.value[None], ones, torch.zeros(batch))
        stats = ppo.update(Rollout.from_steps(x[None], dec.actions[None], dec.log_prob[None], dec.value[None],
                                              adv, ret), gen)
        assert math.isfinite(stats["loss"])
    ctl.eval()
    x, r, h = toy_contexts(4000, gen)
    best = optimal_actions(r, h)
    greedy = ctl.greedy(x).actions
    match = (greedy == best).all(-1).float().mean().item()
    got = toy_reward(greedy, r, h)["total"].mean().item()
    optimum = toy_reward(best, r, h)["total"].mean().item()
    assert match >= 0.95, match
    assert optimum - got < 0.02, (optimum, got)


# --- critic ---------------------------------------------------------------------------------------


def test_ece_by_hand():
    probs = torch.tensor([0.1, 0.15, 0.9, 0.95, 1.0], dtype=torch.float64)
    labels = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0])
    # bin 1: |0.25 - 1| ; bin 9 (the last, closed): |2.85 - 3|  -> (0.75 + 0.15) / 5
    assert math.isclose(expected_calibration_error(probs, labels), 0.9 / 5, rel_tol=1e-9)
    assert expected_calibration_error(torch.tensor([0.3, 0.3]), torch.tensor([1.0, 0.0]), bins=1) == pytest.approx(0.2)


def wrongness(n: int, gen: torch.Generator):
    x = torch.randn(n, 8, generator=gen)
    p = torch.sigmoid(2.0 * x[:, 0] - 1.5 * x[:, 1] + x[:, 2] * x[:, 3] - 1.0)
    return x, torch.bernoulli(p, generator=gen)


def test_critic_is_calibrated_after_training_and_beats_the_majority_class():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, wrong = wrongness(8000, gen)
    xt, wrong_t = wrongness(4000, gen)
    critic = Critic(CriticConfig(feature_dim=8, hidden=32, abstain_threshold=0.7))
    ece_before = expected_calibration_error(critic.p_wrong(xt), wrong_t)
    losses = fit_critic(critic, x, wrong, epochs=15, lr=3e-3, generator=gen)
    assert losses[-1] < losses[0]
    p = critic.p_wrong(xt)
    ece_after = expected_calibration_error(p, wrong_t)
    accuracy = ((p > 0.5).float() == wrong_t).float().mean().item()
    majority = max(wrong_t.mean().item(), 1 - wrong_t.mean().item())
    assert ece_after < 0.05 and ece_after < ece_before, (ece_before, ece_after)
    assert accuracy > majority + 0.05, (accuracy, majority)
    assert torch.equal(critic.should_abstain(xt), p > 0.7)
    with pytest.raises(ConfigError, match="abstain_threshold"):
        CriticConfig(feature_dim=8, abstain_threshold=1.5)
