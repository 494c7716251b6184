"""The lm-evaluation-harness adapter, offline: local task YAMLs over local JSONL files, a tiny checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from hiermem.errors import ConfigError  # noqa: E402
from hiermem.evaluation.lm_eval_adapter import HiermemLM  # noqa: E402
from hiermem.models.hmt import HMTDecoder  # noqa: E402
from tiny import tiny_model_folder  # noqa: E402

MC = [{"question": "Question: which colour is the clear sky at noon? Answer:", "choices": ["blue", "green", "loud"],
       "label": 0},
      {"question": "Question: how many legs has a cat? Answer:", "choices": ["four", "five"], "label": 0}]
TEXTS = [{"text": "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
                  "of foolishness, it was the epoch of belief."},
         {"text": "Call me Ishmael. Some years ago, never mind how long precisely, having little money."}]
GEN = [{"question": "Q: what is the capital of France?\nA:", "answer": " Paris"},
       {"question": "Q: 2+2?\nA:", "answer": " 4"}]

TASKS = {
    "hiermem_tiny_mc": ("mc.jsonl", MC, 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
                        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n'),
    "hiermem_tiny_rolling": ("text.jsonl", TEXTS, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
                             'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'),
    "hiermem_tiny_gen": ("gen.jsonl", GEN, 'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
                         'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n'
                         '  do_sample: false\nmetric_list:\n  - metric: exact_match\n'),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    ckpt, backbone = tiny_model_folder(root, chat_template=False), root / "backbone"
    tasks = root / "tasks"
    tasks.mkdir()
    for name, (data_file, rows, body) in TASKS.items():
        (tasks / data_file).write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                            f"    test: {tasks / data_file}\ntest_split: test\n{body}")
    return ckpt, backbone, tasks


@pytest.fixture(scope="module")
def lm(assets):
    ckpt, backbone, _ = assets
    return HiermemLM(checkpoint=str(ckpt), backbone=str(backbone), device="cpu")


def test_all_request_types_match_direct_hmt_computation(assets, lm):
    _, _, tasks = assets
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=manager, log_samples=True)
    model, tok = lm.hmt, lm.tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    with torch.no_grad():
        for sample in res["samples"]["hiermem_tiny_mc"]:
            for (context, continuation), ((logp, greedy),) in zip(sample["arguments"], sample["resps"]):
                ids = torch.tensor([enc(context) + enc(continuation)])
                assert ids.shape[1] > 2 * model.config.segment_length  # memory carries the context
                logits = model(ids).logits[0, len(enc(context)) - 1:-1].log_softmax(-1)  # one whole pass
                target = torch.tensor(enc(continuation))
                assert logp == pytest.approx(float(logits.gather(1, target[:, None]).sum()), abs=1e-4)
                assert greedy == bool((logits.argmax(-1) == target).all())
        for sample in res["samples"]["hiermem_tiny_rolling"]:
            ids = torch.tensor([[tok.bos_token_id] + enc(sample["doc"]["text"])])
            out = model(ids, labels=ids, return_logits=False)
            assert sample["resps"][0][0] == pytest.approx(-float(out.loss) * out.num_tokens, abs=1e-3)
        for sample in res["samples"]["hiermem_tiny_gen"]:
            dec = HMTDecoder(model)
            logits, gen = dec.feed(torch.tensor([enc(sample["arguments"][0][0])])), []
            for _ in range(6):
                t = logits.argmax(-1)
                if int(t) == tok.eos_token_id:
                    break
                gen.append(int(t))
                logits = dec.feed(t[:, None])
            assert sample["resps"][0][0] == tok.decode(gen).split("\n")[0]
    assert 0 <= res["results"]["hiermem_tiny_mc"]["acc,none"] <= 1
    assert res["results"]["hiermem_tiny_rolling"]["word_perplexity,none"] > 1


@pytest.mark.parametrize("launcher", [[str(Path(sys.executable).with_name("hiermem-lm-eval"))],
                                      [sys.executable, "-m", "hiermem.evaluation.lm_eval_adapter"]],
                         ids=["console-script", "python-m"])
def test_lm_eval_command_line_finds_the_hiermem_model(assets, tmp_path, launcher):
    ckpt, backbone, tasks = assets
    cmd = [*launcher, "run", "--model", "hiermem",
           "--model_args", f"checkpoint={ckpt},backbone={backbone}", "--device", "cpu",
           "--tasks", "hiermem_tiny_rolling", "--include_path", str(tasks), "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(next(Path(tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["results"]["hiermem_tiny_rolling"]["word_perplexity,none"] > 1


def test_unknown_model_args_are_refused(assets):
    ckpt, backbone, _ = assets
    with pytest.raises(ConfigError, match="unknown hiermem model_args"):
        HiermemLM(checkpoint=str(ckpt), backbone=str(backbone), segment_lenght=8)
