"""Test-time learning of Hierarchos in chat: is a fact stated in turn 1 answered 20 turns later?

For each of ``--facts`` generated facts ("The secret word of <name> is <word>."): a fresh chat
session states the fact in turn 1, then ``--filler-turns`` turns of unrelated text (the model
replies to each), then asks "What is the secret word of <name>?". Two conditions, same turns:

- ``on``: online learning as ``hiermem chat`` runs it (the memory's surprise update every token, the
  step size on the cosine schedule from the model's ltm_lr, 100 turns per cycle);
- ``off``: the update disabled (step size 0: the long-term memory never changes);
- ``on, fact never stated``: a control, turn 1 without the fact (what the words' prior alone scores).

Measured per condition: the rate of greedy answers that contain the word (``--answer-tokens`` new
tokens), and a forced choice: after the question, the continuation "The secret word of <name> is
<w>." scored for the true word and ``--distractors`` other words of the set (sum of log
probabilities of the word's tokens, each from a copy of the session's state); the rate at which
the true word scores best (chance: 1 / (distractors + 1)) and its mean rank.

    OMP_NUM_THREADS=1 python benchmarks/bench_hierarchos_ttl.py           # released hierarchos-shakespeare
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from common import machine, markdown_table, print_header, write_results  # noqa: E402

from hiermem.inference.generate import GenerationConfig  # noqa: E402
from hiermem.inference.online import LtmSchedule, OnlineLearning, online_learning  # noqa: E402
from hiermem.inference.runtime import ChatFormat, encode, eos_token_ids, load_for_inference  # noqa: E402
from hiermem.inference.sessions import Session  # noqa: E402

NAMES = ["Romeo", "Juliet", "Hamlet", "Ophelia", "Portia", "Antonio", "Viola", "Orsino", "Rosalind", "Orlando",
         "Beatrice", "Benedick", "Miranda", "Prospero", "Lear", "Cordelia", "Othello", "Desdemona", "Macbeth",
         "Banquo", "Puck", "Oberon", "Titania", "Falstaff", "Brutus", "Cassius", "Horatio", "Imogen"]
WORDS = ["lantern", "harbor", "pepper", "violet", "copper", "thimble", "meadow", "falcon", "ribbon", "walnut",
         "candle", "saddle", "orchard", "marble", "anchor", "pillow", "thistle", "garnet", "willow", "barley",
         "cinder", "quiver", "basket", "juniper", "lemon", "mitten", "parcel", "tulip"]
FILLER = ["Tell me of the weather on the heath this morning.", "What news from the market in the town?",
          "The horses are tired after the long road.", "Sing me a song of the sea and the ships.",
          "How fares the king in his castle tonight?", "The bread is warm and the wine is sweet.",
          "Speak of the stars above the quiet field.", "My lord, the soldiers wait at the gate.",
          "What think you of the play we saw?", "The river runs cold beneath the old bridge.",
          "Good morrow, friend, how goes the day?", "The garden is full of roses in the spring.",
          "Where shall we dine when the sun is down?", "The clock strikes nine and the hall is empty.",
          "Let us walk by the shore and speak of love.", "The messenger brings letters from the north.",
          "Fetch me a cup of water from the well.", "The winter wind blows hard upon the door.",
          "What say the players of their new comedy?", "A merry heart goes all the day."]


def facts(n: int, seed: int) -> list[tuple[str, str]]:
    if n > min(len(NAMES), len(WORDS)):
        raise SystemExit(f"at most {min(len(NAMES), len(WORDS))} facts")
    rng = random.Random(seed)
    return list(zip(rng.sample(NAMES, n), rng.sample(WORDS, n)))


@torch.no_grad()
def word_logprob(model, tokenizer, session: Session, text: str, word: str) -> float:
    """Sum of log p of the tokens of ``text`` from ``word`` on (the word and the final "."), ``text``
    read after the session's state (the session is left untouched)."""
    ids = encode(tokenizer, text)
    prefix = encode(tokenizer, text[:text.rindex(word)].rstrip())[0]
    n = len(prefix) if torch.equal(ids[0, :len(prefix)], prefix) else len(prefix) - 1  # BPE merges at the seam
    out = model(ids, state=session.decoder.state, labels=ids, return_token_nll=True)
    first = -torch.log_softmax(session.decoder.last_logits.float(), -1)[0, ids[0, 0]]  # from the session's logits
    nll = torch.cat([first.reshape(1), out.token_nll[0].float()])  # (T,): nll of every token of ``text``
    return -float(nll[n:].sum())


