"""The HMST system on the synthetic facts task's held-out test documents: accuracy, hallucination
rate, calibration (ECE), compute and latency per answer for fixed gate settings (among them the
system before stage 3: every gate open but verification, no critic), the trained meta-controller
and the per-question oracle (the best gates for each question, known only afterwards).

    python benchmarks/eval_hmst_facts.py --model hmst-micro-facts [--documents 24] [--threads 1]

Writes benchmarks/results/hmst_facts.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import machine, markdown_table, pick_device, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a stage-3 folder (hiermem train hmst --stage 3) or release name")
    ap.add_argument("--documents", type=int, default=24)
    ap.add_argument("--document-chars", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from hiermem.models.hmst.system import HMSTSystem
    from hiermem.training.hmst_facts import answer_all
    from hiermem.training.hmst_policy import RewardTable, evaluate_policies
    from hiermem.data.facts import FactsTask

    system, stage = HMSTSystem.load(args.model)
    if stage != 3 or system.controller is None or system.critic is None:
        raise SystemExit(f"{args.model} is a stage-{stage} HMST; evaluate a stage-3 folder")
    docs = FactsTask.for_split("test", args.document_chars).documents(args.documents)
    t0 = time.perf_counter()
    records = answer_all(system, docs)
    seconds = time.perf_counter() - t0
    table = RewardTable.build(records, system.critic, system.answer_budget())
    policies = evaluate_policies(table, system.controller)
    data = {"machine": machine(pick_device("cpu")), "model": args.model, "documents": args.documents,
            "document_chars": args.document_chars, "questions": len(records),
            "stated": int(table.stated.sum()), "answering_seconds": round(seconds, 1), "policies": policies}
    names = ["all_closed", "no_semantic", "stage2", "all_open", "controller", "oracle"]
    rows = [[n, f"{p['accuracy']:.3f}", f"{p['accuracy_stated']:.3f}", f"{p['hallucination_rate']:.3f}",
             f"{p['ece']:.3f}", f"{p['flops_per_answer'] / 1e6:.2f}", f"{p['latency']:.3f}", f"{p['reward']:.3f}",
             " ".join(g for g, v in p["gates_open"].items() if v >= 0.5) or "-"]
            for n, p in ((n, policies[n]) for n in names)]
    md = [f"# HMST on the synthetic facts task (test split)\n",
          f"`benchmarks/eval_hmst_facts.py --model {args.model}`: {args.documents} held-out documents of "
          f"{args.document_chars} characters of filler, {len(records)} questions ({data['stated']} about stated "
          f"facts, the others about entities never stated; their right answer is \"unknown\").\n",
          markdown_table(["policy", "accuracy", "stated", "hallucination", "ECE", "M mult-adds / answer",
                          "latency", "reward", "gates open (most answers)"], rows)]
    md.append("\nstage2: the system before stage 3 (every gate but verification open, no critic); all_open adds "
              "the trained critic; oracle: the best gates of each question, known only afterwards (an upper bound). "
              "Latency and compute are fractions of the most an answer can take; multiply-adds count the answering "
              "passes (the probe that reads the question, the same for every policy, is left out).")
    write_results("hmst_facts", data, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
