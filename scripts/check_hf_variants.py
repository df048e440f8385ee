#!/usr/bin/env python3
"""Check eap's Hugging Face loader on config variants the committed fixtures do not cover.

Usage (from anywhere):

    python3 scripts/check_hf_variants.py [OUT_DIR]     # default: a temporary directory

builds small random-weight models with transformers (`save_pretrained`, float32, fixed seeds),
records transformers' own logits (eager attention) for fixed tokens in each model's
`reference.safetensors` (`tokens` [2, 7] int64, `logits` [2, 7, vocab]), then runs

    EAP_HF_VARIANTS=OUT_DIR cargo test --release --test tests \
        loading::transformers_variants -- --ignored --nocapture

which loads every model with eap and asserts logits within 1e-4 relative error. Variants:

    gemma                  model_type gemma: (1 + w) RMSNorm, sqrt(d) embedding scale, GeGLU,
                           the legacy hidden_act "gelu" (meaning the tanh form), GQA, head_dim 16
    olmo, olmo_tied        model_type olmo: parameter-free LayerNorm, attention biases; tied
    qwen2_sliding          use_sliding_window with window 3 on layers >= max_window_layers = 1
    mistral_sliding        sliding window 3 on every layer
    neox_sequential        use_parallel_residual false, rotary_pct 0.5, gelu_new, tied
    llama_bias             attention_bias (q/k/v/o biases), one key/value head, rope_theta 500
    gemma2_default_types   no layer_types in config.json (transformers' default: even layers
                           slide), window 3, attention biases

The sliding windows (3 < 7 tokens) change transformers' logits by ~2 (checked when the script
was written), so they are exercised. Rust tests need none of this: it is a check to rerun when
the loader changes. Uses scripts/.venv (see make_fixtures.py).
"""

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
VENV = SCRIPTS / ".venv"


def main():
    if Path(sys.prefix).resolve() != VENV.resolve():
        py = VENV / "bin" / "python"
        if not py.exists():
            sys.exit("scripts/.venv is missing: run python3 scripts/make_fixtures.py once")
        os.execv(str(py), [str(py), __file__, *sys.argv[1:]])

    import torch
    from safetensors.torch import save_file
    from transformers import (Gemma2Config, Gemma2ForCausalLM, GemmaConfig, GemmaForCausalLM,
                              GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM,
                              MistralConfig, MistralForCausalLM, OlmoConfig, OlmoForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    out_root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    variants = {
        "gemma": (GemmaForCausalLM, GemmaConfig(
            **common, num_key_value_heads=2, head_dim=16, hidden_act="gelu")),
        "olmo": (OlmoForCausalLM, OlmoConfig(
            **common, num_key_value_heads=2, attention_bias=True)),
        "olmo_tied": (OlmoForCausalLM, OlmoConfig(**common, tie_word_embeddings=True)),
        "qwen2_sliding": (Qwen2ForCausalLM, Qwen2Config(
            **common, num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
            max_window_layers=1)),
        "mistral_sliding": (MistralForCausalLM, MistralConfig(
            **common, num_key_value_heads=2, sliding_window=3)),
        "neox_sequential": (GPTNeoXForCausalLM, GPTNeoXConfig(
            **common, use_parallel_residual=False, rotary_pct=0.5, hidden_act="gelu_new",
            tie_word_embeddings=True)),
        "llama_bias": (LlamaForCausalLM, LlamaConfig(
            **common, num_key_value_heads=1, attention_bias=True, rope_theta=500.0)),
        "gemma2_default_types": (Gemma2ForCausalLM, Gemma2Config(
            **common, num_key_value_heads=2, head_dim=8, sliding_window=3,
            query_pre_attn_scalar=10, attn_logit_softcapping=3.0, final_logit_softcapping=2.0,
            attention_bias=True)),
    }
    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    for name, (cls, cfg) in variants.items():
        torch.manual_seed(0)
        cfg._attn_implementation = "eager"
        model = cls(cfg).eval()
        gemma = name.startswith("gemma")
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                r = torch.randn(p.shape, generator=g)
                if "norm" in pname and pname.endswith("bias"):
                    p.copy_(0.1 * r)
                elif "norm" in pname:
                    # Gemma stores w of its (1 + w) gains.
                    p.copy_(0.3 * r if gemma else 1 + 0.3 * r)
                elif pname.endswith("bias"):
                    p.copy_(0.1 * r)
                elif "embed" in pname:
                    p.copy_((0.2 if gemma else 0.8) * r)
                else:
                    p.copy_(r / math.sqrt(p.shape[-1]) * (1.3 if name.startswith("gemma2") else 1))
        out = out_root / name
        model.save_pretrained(out, safe_serialization=True)
        (out / "generation_config.json").unlink(missing_ok=True)
        if name == "gemma2_default_types":
            path = out / "config.json"
            c = json.loads(path.read_text())
            c.pop("layer_types", None)
            path.write_text(json.dumps(c, indent=2))
            model = cls.from_pretrained(out, attn_implementation="eager").eval()
        with torch.no_grad():
            logits = model(tokens).logits.float().contiguous()
        save_file({"tokens": tokens.clone(), "logits": logits}, str(out / "reference.safetensors"))
        print(f"{name}: written to {out}")

    env = dict(os.environ, EAP_HF_VARIANTS=str(out_root))
    subprocess.check_call(
        ["cargo", "test", "--release", "--test", "tests", "loading::transformers_variants",
         "--", "--ignored", "--nocapture"], cwd=ROOT, env=env)


if __name__ == "__main__":
    main()
