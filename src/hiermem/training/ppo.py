"""PPO for small policies (the HMST meta-controller) and the stage-3 reward.

The update is written here rather than taken from an RL library: the maintained ones on PyPI
(stable-baselines3, tianshou, torchrl, skrl) are built around gym-style environments, their own
rollout buffers and policy classes; here the "environment" is a decoder's generation step, the policy
a custom transformer over feature sequences, and the update is about a hundred lines, so a new
dependency tree (gymnasium, tensordict) would cost more than it saves.

A policy is any nn.Module with
    act(obs, generator) -> object with .actions (N, A), .log_prob (N,), .value (N,)   (no grad)
    evaluate(obs, actions) -> (log_prob (N,), entropy (N,), value (N,))               (with grad)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from hiermem.errors import ConfigError


@dataclass(frozen=True)
class Reward:
    """reward = accuracy - 0.3 * latency - 0.2 * compute + 0.5 * calibration (the default weights),
    per answer, every term in [0, 1]:

    accuracy:    1 if the answer is correct, else 0.
    latency:     time spent, normalised by a budget and clamped to [0, 1] (`latency_cost`): wall
                 seconds / budget seconds, or decoder steps / max steps.
    compute:     fraction of the available work used (`compute_fraction`): e.g. layers run / layers,
                 or experts and memory reads used / the most that could be.
    calibration: 1 - |confidence - accuracy|, confidence being the stated probability that the answer
                 is right (e.g. 1 - the critic's P(wrong)); 1 for a sure right or a sure-wrong answer.

    Calling it returns each unweighted term and the weighted "total", all (B,), for logging.
    """

    accuracy_weight: float = 1.0
    latency_weight: float = 0.3
    compute_weight: float = 0.2
    calibration_weight: float = 0.5

    def __call__(self, correct, latency, compute, confidence) -> dict[str, torch.Tensor]:
        correct, latency, compute, confidence = (torch.as_tensor(v, dtype=torch.float32)
                                                 for v in (correct, latency, compute, confidence))
        if not bool(((correct == 0) | (correct == 1)).all()):
            raise ValueError("correct must be 0 or 1")
        for name, v in (("latency", latency), ("compute", compute), ("confidence", confidence)):
            if not bool(((v >= 0) & (v <= 1)).all()):
                raise ValueError(f"{name} must lie in [0, 1] (normalise it first)")
        calibration = 1.0 - (confidence - correct).abs()
        total = (self.accuracy_weight * correct - self.latency_weight * latency
                 - self.compute_weight * compute + self.calibration_weight * calibration)
        return {"accuracy": correct, "latency": latency, "compute": compute, "calibration": calibration,
                "total": total}


def latency_cost(elapsed, budget: float) -> torch.Tensor:
    """elapsed (seconds or steps, any shape) / budget, clamped to [0, 1]."""
    if budget <= 0:
        raise ValueError(f"latency budget must be > 0, got {budget}")
    return (torch.as_tensor(elapsed, dtype=torch.float32) / budget).clamp(0.0, 1.0)


def compute_fraction(used, available: float) -> torch.Tensor:
    """used units of work (layers, experts, memory reads; any shape) / the most available."""
    if available <= 0:
        raise ValueError(f"available compute must be > 0, got {available}")
    return (torch.as_tensor(used, dtype=torch.float32) / available).clamp(0.0, 1.0)


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
        gamma: float = 0.99, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates over a rollout of T steps of B environments.

    rewards, values, dones: (T, B); dones[t] = 1 when the episode ended with step t (no bootstrap
    past it); last_value: (B,) the value of the state after step T - 1. Returns (advantages,
    returns), both (T, B), returns = advantages + values:
        delta_t = r_t + gamma * V_{t+1} * (1 - d_t) - V_t
        A_t = delta_t + gamma * lam * (1 - d_t) * A_{t+1}
    """
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(last_value)
    next_value = last_value
    for t in reversed(range(T)):
        keep = 1.0 - dones[t].to(rewards.dtype)
        delta = rewards[t] + gamma * next_value * keep - values[t]
        next_adv = delta + gamma * lam * keep * next_adv
        adv[t] = next_adv
        next_value = values[t]
    return adv, adv + values


@dataclass
class Rollout:
    """Flat experience for one update, N samples: obs (N, ...), actions (N, A), log_probs, values,
    advantages, returns (N,)."""

    obs: torch.Tensor
    actions: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def __post_init__(self):
        n = self.obs.shape[0]
        for f in fields(self):
            if getattr(self, f.name).shape[0] != n:
                raise ValueError(f"rollout field {f.name} has {getattr(self, f.name).shape[0]} rows, obs has {n}")

    @classmethod
    def from_steps(cls, obs, actions, log_probs, values, advantages, returns) -> Rollout:
        """Flatten time-major tensors (T, B, ...) into N = T * B samples."""
        return cls(*(t.reshape(-1, *t.shape[2:]) for t in (obs, actions, log_probs, values, advantages, returns)))


@dataclass
class PPOConfig:
    """lr: Adam step size. clip: the ratio clip epsilon. value_coef, entropy_coef: loss weights of the
    value error and the entropy bonus. value_clip: clip the value change to +-value_clip around the
    rollout's values (None = unclipped). epochs, minibatch_size: passes over a rollout and samples per
    step. normalize_advantages: zero mean, unit std over the rollout. max_grad_norm: gradient clipping.
    target_kl: stop the epochs early once the approximate KL exceeds it (None = never).
    gamma, lam: discount and GAE lambda (used by `gae`)."""

    lr: float = 3e-4
    clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    value_clip: float | None = None
    epochs: int = 4
    minibatch_size: int = 64
    normalize_advantages: bool = True
    max_grad_norm: float = 0.5
    target_kl: float | None = None
    gamma: float = 0.99
    lam: float = 0.95

    def __post_init__(self):
        if not (self.lr > 0 and self.clip > 0 and self.max_grad_norm > 0):
            raise ConfigError("ppo lr, clip and max_grad_norm must be > 0")
        if self.epochs < 1 or self.minibatch_size < 1:
            raise ConfigError("ppo epochs and minibatch_size must be >= 1")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError("ppo gamma and lam must lie in [0, 1]")


def ppo_losses(new_log_prob, old_log_prob, advantages, value, old_value, returns, entropy,
               config: PPOConfig) -> dict[str, torch.Tensor]:
    """The clipped surrogate, value and entropy terms of one minibatch (all inputs (n,)) and the
    combined "loss" = policy + value_coef * value - entropy_coef * entropy."""
    ratio = (new_log_prob - old_log_prob).exp()
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - config.clip, 1 + config.clip) * advantages)
    policy = -surrogate.mean()
    err = (value - returns) ** 2
    if config.value_clip is not None:
        clipped = old_value + (value - old_value).clamp(-config.value_clip, config.value_clip)
        err = torch.maximum(err, (clipped - returns) ** 2)
    value_loss = 0.5 * err.mean()
    ent = entropy.mean()
    with torch.no_grad():
        log_ratio = new_log_prob - old_log_prob
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clip_frac = ((ratio - 1).abs() > config.clip).float().mean()
    return {"loss": policy + config.value_coef * value_loss - config.entropy_coef * ent, "policy": policy,
            "value": value_loss, "entropy": ent, "approx_kl": approx_kl, "clip_frac": clip_frac}


