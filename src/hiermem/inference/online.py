"""Online learning in chat for models whose state learns at run time (Hierarchos).

The memory of such a model learns from every token it reads (its surprise update). Chat drives
that learning turn by turn:

- the step size of turn n (n = 0, 1, ...) follows a cosine schedule with restarts,
  ``lr_n = min_lr + (lr - min_lr) * (1 + cos(pi * (n mod steps) / steps)) / 2`` (min_lr capped at
  lr), or stays at ``lr`` (``static``); it lives in the session's state (``ltm_lr``, ``ltm_steps``), so every session of a
  server learns on its own schedule and saves it with its memory;
- ``bad``: negative feedback on the last answer: the memory slots its tokens read keep ``bad_scale``
  x what was learnt in them (their fast values) and lose their momentum (the model's ``weaken_ltm``);
- ``save_ltm`` / ``load_ltm``: the learnt memory alone (fast values, momentum, write times, clock,
  schedule steps) in its own safetensors file, apart from the weights; a file learnt by another
  model (architecture or weights) is refused with a clear error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path


from hiermem.errors import CheckpointError, ConfigError
from hiermem.io import load_tensors, save_tensors
from hiermem.models.base import weights_digest

KIND = "hiermem-ltm"


def learns_online(model) -> bool:
    """Whether the model's state learns at run time and supports the chat hooks."""
    return all(hasattr(model, name) for name in ("with_ltm_lr", "weaken_ltm", "LTM_FIELDS"))


def require_online_learning(model) -> None:
    """ConfigError unless ``model``'s state learns at run time."""
    if not learns_online(model):
        raise ConfigError(f"online learning options apply to models whose memory learns at run time "
                          f"(hierarchos); this is a {model.config.model_type} model")


@dataclass
class LtmSchedule:
    """Step size of the memory's surprise update per chat turn (see the module docstring)."""

    lr: float
    min_lr: float = 1e-5
    steps: int = 100
    static: bool = False

    def __post_init__(self):
        if not (isinstance(self.lr, (int, float)) and self.lr >= 0):
            raise ConfigError(f"--ltm-lr must be >= 0, got {self.lr!r}")
        if not (isinstance(self.min_lr, (int, float)) and self.min_lr >= 0):
            raise ConfigError(f"--ltm-schedule-min-lr must be >= 0, got {self.min_lr!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"--ltm-schedule-steps must be a positive integer, got {self.steps!r}")

    def lr_at(self, step: int) -> float:
        if self.static:
            return float(self.lr)
        low = min(self.min_lr, self.lr)  # never above lr (lr 0: no learning)
        phase = (step % self.steps) / self.steps
        return low + (self.lr - low) * 0.5 * (1.0 + math.cos(math.pi * phase))


class OnlineLearning:
    """The per-turn hooks a :class:`~hiermem.inference.sessions.Session` calls (``begin`` before a
    reply, ``end`` after it) plus negative feedback and the LTM file."""

    def __init__(self, model, schedule: LtmSchedule, bad_scale: float = 0.5):
        require_online_learning(model)
        if not 0 <= bad_scale < 1:
            raise ConfigError(f"--bad-scale must be in [0, 1), got {bad_scale!r}")
        self.model, self.schedule, self.bad_scale = model, schedule, bad_scale

    def begin(self, session) -> float:
        """Set the step size of this turn in the session's state and count the step; returns it."""
        session.ready()
        state = session.decoder.state
        lr = self.schedule.lr_at(state.ltm_steps)
        session.decoder.state = self.model.with_ltm_lr(state, lr, steps=state.ltm_steps + 1)
        session.answer_from = None
        return lr

    def end(self, session, reply) -> None:
        """Remember when the answer began for ``bad``: the time of the read that chose its first token
        (the prompt's last token; every answer token has been read back since)."""
        session.answer_from = int(session.decoder.state.clock[0]) - reply.completion_tokens - 1

    def next_lr(self, session) -> float:
        return self.schedule.lr_at(session.decoder.state.ltm_steps)

    def bad(self, session) -> int:
        """Weaken the slots the last answer read; returns how many (ConfigError when no answer yet)."""
        since = getattr(session, "answer_from", None)
        if since is None:
            raise ConfigError("no answer to mark as bad yet in this run")
        state, n = self.model.weaken_ltm(session.decoder.state, since, self.bad_scale)
        session.decoder.state = state
        session.answer_from = None  # once per answer
        session.touch()
        return n

    # --- the LTM file -------------------------------------------------------------------------
    def identity(self) -> dict:
        return {**self.model.fingerprint(), "weights": weights_digest(self.model)}

    def save_ltm(self, session, path: str | Path) -> None:
        """Write the session's learnt memory (not its short-term state nor the chat) to ``path``."""
        state = session.decoder.state
        tensors = {name: getattr(state, name).detach() for name in self.model.LTM_FIELDS}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, tensors, {"kind": KIND, "model": self.identity(), "ltm_steps": state.ltm_steps,
                                     "tokens": state.tokens})

    def load_ltm(self, session, path: str | Path) -> None:
        """Start ``session`` from a fresh state holding the memory learnt in ``path``."""
        tensors, meta = load_tensors(path)
        if meta.get("kind") != KIND:
            raise CheckpointError(f"{path} is not a hiermem LTM file")
        saved, own = meta.get("model") or {}, self.identity()
        if saved != own:
            raise CheckpointError(f"LTM file {path} was learnt by another model ({saved}); this model is {own}. "
                                  f"Use another --ltm-state file for it.")
        fresh = self.model.init_state(1)
        changes = {}
        for name in self.model.LTM_FIELDS:
            ours, theirs = getattr(fresh, name), tensors.get(name)
            if theirs is None or theirs.shape != ours.shape:
                raise CheckpointError(f"LTM file {path}: {name} is missing or has the wrong shape")
            changes[name] = theirs.to(device=ours.device, dtype=ours.dtype)
        steps, tokens = meta.get("ltm_steps", 0), meta.get("tokens", 0)
        state = dataclasses.replace(fresh, **changes, ltm_steps=steps if isinstance(steps, int) else 0,
                                    tokens=tokens if isinstance(tokens, int) else 0)
        session.pending = None
        session.decoder = self.model.decoder(state=state, batch_size=1)
        session.answer_from = None
        session.touch()


def online_learning(model, ltm_lr: float | None = None, static_ltm_lr: bool = False, ltm_schedule_steps: int = 100,
                    ltm_schedule_min_lr: float = 1e-5, bad_scale: float = 0.5,
                    asked: bool = False) -> OnlineLearning | None:
    """The chat's online learning for ``model``: on by default for models that learn at run time
    (the schedule starts at ``ltm_lr``, default the model's own), None for the others, where
    ``asked`` (any learning option given) is a ConfigError."""
    if not learns_online(model):
        if asked:
            require_online_learning(model)
        return None
    lr = model.config.ltm_lr if ltm_lr is None else ltm_lr
    return OnlineLearning(model, LtmSchedule(lr, ltm_schedule_min_lr, ltm_schedule_steps, static_ltm_lr), bad_scale)
