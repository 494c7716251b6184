"""Tiny random backbones, tokenizers and checkpoints built in process (no downloads), for fast CPU tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

VOCAB = 128


def tiny_backbone(kind: str = "llama", seed: int = 0, dtype=torch.float32):
    """A 2-layer, hidden-32 causal LM of the given architecture family, in eval mode."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, **common)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, **common)
        model = tf.Qwen2ForCausalLM(cfg)
    elif kind in ("qwen3", "mistral"):
        cls_cfg, cls_model = ((tf.Qwen3Config, tf.Qwen3ForCausalLM) if kind == "qwen3"
                              else (tf.MistralConfig, tf.MistralForCausalLM))
        cfg = cls_cfg(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=512, **common)
        model = cls_model(cfg)
    elif kind == "gemma3":
        cfg = tf.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                                  sliding_window=16, **common)
        model = tf.Gemma3ForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, vocab_size=VOCAB,
                            bos_token_id=1, eos_token_id=2)
        model = tf.GPT2LMHeadModel(cfg)
    elif kind == "opt":
        cfg = tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=32, max_position_embeddings=512, **common)
        model = tf.OPTForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.config.use_cache = False
    return model.to(dtype).eval()


def tiny_hmt(kind: str = "llama", dtype=torch.float32, seed: int = 0, **config):
    """HMT over a tiny backbone, with memory parameters randomised so they matter."""
    from hiermem.models.hmt import HMT, HMTConfig

    backbone = tiny_backbone(kind, seed=seed, dtype=dtype)
    for p in backbone.parameters():
        p.requires_grad_(False)
    defaults = dict(backbone=f"tiny-{kind}", segment_length=16, sensory_length=4, cache_size=5)
    model = HMT(backbone, HMTConfig(**{**defaults, **config}))
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def tiny_tokenizer(chat_template: bool = True):
    """Character-level tokenizer over printable ASCII (ids < 128, matching the tiny backbones):
    <pad>=0, <s>=1, </s>=2, <unk>=3."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [chr(c) for c in range(32, 127)] + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model_folder(root: Path, chat_template: bool = True, **config) -> Path:
    """A saved HMT checkpoint over a tiny llama backbone saved (with a tokenizer) next to it."""
    from hiermem.models.hmt import HMT, HMTConfig

    backbone = tiny_backbone("llama")
    backbone.save_pretrained(root / "backbone")
    tiny_tokenizer(chat_template).save_pretrained(root / "backbone")
    cfg = HMTConfig(**{"backbone": str(root / "backbone"), "segment_length": 16, "sensory_length": 4,
                       "cache_size": 5, **config})
    HMT(backbone, cfg).save_pretrained(root / "model")
    return root / "model"


def assert_states_close(a, b, tol: float = 1e-10) -> None:
    """Two model states hold the same tensors (names, values within ``tol``) and the same counters."""
    mine, theirs = a.named_tensors(), b.named_tensors()
    assert mine.keys() == theirs.keys(), (sorted(mine), sorted(theirs))
    for name, (t, _) in mine.items():
        if t.is_floating_point():
            torch.testing.assert_close(t, theirs[name][0], rtol=tol, atol=tol, msg=name)
        else:
            assert torch.equal(t, theirs[name][0]), name
    assert a._meta() == b._meta()
