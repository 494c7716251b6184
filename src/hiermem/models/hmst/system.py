"""HMSTSystem: the HMST decoder with its memory tiers, meta-controller and critic, answering questions
about what a session has read.

A session reads documents with the state carried (attention window + episodic SSM) while a
:class:`~hiermem.models.hmst.consolidation.Consolidator` writes every chunk that leaves the window
into the session's own semantic store (one store per session: nothing one session reads is
visible to another). A question is answered in two steps:

1. **Probe**: the question is read after the session's state by the full model; its pooled hidden
   state, next-token entropy, position and memory fill are the controller's features
   (:func:`~hiermem.models.hmst.controller.step_features`). Every gate setting pays for it.
2. **Answer**, with the five gates (from the controller, or given):

   - ``semantic``: search the store with the retriever's query of the probe's hidden states, read
     the ``retrieve_k`` best chunks (in stream order), then the question again, before answering;
   - ``episodic`` closed: the answering passes (retrieved chunks, question again, answer tokens)
     skip the SSM blocks;
   - ``expert_bias``: the answering passes route with the learned per-expert router bias;
   - ``early_exit``: the answering passes stop at the model's ``early_exit_layer``;
   - ``verify``: the critic scores the answer and the system abstains ("unknown") when
     P(wrong) > its threshold.

   The answer is decoded greedily until a newline (at most ``max_answer_tokens``).

Each answer records the multiply-adds of its answering passes (``flops``), the tokens read and
decoded (``latency_units``: a retrieved read is one parallel pass, each decoded token one step),
and the confidence stated for it: 1 - P(wrong) with verification, else the model's own geometric
mean probability of its answer tokens.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from hiermem.data.facts import UNKNOWN
from hiermem.errors import CheckpointError, ConfigError
from hiermem.evaluation.loading import tokenize
from hiermem.io import atomic_write_json, dataclass_from_dict, load_tensors, read_json, save_tensors
from hiermem.memory.semantic import SemanticStore
from hiermem.models.base import copy_checked, weights_digest
from hiermem.models.hmst.consolidation import ConsolidationPolicy, Consolidator
from hiermem.models.hmst.controller import GATES, step_features

SYSTEM_CONFIG, SYSTEM_WEIGHTS = "hmst_system.json", "hmst_system.safetensors"
CRITIC_EXTRA = 4  # retrieval score, semantic used, answer mean log-probability, answered unknown


@dataclass
class SystemConfig:
    """chunk_tokens: the consolidator's chunk size; retrieve_k: chunks read per retrieval;
    max_answer_tokens: decoding limit; max_position: the position feature's scale (tokens);
    store_capacity: the memory-fill feature's scale (entries)."""

    chunk_tokens: int = 32
    retrieve_k: int = 1
    max_answer_tokens: int = 6
    max_position: int = 4096
    store_capacity: int = 256

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Session:
    """What one session has read: the model state, its semantic store and consolidator."""

    state: object
    store: SemanticStore
    consolidator: Consolidator
    tokens: int = 0


@dataclass
class Answer:
    text: str
    abstained: bool
    gates: dict
    confidence: float
    p_wrong: float | None
    retrieval_score: float
    retrieved: list = field(default_factory=list)  # payloads of the chunks read
    flops: float = 0.0
    latency_units: float = 0.0
    features: torch.Tensor | None = None  # (F,) the controller's features of the probe
    critic_features: torch.Tensor | None = None  # (F + CRITIC_EXTRA,)


def newline_ids(tokenizer) -> tuple[int, ...]:
    """Ids of the tokens whose text ends in a newline (chunk boundaries, the end of an answer)."""
    return tuple(i for i in range(len(tokenizer)) if tokenizer.decode([i]).endswith("\n"))


def all_gates(open_: bool = True) -> dict:
    return {g: open_ for g in GATES}


