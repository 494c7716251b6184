"""The ``hiermem`` console script. Each subcommand is a typed Python function whose docstring is
its help; the same functions are the Python API. Arguments are built from the signature:

- parameters without a default are positional; the others are ``--options`` (``_`` -> ``-``);
- ``bool`` options become ``--flag`` / ``--no-flag``; ``list[X]`` options take several values;
  ``Literal[...]`` options list their choices;
- the docstring's ``Args:`` section gives each option its help line.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import re
import sys
import types
import typing
from typing import Literal, get_args, get_origin

# subcommand -> "module:function"; modules are imported only when their command runs
COMMANDS = {
    "info": "hiermem.commands:info",
    "demo": "hiermem.commands:demo",
    "train": "hiermem.training.cli:train_function",  # dispatches on the model type
    "eval": "hiermem.evaluation.cli:evaluate",
    "compare": "hiermem.evaluation.compare:compare",
    "generate": "hiermem.inference.cli:generate",
    "chat": "hiermem.inference.chat:chat",
    "serve": "hiermem.inference.server:serve",
    "quantize": "hiermem.inference.quantize:quantize",
    "tokenizer": "hiermem.cli:tokenizer_function",  # dispatches on the action (train)
    "finetune": "hiermem.training.finetune:finetune",
    "merge-lora": "hiermem.training.finetune:merge_lora_command",
    "expand": "hiermem.models.hierarchos.expand:expand_command",
}
# commands whose target is a resolver taking the next positional word; the flag tells whether
# that word is consumed (an action name) or stays an argument of the resolved function
DISPATCH = {"train": False, "tokenizer": True}


def tokenizer_function(action: str):
    if action != "train":
        from hiermem.errors import ConfigError

        raise ConfigError(f"unknown tokenizer action {action!r}; use: hiermem tokenizer train ...")
    return _resolve("hiermem.tokenizers:train_command")


def _resolve(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _doc_parts(func) -> tuple[str, dict[str, str]]:
    doc = inspect.getdoc(func) or ""
    head, _, rest = doc.partition("\nArgs:\n")
    args, current = {}, None
    for line in rest.splitlines():
        m = re.match(r"^\s{0,8}(\w+):\s*(.*)$", line)
        if m and not line.startswith(" " * 9):
            current = m.group(1)
            args[current] = m.group(2)
        elif current and line.strip():
            args[current] += " " + line.strip()
    return head.strip(), args


def _unwrap_optional(tp):
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


# options every command words the same way, whatever its docstring says
SHARED_HELP = {
    "device": "where to run: cpu, cuda or cuda:N (default: CUDA when present, else CPU)",
    "dtype": "float32, bfloat16 or float16 (default: bfloat16 on CUDA when supported, else float32)",
}


def _default_note(help_text: str, default) -> str:
    """`` (default: X)`` for the help line, or "" when the text already tells the default (it says
    "default" or "unset:"), or there is nothing to show (None, an empty list)."""
    text = help_text.lower()
    if default is None or "default" in text or "unset:" in text:
        return ""
    if isinstance(default, (list, tuple)):
        if not default:
            return ""
        default = " ".join(map(str, default))  # as typed on the command line
    return f" (default: {default})"


def _add_argument(parser: argparse.ArgumentParser, name: str, param: inspect.Parameter, hint, help_text: str,
                  suppress: bool = False):
    tp, _ = _unwrap_optional(hint)
    flag = "--" + name.replace("_", "-")
    has_default = param.default is not inspect.Parameter.empty
    help_text = SHARED_HELP.get(name, help_text).rstrip(".")
    kwargs: dict = {"help": help_text + (_default_note(help_text, param.default) if has_default else "")}
    origin = get_origin(tp)
    default = argparse.SUPPRESS if suppress else param.default  # suppressed: only given options appear
    if tp is dict or origin is dict:
        return  # dict options come from config files only
    if tp is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=kwargs["help"])
        return
    if origin is Literal:
        kwargs["choices"] = list(get_args(tp))
        kwargs["type"] = type(kwargs["choices"][0])
    elif origin in (list, tuple):
        (inner, *_) = get_args(tp) or (str,)
        kwargs["type"], kwargs["nargs"] = inner, "*"
    elif tp in (int, float, str):
        kwargs["type"] = tp
    if has_default:
        parser.add_argument(flag, dest=name, default=default, **kwargs)
    else:
        kwargs["help"] = help_text
        parser.add_argument(name, **kwargs)


def build_parser(func, parser: argparse.ArgumentParser, suppress: bool = False) -> argparse.ArgumentParser:
    """Add one argument per parameter of ``func`` to ``parser`` (``suppress``: options left out of
    the command line do not appear in the parsed namespace)."""
    head, arg_help = _doc_parts(func)
    parser.description = head
    hints = typing.get_type_hints(func)
    for name, param in inspect.signature(func).parameters.items():
        _add_argument(parser, name, param, hints.get(name, str), arg_help.get(name, ""), suppress)
    return parser


def _hyphenated(arg: str) -> str:
    """``--lora_r`` (the seed projects' spelling) -> ``--lora-r``; values and ``--flag=value``'s
    value are left as they are."""
    if not arg.startswith("--"):
        return arg
    flag, eq, value = arg.partition("=")
    return flag.replace("_", "-") + eq + value


def _chosen(argv: list[str]) -> tuple[str | None, int]:
    """The subcommand named on the command line and its index in ``argv``."""
    for i, a in enumerate(argv):
        if not a.startswith("-"):
            return a, i
    return None, -1


def main(argv: list[str] | None = None) -> int:
    from hiermem import __version__
    from hiermem.errors import HiermemError

    top = argparse.ArgumentParser(prog="hiermem", description="Hierarchical-memory language models: "
                                  "train, evaluate, generate, chat and serve long-context models.")
    top.add_argument("--version", action="version", version=f"hiermem {__version__}")
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    argv = [_hyphenated(a) for a in (sys.argv[1:] if argv is None else argv)]
    # only the chosen command's module is imported (fast --help, no heavy imports)
    chosen, at = _chosen(argv)
    func = None
    try:
        if chosen in COMMANDS:
            func = _resolve(COMMANDS[chosen])
            if chosen in DISPATCH:
                word, i = _chosen(argv[at + 1:])
                if word is None:  # `hiermem train [--help]`: list what can follow
                    print(_dispatch_help(chosen))
                    return 0
                func = func(word)
                if DISPATCH[chosen]:  # the word names the action, not an argument: drop it
                    argv = argv[:at + 1 + i] + argv[at + 2 + i:]
    except HiermemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, target in COMMANDS.items():
        if name == chosen:
            build_parser(func, sub.add_parser(name, help=_doc_parts(func)[0].split("\n")[0]),
                         suppress="config" in inspect.signature(func).parameters)
        else:
            sub.add_parser(name, help=_SUMMARIES.get(name, ""), add_help=False)
    args = top.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        top.print_help()
        return 0
    kwargs = {k: v for k, v in vars(args).items() if k not in ("command", "verbose")}
    _quiet_libraries()
    try:
        if kwargs.get("config"):
            from hiermem.configs import read_config

            kwargs = {**read_config(func, kwargs["config"]), **kwargs}  # the command line wins
        result = func(**kwargs)
    except HiermemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


def _quiet_libraries() -> None:
    """No progress bars from Hugging Face libraries ("Loading weights"): commands report their own progress."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _dispatch_help(command: str) -> str:
    if command == "train":
        from hiermem.models import REGISTRY

        kinds = "\n".join(f"  {k:12s} {v.description}" for k, v in sorted(REGISTRY.items()))
        return f"usage: hiermem train MODEL [options]  (hiermem train MODEL --help for the options)\n\nmodels:\n{kinds}"
    return "usage: hiermem tokenizer train [options]  (hiermem tokenizer train --help for the options)"


_SUMMARIES = {
    "info": "versions, device, available backbones and corpora",
    "demo": "the main job on bundled defaults: HMT vs the backbone on chunks and a sliding window, with costs",
    "train": "train a model: HMT's two-stage recipe, or any other family from scratch",
    "eval": "long-document perplexity against baselines, recall tasks, memory diagnostics",
    "compare": "model families side by side: same text, same training budget, bits per byte",
    "generate": "generate text with memory (prompts longer than the window are fine)",
    "chat": "interactive chat with memory that persists across turns and runs",
    "serve": "OpenAI-compatible HTTP server with per-session memory",
    "quantize": "quantize for CPU inference: int8 HMT backbones, q8_0/q4_0/int4 from-scratch weights",
    "tokenizer": "train a SentencePiece (bpe/unigram/char/word) or byte tokenizer for from-scratch models",
    "finetune": "LoRA fine-tuning of a from-scratch model on new text (adapters only are saved)",
    "merge-lora": "fold LoRA adapters into their base model as plain weights",
    "expand": "grow a trained hierarchos (wider C / manager / worker) keeping its exact function",
}

if __name__ == "__main__":
    sys.exit(main())