def run_fact(model, tokenizer, learning: OnlineLearning, name: str, word: str, pool: list[str], args,
             rng: random.Random, stated: bool = True) -> dict:
    fmt = ChatFormat(tokenizer)
    session = Session(model)
    session.learning = learning
    cfg = GenerationConfig(max_new_tokens=args.reply_tokens, do_sample=False, eos_token_id=eos_token_ids(model, tokenizer),
                           stop_strings=fmt.stop_strings)
    first = f"The secret word of {name} is {word}." if stated else "The secret word is kept in a box."
    session.chat(tokenizer, fmt, [{"role": "user", "content": first}], cfg)
    for text in rng.sample(FILLER, args.filler_turns):
        session.chat(tokenizer, fmt, [{"role": "user", "content": text}], cfg)
    question = [{"role": "user", "content": f"What is the secret word of {name}?"}]
    # forced choice, scored before the answer is generated (from copies of the state)
    before = session.decoder.state
    prompt = fmt.continuation(session._transcript(fmt), session.history, question)
    learning.begin(session)  # the question read as a turn reads it
    session.decoder.feed(encode(tokenizer, prompt))
    candidates = [word] + rng.sample([w for w in pool if w != word], args.distractors)
    scores = {w: word_logprob(model, tokenizer, session, f" The secret word of {name} is {w}.", w) for w in candidates}
    session.decoder = model.decoder(state=before)  # the question is asked again, as a normal turn
    answer = session.chat(tokenizer, fmt, question, GenerationConfig(
        max_new_tokens=args.answer_tokens, do_sample=False, eos_token_id=cfg.eos_token_id,
        stop_strings=fmt.stop_strings)).text
    rank = 1 + sum(s > scores[word] for s in scores.values())
    return {"name": name, "word": word, "answer": answer, "correct": word.lower() in answer.lower(), "rank": rank,
            "word_logprob": round(scores[word], 3), "turns": session.turns,
            "tokens": int(session.decoder.state.clock[0])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="hierarchos-shakespeare")
    p.add_argument("--facts", type=int, default=20)
    p.add_argument("--filler-turns", type=int, default=19, help="turns between the fact (turn 1) and the question")
    p.add_argument("--reply-tokens", type=int, default=12)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--distractors", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = machine(torch.device("cpu"))
    print_header("Hierarchos test-time learning in chat", info)
    model, tokenizer = load_for_inference(args.model, device="cpu", dtype="float32")
    pool = WORDS  # distractors: the other words of the list
    conditions = {"on": (online_learning(model), True),
                  "off": (OnlineLearning(model, LtmSchedule(0.0, static=True)), True),
                  "on, fact never stated": (online_learning(model), False)}
    results = {"machine": info, "model": args.model, "ltm_lr": model.config.ltm_lr, "args": vars(args),
               "conditions": {}}
    for cond, (learning, stated) in conditions.items():
        rows, start = [], time.perf_counter()
        for i, (name, word) in enumerate(facts(args.facts, args.seed)):
            r = run_fact(model, tokenizer, learning, name, word, pool, args, random.Random(args.seed * 1000 + i),
                         stated)
            rows.append(r)
            print(f"{cond:3s} {name:10s} {word:8s} rank {r['rank']}  correct {r['correct']}  "
                  f"answer {r['answer']!r}", flush=True)
        n = len(rows)
        results["conditions"][cond] = {
            "answer_rate": sum(r["correct"] for r in rows) / n, "forced_choice_rate": sum(r["rank"] == 1 for r in rows) / n,
            "mean_rank": statistics.mean(r["rank"] for r in rows),
            "mean_word_logprob": statistics.mean(r["word_logprob"] for r in rows),
            "seconds": round(time.perf_counter() - start, 1), "facts": rows}
    c = results["conditions"]
    k = args.distractors + 1
    md = [f"# Hierarchos test-time learning in chat\n\n`OMP_NUM_THREADS=1 {info['command']}` on {info['cpu']} "
          f"({info['cores']} cores), torch {info['torch']}.\n",
          f"Model `{args.model}` (ltm_lr {model.config.ltm_lr}). {args.facts} facts \"The secret word of <name> is "
          f"<word>.\", each in a fresh session: the fact in turn 1, {args.filler_turns} turns of unrelated text "
          f"(greedy replies of up to {args.reply_tokens} tokens), the question \"What is the secret word of "
          f"<name>?\" in turn {args.filler_turns + 2}. `on`: the chat's online learning (cosine schedule from "
          f"ltm_lr); `off`: step size 0 (the long-term memory never changes); `on, fact never stated`: "
          f"control, turn 1 without the fact (the forced choice then measures the words' prior alone).\n",
          "Forced choice: after the question, \"The secret word of <name> is <w>.\" scored for the true word "
          f"and {args.distractors} other words of the list (sum of log p of the word and the final \".\").\n",
          markdown_table(["condition", "answers containing the word", f"forced choice among {k} (chance {1 / k:.2f})",
                          "mean rank of the word", "mean log p of the word", "seconds"],
                         [[cond, f"{v['answer_rate']:.2f}", f"{v['forced_choice_rate']:.2f}",
                           f"{v['mean_rank']:.2f}", f"{v['mean_word_logprob']:.2f}", v["seconds"]]
                          for cond, v in c.items()])]
    for path in write_results("hierarchos_ttl", results, "\n".join(md) + "\n"):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
