#!/usr/bin/env python3
"""Export a TransformerLens HookedTransformer to the directory format `eap` reads.

    python3 scripts/export_transformerlens.py MODEL_NAME OUT_DIR [--dtype float32|bfloat16|float16]
        [--no-fold-ln]

or, from Python, `export(model, out_dir)` with a HookedTransformer you already have.

Writes OUT_DIR/model.safetensors (TransformerLens state-dict names and shapes: embed.W_E,
pos_embed.W_pos, blocks.{i}.ln1.w/.b, blocks.{i}.attn.W_Q/W_K/W_V [n_heads, d_model, d_head],
b_Q/b_K/b_V [n_heads, d_head], W_O [n_heads, d_head, d_model], b_O, blocks.{i}.ln2.w/.b,
blocks.{i}.mlp.W_in/b_in/W_out/b_out, ln_final.w/.b, unembed.W_U/b_U; buffers such as IGNORE and
mask are dropped) and OUT_DIR/config.json with the HookedTransformerConfig fields listed in
CONFIG_FIELDS. Needs transformer_lens < 4 (HookedTransformer was removed in 4.0). Configurations
the format cannot express are refused with a clear error.
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path

CONFIG_FIELDS = [
    "n_layers", "d_model", "n_ctx", "d_head", "n_heads", "d_mlp", "d_vocab", "d_vocab_out",
    "act_fn", "normalization_type", "attn_only", "positional_embedding_type", "attention_dir",
    "attn_scale", "use_attn_scale", "eps",
]

WEIGHT_NAMES = re.compile(
    r"^(embed\.W_E|pos_embed\.W_pos|ln_final\.[wb]|unembed\.(W_U|b_U)"
    r"|blocks\.\d+\.(ln1\.[wb]|ln2\.[wb]|attn\.(W_[QKVO]|b_[QKVO])|mlp\.(W_in|b_in|W_out|b_out)))$")


def check_supported(cfg):
    """Raise ValueError naming every setting of cfg that the eap format cannot express."""
    def get(name, default=None):
        return getattr(cfg, name, default)

    problems = []
    pos = get("positional_embedding_type", "standard")
    if pos not in ("standard", "shortformer"):
        problems.append(f"positional_embedding_type={pos!r} (rotary/alibi are not supported; "
                        "only 'standard' and 'shortformer')")
    norm = get("normalization_type")
    if norm not in (None, "LN", "LNPre"):
        problems.append(f"normalization_type={norm!r} (RMS/RMSPre are not supported; only "
                        "'LN', 'LNPre' or None)")
    if get("final_rms", False):
        problems.append("final_rms=True (RMS final norm)")
    if get("gated_mlp", False):
        problems.append("gated_mlp=True (gated MLPs are not supported)")
    if get("parallel_attn_mlp", False):
        problems.append("parallel_attn_mlp=True (parallel attention + MLP is not supported)")
    kv = get("n_key_value_heads")
    if kv is not None and kv != get("n_heads"):
        problems.append(f"n_key_value_heads={kv} (grouped-query attention is not supported)")
    if get("use_local_attn", False) or get("attn_types") or get("window_size"):
        problems.append("local attention (use_local_attn/attn_types/window_size) is not supported")
    if not get("attn_only", False) and get("act_fn") not in ("relu", "gelu", "gelu_new"):
        problems.append(f"act_fn={get('act_fn')!r} (only relu, gelu, gelu_new are supported)")
    if get("scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=True is not supported")
    for flag in ("use_qk_norm", "post_embedding_ln", "use_normalization_before_and_after"):
        if get(flag, False):
            problems.append(f"{flag}=True is not supported")
    for cap in ("attn_scores_soft_cap", "output_logits_soft_cap"):
        if (get(cap) or -1.0) > 0:
            problems.append(f"{cap}={get(cap)} (soft-capping is not supported)")
    if (get("num_experts") or 0) > 1:
        problems.append("mixture-of-experts MLPs are not supported")
    if problems:
        raise ValueError("cannot export this model to the eap TransformerLens format:\n  - "
                         + "\n  - ".join(problems))


def config_dict(cfg):
    d = {name: getattr(cfg, name) for name in CONFIG_FIELDS if hasattr(cfg, name)}
    d["d_mlp"] = None if d.get("attn_only") else d.get("d_mlp")
    if d.get("d_vocab_out", -1) in (-1, None):
        d["d_vocab_out"] = d["d_vocab"]
    scale = getattr(cfg, "attn_scale", -1.0)
    d["attn_scale"] = float(math.sqrt(cfg.d_head) if scale is None or scale <= 0 else scale)
    d["use_attn_scale"] = bool(getattr(cfg, "use_attn_scale", True))
    d["eps"] = float(d.get("eps", 1e-5))
    d["attn_only"] = bool(d.get("attn_only", False))
    return d


def export(model, out_dir, dtype=None):
    """Write model (a transformer_lens HookedTransformer) to out_dir. dtype: torch dtype of the
    stored weights (default: the model's own)."""
    from safetensors.torch import save_file

    check_supported(model.cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        if WEIGHT_NAMES.match(name):
            t = t.detach().cpu()
            tensors[name] = (t.to(dtype) if dtype is not None else t).contiguous()
    cfg = config_dict(model.cfg)
    required = ["embed.W_E", "unembed.W_U", "unembed.b_U"]
    if cfg["positional_embedding_type"] in ("standard", "shortformer"):
        required.append("pos_embed.W_pos")
    missing = [n for n in required if n not in tensors]
    if missing:
        raise ValueError(f"state dict lacks {missing}")
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_name", help="a TransformerLens model name, e.g. gpt2 or attn-only-4l")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--no-fold-ln", action="store_true",
                    help="keep LayerNorm weights (default: TransformerLens's from_pretrained "
                         "defaults, which fold them, giving normalization_type LNPre)")
    args = ap.parse_args(argv)
    import torch
    from transformer_lens import HookedTransformer

    kwargs = {"device": "cpu"}
    if args.no_fold_ln:
        kwargs.update(fold_ln=False, center_writing_weights=False, center_unembed=False)
    model = HookedTransformer.from_pretrained(args.model_name, **kwargs)
    try:
        out = export(model, args.out_dir, getattr(torch, args.dtype) if args.dtype else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}/model.safetensors and {out}/config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
