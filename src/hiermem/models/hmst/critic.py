"""The HMST critic: a small head scoring P(answer wrong) from answer features, trained with binary
cross-entropy on (features, wrong) pairs, and the expected calibration error that measures it.

The engine asks it only when the controller's verification gate is open, and abstains when
P(wrong) > CriticConfig.abstain_threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hiermem.errors import ConfigError
from hiermem.io import check_ints


@dataclass
class CriticConfig:
    """feature_dim: F, size of an answer's feature vector (e.g. the controller's step features).
    hidden: width of the one hidden layer. abstain_threshold: abstain when P(wrong) exceeds it."""

    feature_dim: int
    hidden: int = 64
    abstain_threshold: float = 0.5

    def __post_init__(self):
        check_ints(self, ("feature_dim", "hidden"), what="critic ")
        t = self.abstain_threshold
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1):
            raise ConfigError(f"critic abstain_threshold must lie in [0, 1], got {t!r}")


class Critic(nn.Module):
    """features (..., F) -> logit of P(wrong) (...): LayerNorm, Linear, GELU, Linear."""

    def __init__(self, config: CriticConfig):
        super().__init__()
        self.config = c = config
        self.net = nn.Sequential(nn.LayerNorm(c.feature_dim), nn.Linear(c.feature_dim, c.hidden), nn.GELU(),
                                 nn.Linear(c.hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.config.feature_dim:
            raise ConfigError(f"critic expects {self.config.feature_dim} features, got {features.shape[-1]}")
        return self.net(features).squeeze(-1)

    def multiply_adds(self) -> int:
        """Multiply-adds of scoring one answer (its parameter count: two small matrices)."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def p_wrong(self, features: torch.Tensor) -> torch.Tensor:
        """(..., F) -> (...) probability that the answer is wrong."""
        return torch.sigmoid(self(features))

    @torch.no_grad()
    def should_abstain(self, features: torch.Tensor) -> torch.Tensor:
        """(..., F) -> (...) bool: P(wrong) > abstain_threshold."""
        return self.p_wrong(features) > self.config.abstain_threshold


def fit_critic(critic: Critic, features: torch.Tensor, wrong: torch.Tensor, epochs: int = 20, lr: float = 3e-3,
               batch_size: int = 256, weight_decay: float = 0.0,
               generator: torch.Generator | None = None, validation: tuple | None = None) -> list[float]:
    """Train on features (N, F) and wrong (N,) in {0, 1} with BCE (AdamW, shuffled minibatches);
    returns the mean loss of each epoch. ``validation`` (features, wrong): keep the weights of the
    epoch with the lowest validation BCE (early stopping) and record it as ``critic.best_epoch``."""
    if features.shape[0] != wrong.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {wrong.shape[0]} labels")
    opt = torch.optim.AdamW(critic.parameters(), lr=lr, weight_decay=weight_decay)
    target = wrong.float()
    n = features.shape[0]
    history, best = [], None
    for _ in range(epochs):
        critic.train()
        perm = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            loss = F.binary_cross_entropy_with_logits(critic(features[idx]), target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / n)
        if validation is not None:
            with torch.no_grad():
                val = float(F.binary_cross_entropy_with_logits(critic(validation[0]), validation[1].float()))
            if best is None or val < best[0]:
                best = (val, len(history), {k: v.clone() for k, v in critic.state_dict().items()})
    if best is not None:
        critic.load_state_dict(best[2])
        critic.best_epoch, critic.best_val_loss = best[1], best[0]
    critic.eval()
    return history


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """ECE of predicted probabilities of the positive event, probs (N,) in [0, 1], against labels
    (N,) in {0, 1}: over `bins` equal-width bins of [0, 1] (the last one closed),
    sum_b (n_b / N) * |mean prob in b - fraction positive in b|."""
    probs, labels = probs.detach().double().flatten(), labels.detach().double().flatten()
    if probs.numel() == 0 or probs.shape != labels.shape:
        raise ValueError("expected_calibration_error needs equally many (>= 1) probabilities and labels")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    which = (probs * bins).long().clamp(0, bins - 1)
    conf = torch.bincount(which, weights=probs, minlength=bins)
    pos = torch.bincount(which, weights=labels, minlength=bins)
    return float((conf - pos).abs().sum() / probs.numel())  # n_b/N * |conf_b/n_b - pos_b/n_b|