class PPO:
    """Holds the policy and its Adam optimizer; `update` runs the minibatch epochs over one rollout."""

    def __init__(self, policy: nn.Module, config: PPOConfig | None = None):
        self.policy = policy
        self.config = config or PPOConfig()
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=self.config.lr)

    def update(self, rollout: Rollout, generator: torch.Generator | None = None) -> dict[str, float]:
        """One PPO update; returns the mean of each loss term over the steps taken, and "steps"."""
        c = self.config
        adv = rollout.advantages
        if c.normalize_advantages and adv.numel() > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        n = rollout.obs.shape[0]
        totals: dict[str, float] = {}
        steps = 0
        self.policy.train()
        for _ in range(c.epochs):
            perm = torch.randperm(n, generator=generator)
            kls = []
            for start in range(0, n, c.minibatch_size):
                idx = perm[start:start + c.minibatch_size]
                log_prob, entropy, value = self.policy.evaluate(rollout.obs[idx], rollout.actions[idx])
                terms = ppo_losses(log_prob, rollout.log_probs[idx], adv[idx], value, rollout.values[idx],
                                   rollout.returns[idx], entropy, c)
                self.optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
                nn.utils.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
                self.optimizer.step()
                for k, v in terms.items():
                    totals[k] = totals.get(k, 0.0) + float(v.detach())
                kls.append(float(terms["approx_kl"]))
                steps += 1
            if c.target_kl is not None and sum(kls) / len(kls) > c.target_kl:
                break
        out = {k: v / steps for k, v in totals.items()}
        out["steps"] = float(steps)
        return out