class HMSTSystem:
    """model: a trained HMST with ``tokenizer``; retriever, controller, critic: optional trained
    parts (without a retriever, chunks are keyed by their mean hidden state)."""

    def __init__(self, model, tokenizer, retriever=None, controller=None, critic=None,
                 config: SystemConfig | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.retriever, self.controller, self.critic = retriever, controller, critic
        self.config = config or SystemConfig()
        self.newlines = newline_ids(tokenizer)
        if not self.newlines:
            raise ConfigError("the tokenizer has no token ending in a newline: answers could not end")
        self.feature_dim = model.config.hidden_size + 3

    # --- reading ----------------------------------------------------------------------------
    def new_session(self, source: str | None = None) -> Session:
        dim = self.retriever.config.dim if self.retriever is not None else self.model.config.hidden_size
        store = SemanticStore(dim=dim, kind="flat")
        policy = ConsolidationPolicy(chunk_tokens=self.config.chunk_tokens, every_tokens=self.config.chunk_tokens,
                                     min_tokens=1, dedup_threshold=2.0, boundary_tokens=self.newlines)
        cons = Consolidator.for_model(self.model, store, policy, retriever=self.retriever,
                                      decode=self.tokenizer.decode, source=source)
        return Session(self.model.init_state(1), store, cons)

    @torch.no_grad()
    def read(self, session: Session, text: str, call_tokens: int = 256) -> None:
        """Read ``text`` into the session (state carried, chunks consolidated; pending ones flushed)."""
        ids = torch.tensor([tokenize(self.tokenizer, text)])
        self.read_ids(session, ids, call_tokens)

    @torch.no_grad()
    def read_ids(self, session: Session, ids: torch.Tensor, call_tokens: int = 256) -> torch.Tensor:
        """Read ids (1, T) into the session; returns their final hidden states (T, d)."""
        hidden = []
        for a in range(0, ids.shape[1], call_tokens):
            out = self.model(ids[:, a:a + call_tokens], state=session.state, return_logits=False, return_hidden=True)
            session.state = out.state
            session.consolidator.observe(ids[0, a:a + call_tokens], out.hidden[0])
            hidden.append(out.hidden[0])
        session.tokens += ids.shape[1]
        session.consolidator.flush()
        return torch.cat(hidden)

    # --- answering --------------------------------------------------------------------------
    @torch.no_grad()
    def probe(self, session: Session, question: str):
        """Read the question after the session: (output, question ids, controller features (1, F))."""
        q = torch.tensor([tokenize(self.tokenizer, "\n" + question)])
        out = self.model(q, state=session.state, return_logits=False, return_hidden=True)
        fill = len(session.store) / self.config.store_capacity
        feats = step_features(out.hidden.mean(1), out.last_logits, session.tokens, self.config.max_position, fill)
        return out, q, feats

    def decide(self, features: torch.Tensor) -> dict:
        """The controller's greedy gates for features (1, F); every gate open without a controller."""
        if self.controller is None:
            return all_gates(True)
        return {k: bool(v[0]) for k, v in self.controller.greedy(features).gates().items()}

    @torch.no_grad()
    def answer(self, session: Session, question: str, gates: dict | None = None, probe=None) -> Answer:
        """Answer ``question`` about what ``session`` read (see the module docstring). ``gates``:
        gate name -> bool (default: the controller's decision); ``probe``: a cached ``self.probe``."""
        out, q, feats = probe if probe is not None else self.probe(session, question)
        g = self.decide(feats) if gates is None else {**all_gates(False), **gates}
        c, m = self.config, self.model
        kw = dict(skip_ssm=not g["episodic"], expert_bias=g["expert_bias"],
                  exit_layer=m.config.early_exit_layer if g["early_exit"] else None)
        flops, latency, score, hits = 0.0, 0.0, 0.0, []
        state, logits = out.state, out.last_logits
        if g["semantic"] and len(session.store):
            query = (self.retriever.query_numpy(out.hidden[0]) if self.retriever is not None
                     else out.hidden[0].mean(0, keepdim=True).float().numpy())
            hits = sorted(session.store.search(query, c.retrieve_k)[0], key=lambda h: h.payload["start"])
            score = max(h.score for h in hits)
            ctx = np.concatenate([np.asarray(h.payload["tokens"], dtype=np.int64) for h in hits])
            ctx = torch.from_numpy(ctx)[None]
            ids = torch.cat([ctx, q], dim=1)
            res = m(ids, state=session.state, return_logits=False, **kw)
            state, logits = res.state, res.last_logits
            flops += res.compute["flops_per_token"] * ids.shape[1]
            latency += 1.0
        tokens, logps = [], []
        for _ in range(c.max_answer_tokens):
            logp = torch.log_softmax(logits.float(), -1)[0]
            tok = int(logp.argmax())
            tokens.append(tok), logps.append(float(logp[tok]))
            latency += 1.0
            if tok in self.newlines:
                break
            res = m(torch.tensor([[tok]]), state=state, return_logits=False, **kw)
            state, logits = res.state, res.last_logits
            flops += res.compute["flops_per_token"]
        text = self.tokenizer.decode(tokens).strip()
        mean_logp = sum(logps) / len(logps)
        extra = torch.tensor([[score, float(bool(hits)), mean_logp, float(text == UNKNOWN)]])
        crit_feats = torch.cat([feats, extra], dim=-1)
        p_wrong, confidence, abstained = None, math.exp(mean_logp), False
        if g["verify"] and self.critic is not None:
            p_wrong = float(self.critic.p_wrong(crit_feats)[0])
            confidence = 1.0 - p_wrong
            abstained = p_wrong > self.critic.config.abstain_threshold and text != UNKNOWN
            flops += self.critic.multiply_adds()
        return Answer(UNKNOWN if abstained else text, abstained, g, confidence, p_wrong, score,
                      [h.payload for h in hits], flops, latency, feats[0], crit_feats[0])

    @torch.no_grad()
    def answer_budget(self, question_tokens: int = 16) -> tuple[float, float]:
        """The most multiply-adds and latency units an answer can take (the reward's scales)."""
        c = self.config
        probe = self.model(torch.zeros(1, 1, dtype=torch.long), return_logits=False)
        tokens = c.retrieve_k * c.chunk_tokens + question_tokens + c.max_answer_tokens
        critic = self.critic.multiply_adds() if self.critic is not None else 0
        return probe.compute["flops_per_token"] * tokens + critic, 1.0 + c.max_answer_tokens

    # --- files ------------------------------------------------------------------------------
    def save(self, folder, stage: int) -> None:
        """The model (``save_pretrained``) plus ``hmst_system.json`` (stage, configs) and
        ``hmst_system.safetensors`` (retriever, controller, critic weights)."""
        folder = Path(folder)
        self.model.save_pretrained(folder)
        parts = {"retriever": self.retriever, "controller": self.controller, "critic": self.critic}
        tensors = {f"{name}.{k}": v.detach().contiguous() for name, part in parts.items() if part is not None
                   for k, v in part.state_dict().items()}
        meta = {"stage": stage, "system": self.config.to_dict(), "model_digest": model_digest(self.model),
                **{name: (asdict(part.config) if part is not None else None) for name, part in parts.items()}}
        if tensors:
            save_tensors(folder / SYSTEM_WEIGHTS, tensors, {"model_digest": meta["model_digest"]})
        atomic_write_json(folder / SYSTEM_CONFIG, meta)

    @classmethod
    def load(cls, folder, model=None) -> tuple["HMSTSystem", int]:
        """(system, stage) from a folder written by :meth:`save` (or a released name), or a plain HMST
        folder (stage 1). Weights stored in bfloat16 load in float32."""
        from hiermem.models import load_model, model_folder
        from hiermem.models.hmst.controller import ControllerConfig, MetaController
        from hiermem.models.hmst.critic import Critic, CriticConfig
        from hiermem.models.hmst.retriever import Retriever, RetrieverConfig

        folder = model_folder(folder)  # a folder or a released-weights name
        model = model if model is not None else load_model(folder)
        if model.config.model_type != "hmst":
            raise CheckpointError(f"{folder} holds a {model.config.model_type} model, not hmst")
        if not (folder / SYSTEM_CONFIG).exists():
            return cls(model, model.tokenizer), 1
        meta = read_json(folder / SYSTEM_CONFIG)
        kinds = {"retriever": (Retriever, RetrieverConfig), "controller": (MetaController, ControllerConfig),
                 "critic": (Critic, CriticConfig)}
        parts = {name: (k(dataclass_from_dict(c, meta[name], f"{name} config")) if meta.get(name) else None)
                 for name, (k, c) in kinds.items()}
        if any(p is not None for p in parts.values()):
            tensors, tmeta = load_tensors(folder / SYSTEM_WEIGHTS)
            if tmeta.get("model_digest") != model_digest(model):
                raise CheckpointError(f"{folder / SYSTEM_WEIGHTS} was trained with other HMST weights than "
                                      f"{folder}'s model; retrain the stage that wrote it")
            for name, part in parts.items():
                if part is not None:
                    own = dict(part.state_dict())
                    mine = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
                    copy_checked(own, mine, folder / SYSTEM_WEIGHTS, f"{name} weights")
                    part.eval()
        system = cls(model, model.tokenizer, config=dataclass_from_dict(SystemConfig, meta["system"], "system config"),
                     **parts)
        return system, int(meta["stage"])


def model_digest(model) -> str:
    """The digest of the model's weights in float32, so that a release stored in bfloat16 and loaded
    in float32 still matches the parts trained with it."""
    return weights_digest(copy.deepcopy(model).float())


def is_correct(answer_text: str, truth: str | None) -> bool:
    """Right value for a stated fact; "unknown" for a fact never stated."""
    return answer_text == (truth if truth is not None else UNKNOWN)
