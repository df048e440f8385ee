#!/usr/bin/env python3
"""Optional cross-check of the TransformerLens-format fixtures against TransformerLens itself.

    PYTHON_WITH_TL scripts/validate_transformerlens.py

Needs a Python with transformer_lens < 4 (HookedTransformer was removed in 4.0; 2.18.0 was used),
which make_fixtures.py does not install. For each tests/fixtures/models/tl_* fixture it builds a
HookedTransformer from config.json, loads model.safetensors, and compares (float64) the logits,
every writer activation and every reader gradient with reference.safetensors; then it checks that
scripts/export_transformerlens.export() writes the same tensors and config back.
"""
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_transformerlens import export  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models"


def check(name):
    d = ROOT / name
    cfgd = json.loads((d / "config.json").read_text())
    cfg = HookedTransformerConfig(**cfgd, device="cpu", dtype=torch.float64,
                                  use_split_qkv_input=True, use_attn_result=True,
                                  use_hook_mlp_in=True)
    model = HookedTransformer(cfg)
    stored = load_file(str(d / "model.safetensors"))
    missing, unexpected = model.load_state_dict({k: v.double() for k, v in stored.items()},
                                                strict=False)
    assert not unexpected and all(k.endswith(("IGNORE", "mask")) for k in missing), missing
    ref = load_file(str(d / "reference.safetensors"))
    kept = {}

    def keep(t, hook):
        t.retain_grad()
        kept[hook.name] = t
        return t

    names = lambda n: n.endswith(("q_input", "k_input", "v_input", "hook_mlp_in")) or \
        n == f"blocks.{cfg.n_layers - 1}.hook_resid_post" or n.endswith(
            ("hook_result", "hook_mlp_out", "hook_embed", "hook_pos_embed"))
    logits = model.run_with_hooks(ref["tokens"], fwd_hooks=[(names, keep)])
    ans, wrong = ref["answer"], ref["wrong"]
    idx = torch.arange(len(ans))
    m = (logits[idx, -1, ans] - logits[idx, -1, wrong]).mean()
    m.backward()
    diffs = {"logits": (logits - ref["logits"].double()).abs().max().item(),
             "metric": abs(m.item() - ref["metric"].item())}
    emb = kept["hook_embed"] + (0 if cfg.positional_embedding_type == "shortformer"
                                else kept["hook_pos_embed"])
    worst_act = (emb - ref["act.input"]).abs().max().item()
    worst_grad = 0.0
    for L in range(cfg.n_layers):
        for h in range(cfg.n_heads):
            a = kept[f"blocks.{L}.attn.hook_result"][:, :, h]
            worst_act = max(worst_act, (a - ref[f"act.a{L}.h{h}"]).abs().max().item())
            for letter in "qkv":
                g = kept[f"blocks.{L}.hook_{letter}_input"].grad[:, :, h]
                worst_grad = max(worst_grad,
                                 (g - ref[f"grad.a{L}.h{h}<{letter}>"]).abs().max().item())
        if not cfg.attn_only:
            out = kept[f"blocks.{L}.hook_mlp_out"] - model.blocks[L].mlp.b_out
            worst_act = max(worst_act, (out - ref[f"act.m{L}"]).abs().max().item())
            g = kept[f"blocks.{L}.hook_mlp_in"].grad
            worst_grad = max(worst_grad, (g - ref[f"grad.m{L}"]).abs().max().item())
    g = kept[f"blocks.{cfg.n_layers - 1}.hook_resid_post"].grad
    worst_grad = max(worst_grad, (g - ref["grad.logits"]).abs().max().item())
    diffs.update(acts=worst_act, grads=worst_grad)
    with tempfile.TemporaryDirectory() as tmp:
        export(model, tmp, dtype=next(iter(stored.values())).dtype)
        back = load_file(str(Path(tmp) / "model.safetensors"))
        assert set(back) == set(stored), set(back) ^ set(stored)
        assert all(torch.equal(back[k], stored[k]) for k in stored)
        assert json.loads((Path(tmp) / "config.json").read_text()) == cfgd
    print(name, json.dumps(diffs))
    assert max(diffs.values()) < 1e-5, diffs


for fixture in sorted(p.name for p in ROOT.iterdir() if p.name.startswith("tl_")):
    check(fixture)
print("transformer_lens cross-check passed")
