"""Stage 3's reward table, PPO loop and policy report for the HMST meta-controller.

Every question was answered under each of the 16 settings of the gates that change the answering
passes (:func:`~hiermem.training.hmst_facts.answer_all`); the verification gate acts after them (the
critic may turn an answer into an abstention), so the reward of all 32 gate settings of a question
is known without running the model again, and PPO samples gates and looks their reward up.

Reward terms (:class:`~hiermem.training.ppo.Reward`): accuracy 1 when the answer is the stated value,
or "unknown" for a fact never stated; latency = the answer's latency units / the most an answer can
take; compute = its multiply-adds / the most an answer can take; calibration from the confidence
stated (1 - P(wrong) with verification, else the model's own probability of its answer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hiermem.models.hmst.controller import GATES
from hiermem.models.hmst.critic import expected_calibration_error
from hiermem.models.hmst.system import UNKNOWN, is_correct
from hiermem.training.hmst_facts import RUN_GATES, gate_settings
from hiermem.training.ppo import PPO, PPOConfig, Reward, Rollout, compute_fraction, gae, latency_cost


@dataclass
class RewardTable:
    """For N questions: features (N, F); per (question, run setting s of 16, verify v of 2):
    correct, latency, compute, confidence, total, abstained, valued (answered a value) (N, 16, 2);
    stated (N,) bool; flops (N, 16, 2)."""

    features: torch.Tensor
    correct: torch.Tensor
    latency: torch.Tensor
    compute: torch.Tensor
    confidence: torch.Tensor
    total: torch.Tensor
    abstained: torch.Tensor
    valued: torch.Tensor
    flops: torch.Tensor
    stated: torch.Tensor

    @staticmethod
    def critic_data(records) -> tuple[torch.Tensor, torch.Tensor]:
        """(critic features (M, F'), wrong (M,)) of every answer of every record."""
        feats, wrong = [], []
        for r in records:
            for a in r.answers.values():
                feats.append(a.critic_features)
                wrong.append(float(not is_correct(a.text, r.truth)))
        return torch.stack(feats).float(), torch.tensor(wrong)

    @classmethod
    @torch.no_grad()
    def build(cls, records, critic, budget: tuple[float, float]) -> "RewardTable":
        settings = gate_settings()
        n, shape = len(records), (len(records), len(settings), 2)
        t = {k: torch.zeros(shape) for k in ("correct", "latency", "compute", "confidence", "abstained", "valued",
                                             "flops")}
        p_wrong = critic.p_wrong(torch.stack([r.answers[s].critic_features for r in records for s in settings])
                                 .float()).view(n, len(settings)).tolist()  # (N, 16), one batched call
        extra = critic.multiply_adds()
        for i, r in enumerate(records):
            for j, s in enumerate(settings):
                a, p = r.answers[s], p_wrong[i][j]
                for v in (0, 1):
                    abstain = bool(v) and p > critic.config.abstain_threshold and a.text != UNKNOWN
                    text = UNKNOWN if abstain else a.text
                    t["correct"][i, j, v] = float(is_correct(text, r.truth))
                    t["confidence"][i, j, v] = 1.0 - p if v else a.confidence
                    t["flops"][i, j, v] = a.flops + (extra if v else 0)
                    t["latency"][i, j, v] = a.latency_units
                    t["abstained"][i, j, v] = float(abstain)
                    t["valued"][i, j, v] = float(text != UNKNOWN)
        t["latency"] = latency_cost(t["latency"], budget[1])
        t["compute"] = compute_fraction(t["flops"], budget[0])
        terms = Reward()(t["correct"], t["latency"], t["compute"], t["confidence"].clamp(0, 1))
        return cls(torch.stack([r.features for r in records]).float(), total=terms["total"],
                   stated=torch.tensor([r.truth is not None for r in records]), **t)

    @staticmethod
    def index(actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate actions (B, 5) in GATES order -> (run-setting index (B,), verify (B,)) into the table."""
        bits = torch.stack([actions[:, GATES.index(g)] for g in RUN_GATES], -1).long()  # (B, 4)
        weights = 2 ** torch.arange(len(RUN_GATES) - 1, -1, -1)  # itertools.product order: first gate most significant
        return (bits * weights).sum(-1), actions[:, GATES.index("verify")].long()

    @staticmethod
    def actions(flat: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`index` over flat indices 2 s + v (B,) -> gate actions (B, 5)."""
        s, v = flat // 2, flat % 2
        out = torch.zeros(len(flat), len(GATES))
        for i, g in enumerate(RUN_GATES):
            out[:, GATES.index(g)] = ((s >> (len(RUN_GATES) - 1 - i)) & 1).float()
        out[:, GATES.index("verify")] = v.float()
        return out

    def pick(self, name: str, rows: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        s, v = self.index(actions)
        return getattr(self, name)[rows, s, v]


def train_controller(controller, table: RewardTable, iterations: int, seed: int = 0, batch: int = 256) -> list[dict]:
    """PPO on the table: each update samples ``batch`` questions, the controller's gates for each,
    and their rewards (one-step episodes)."""
    gen = torch.Generator().manual_seed(seed)
    ppo = PPO(controller, PPOConfig(lr=1e-3, epochs=4, minibatch_size=128, entropy_coef=0.01, max_grad_norm=1.0))
    history, n = [], table.features.shape[0]
    for it in range(iterations):
        rows = torch.randint(0, n, (batch,), generator=gen)
        x = table.features[rows]
        dec = controller.act(x, gen)
        reward = table.pick("total", rows, dec.actions)
        adv, ret = gae(reward[None], dec.value[None], torch.ones(1, batch), torch.zeros(batch))
        stats = ppo.update(Rollout.from_steps(x[None], dec.actions[None], dec.log_prob[None], dec.value[None],
                                              adv, ret), gen)
        history.append({"iteration": it + 1, "reward": float(reward.mean()), **stats})
    controller.eval()
    return history


def _metrics(table: RewardTable, actions: torch.Tensor) -> dict:
    rows = torch.arange(table.features.shape[0])
    pick = lambda name: table.pick(name, rows, actions)  # noqa: E731
    correct, valued, stated = pick("correct"), pick("valued"), table.stated
    unstated = ~stated
    return {
        "accuracy": float(correct.mean()),
        "accuracy_stated": float(correct[stated].mean()) if stated.any() else None,
        "hallucination_rate": float(valued[unstated].mean()) if unstated.any() else None,
        "wrong_value_rate_stated": float((valued * (1 - correct))[stated].mean()) if stated.any() else None,
        "abstained": float(pick("abstained").mean()),
        "ece": expected_calibration_error(pick("confidence").clamp(0, 1), correct),
        "compute": float(pick("compute").mean()), "flops_per_answer": float(pick("flops").mean()),
        "latency": float(pick("latency").mean()), "reward": float(pick("total").mean()),
        "gates_open": {g: float(actions[:, i].mean()) for i, g in enumerate(GATES)},
    }


@torch.no_grad()
def evaluate_policies(table: RewardTable, controller, train_table: RewardTable | None = None) -> dict:
    """Metrics of fixed gate settings ("stage2": every gate but verification open, i.e. the system
    before stage 3 trained its critic and controller), the controller (greedy) and the
    per-question oracle."""
    n = table.features.shape[0]
    fixed = lambda **open_: torch.tensor([[float(open_.get(g, False)) for g in GATES]]).expand(n, -1)  # noqa: E731
    out = {"stage2": _metrics(table, fixed(**{g: True for g in RUN_GATES})),  # before stage 3: no critic
           "all_open": _metrics(table, fixed(**{g: True for g in GATES})),
           "all_closed": _metrics(table, fixed()),
           "no_semantic": _metrics(table, fixed(**{g: True for g in GATES if g != "semantic"})),
           "controller": _metrics(table, controller.greedy(table.features).actions)}
    if train_table is not None:  # the best single setting on the training questions
        best = train_table.total.reshape(train_table.total.shape[0], -1).mean(0).argmax()
        out["best_fixed"] = _metrics(table, RewardTable.actions(best.expand(n)))
    out["oracle"] = _metrics(table, RewardTable.actions(table.total.reshape(n, -1).argmax(-1)))
    return out
