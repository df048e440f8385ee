#!/usr/bin/env python3
"""Make an InterpBench-format case folder from a small random TransformerLens-shaped model.

Usage (from anywhere):

    python3 scripts/make_interpbench_fixture.py

writes tests/fixtures/interpbench/ (re-running it reproduces every file byte for byte):

    case_gelu_causal/ll_model.pth        torch.save of a TransformerLens-named state dict
    case_gelu_causal/ll_model_cfg.pkl    pickle of HookedTransformerConfig.to_dict()-style dict
    case_gelu_causal/meta.json           training-argument metadata, as InterpBench publishes
    case_gelu_causal/edges.pkl           ground truth: list of (from, to) ACDC hook names
    case_gelu_causal/reference.safetensors  logits, EAP scores ... (make_fixtures.py's layout)
    case_gelu_causal/truth_edges.txt     the truth in eap's edge names, promoted to heads
    case_gelu_causal/truth_edges_letters.txt  the same without head-level promotion
    cfg_object.pkl                       the same config as a pickled HookedTransformerConfig
                                         *object* (a stand-in class with TransformerLens'
                                         module and name), the other form InterpBench uses

The layout follows InterpBench's hub folders (cybershiptrooper/InterpBench/<case>/, written by
FlyingPumba/InterpBench's iit_train.py: `t.save(ll_model.state_dict())`, `pickle.dump(cfg.to_dict())`,
`pickle.dump(circuit_to_edges_list(gt_circuit))`). transformer_lens is not needed: the state
dict is a plain OrderedDict of tensors with TransformerLens names and shapes (plus the `mask` and
`IGNORE` buffers a HookedTransformer's state dict carries), and the reference numbers come from
make_fixtures.py's independent float64 forward (`forward`, `reference`). Like InterpBench's
Tracr-derived cases the model has no LayerNorm, GELU MLPs and d_vocab_out != d_vocab.

To exercise the reader, two things a state dict may hold are used on purpose: `unembed.W_U` is
saved as a transposed (non-contiguous) view, and layer 0's b_Q/b_K/b_V are views into one shared
storage at non-zero offsets. The Rust side must read them exactly.
"""

import collections
import dataclasses
import json
import math
import pickle
import sys
import types
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
VENV = SCRIPTS / ".venv"
sys.path.insert(0, str(SCRIPTS))

if __name__ == "__main__" and Path(sys.prefix).resolve() != VENV.resolve():
    # make_fixtures.py creates scripts/.venv on first use; then re-run this script inside it.
    import os
    import subprocess
    if not (VENV / "bin" / "python").exists():
        subprocess.check_call([sys.executable, str(SCRIPTS / "make_fixtures.py"), "--help"])
    py = str(VENV / "bin" / "python")
    os.execv(py, [py, str(Path(__file__).resolve())] + sys.argv[1:])

import make_fixtures  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from make_fixtures import reference, tl_random_params, writer_names, reader_names  # noqa: E402

OUT = make_fixtures.FIXTURES / "interpbench"
NAME = "case_gelu_causal"
SEED = 401

CFG = dict(n_layers=2, d_model=16, n_ctx=10, d_head=4, n_heads=4, d_mlp=32, d_vocab=7,
           d_vocab_out=5, act_fn="gelu", normalization_type=None, attn_only=False,
           positional_embedding_type="standard", attention_dir="causal",
           attn_scale=math.sqrt(4), use_attn_scale=True, eps=1e-5)


def full_config():
    """The fields HookedTransformerConfig.to_dict() returns (TransformerLens 1.x/2.x), with
    this model's values; the ones eap does not need are there because real files have them."""
    c = dict(CFG)
    c.update(
        model_name="custom", d_vocab_out=CFG["d_vocab_out"], eps=1e-5, use_attn_result=False,
        use_split_qkv_input=False, use_hook_mlp_in=False, use_attn_in=False, use_local_attn=False,
        original_architecture=None, from_checkpoint=False, checkpoint_index=None,
        checkpoint_label_type=None, checkpoint_value=None, tokenizer_name=None, window_size=None,
        attn_types=None, init_mode="gpt2", scale_attn_by_inverse_layer_idx=False,
        final_rms=False, seed=0, initializer_range=0.2, init_weights=True,
        device="cpu", n_devices=1, rotary_dim=None, n_params=None, use_hook_tokens=False,
        gated_mlp=False, default_prepend_bos=True, dtype=torch.float32,
        tokenizer_prepends_bos=None, n_key_value_heads=None, post_embedding_ln=False,
        rotary_base=10000, trust_remote_code=False, rotary_adjacent_pairs=False,
        load_in_4bit=False, num_experts=None, experts_per_token=None,
        relative_attention_max_distance=None, relative_attention_num_buckets=None,
        decoder_start_token_id=None, tie_word_embeddings=False, use_normalization_before_and_after=False,
        attn_scores_soft_cap=-1.0, output_logits_soft_cap=-1.0, use_NTK_by_parts_rope=False,
        NTK_by_parts_low_freq_factor=1.0, NTK_by_parts_high_freq_factor=4.0,
        NTK_by_parts_factor=8.0, parallel_attn_mlp=False)
    return c


# Ground truth in InterpBench's acdc_hooks granularity: head 1 of layer 0 reads the token and
# position embeddings, the MLP of layer 0 reads it and the embedding, head 0 of layer 1 reads the
# MLP, and the logits read head a1.h0 and the MLP. Edges inside a node (q/k/v input -> hook_q ->
# hook_result, mlp_in -> mlp_out) are listed as InterpBench lists them.
ACDC_EDGES = [
    ("hook_embed", "blocks.0.hook_v_input[1]"),
    ("hook_pos_embed", "blocks.0.hook_q_input[1]"),
    ("hook_pos_embed", "blocks.0.hook_k_input[1]"),
    ("blocks.0.hook_q_input[1]", "blocks.0.attn.hook_q[1]"),
    ("blocks.0.hook_k_input[1]", "blocks.0.attn.hook_k[1]"),
    ("blocks.0.hook_v_input[1]", "blocks.0.attn.hook_v[1]"),
    ("blocks.0.attn.hook_q[1]", "blocks.0.attn.hook_result[1]"),
    ("blocks.0.attn.hook_k[1]", "blocks.0.attn.hook_result[1]"),
    ("blocks.0.attn.hook_v[1]", "blocks.0.attn.hook_result[1]"),
    ("blocks.0.attn.hook_result[1]", "blocks.0.hook_mlp_in"),
    ("hook_embed", "blocks.0.hook_mlp_in"),
    ("blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out"),
    ("blocks.0.hook_mlp_out", "blocks.1.hook_v_input[0]"),
    ("blocks.1.hook_v_input[0]", "blocks.1.attn.hook_v[0]"),
    ("blocks.1.attn.hook_v[0]", "blocks.1.attn.hook_result[0]"),
    ("blocks.1.attn.hook_result[0]", "blocks.1.hook_resid_post"),
    ("blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"),
]


def eap_truth(edges, n_layers, promote):
    """The ACDC edges in eap's names, written independently of the Rust mapping."""
    def node(s):
        name, _, idx = s.partition("[")
        head = int(idx.rstrip("]")) if idx else None
        if name in ("hook_embed", "hook_pos_embed"):
            return ("in", None, None, None)
        parts = name.split(".")
        layer, hook = int(parts[1]), ".".join(parts[2:])
        return (hook, layer, head, None)

    out = set()
    for a, b in edges:
        ha, la, ea, _ = node(a)
        hb, lb, eb, _ = node(b)
        if ha == "in":
            w = "input"
        elif ha == "attn.hook_result":
            w = f"a{la}.h{ea}"
        elif ha == "hook_mlp_out":
            w = f"m{la}"
        else:
            continue  # inside a node
        if hb in ("hook_q_input", "hook_k_input", "hook_v_input"):
            letters = "qkv" if promote else hb[5]
            rs = [f"a{lb}.h{eb}<{c}>" for c in letters]
        elif hb == "hook_mlp_in":
            rs = [f"m{lb}"]
        elif hb == "hook_resid_post":
            assert lb == n_layers - 1
            rs = ["logits"]
        else:
            raise ValueError(b)
        out.update(f"{w}->{r}" for r in rs)
    return sorted(out)


def state_dict(p32):
    """TransformerLens-named OrderedDict as HookedTransformer.state_dict() returns it."""
    sd = collections.OrderedDict()
    n_ctx = CFG["n_ctx"]
    for k, v in p32.items():
        sd[k] = v.to(torch.float32).contiguous()
    # Layer 0's q/k/v biases: views of one storage at offsets 0, H*dh, 2*H*dh.
    H, dh = CFG["n_heads"], CFG["d_head"]
    shared = torch.stack([sd[f"blocks.0.attn.b_{m}"] for m in "QKV"]).contiguous()
    for i, m in enumerate("QKV"):
        sd[f"blocks.0.attn.b_{m}"] = shared[i]
        assert sd[f"blocks.0.attn.b_{m}"].storage_offset() == i * H * dh
    # unembed.W_U [d, Vo] saved as the transpose of a contiguous [Vo, d] tensor.
    sd["unembed.W_U"] = sd["unembed.W_U"].t().contiguous().t()
    assert not sd["unembed.W_U"].is_contiguous()
    # The buffers a HookedTransformer's state dict carries (TransformerLens' attention `mask`
    # and `IGNORE`), in TransformerLens' order: they come right after each layer's attention.
    ordered = collections.OrderedDict()
    for k, v in sd.items():
        ordered[k] = v
        if k.endswith("attn.b_O"):
            pre = k[: -len("b_O")]
            ordered[pre + "mask"] = torch.tril(torch.ones(n_ctx, n_ctx, dtype=torch.bool))
            ordered[pre + "IGNORE"] = torch.tensor(-1e5)
    # nn.Module.state_dict() attaches `_metadata`; torch.save pickles it as the OrderedDict's
    # state (a BUILD the reader must skip).
    ordered._metadata = collections.OrderedDict([("", {"version": 1})])
    return ordered


def tl_config_object(cfg):
    """A pickled HookedTransformerConfig object, without transformer_lens: a dataclass whose
    module and name are TransformerLens'."""
    mod_name = "transformer_lens.HookedTransformerConfig"
    pkg = sys.modules.setdefault("transformer_lens", types.ModuleType("transformer_lens"))
    mod = types.ModuleType(mod_name)
    fields = [(k, object, dataclasses.field(default=None)) for k in cfg]
    cls = dataclasses.make_dataclass("HookedTransformerConfig", fields)
    cls.__module__ = mod_name
    mod.HookedTransformerConfig = cls
    sys.modules[mod_name] = mod
    pkg.HookedTransformerConfig = mod
    return pickle.dumps(cls(**cfg), protocol=4)


def main():
    out = OUT / NAME
    out.mkdir(parents=True, exist_ok=True)
    p32 = tl_random_params(CFG, SEED)
    sd = state_dict(p32)
    torch.save(sd, str(out / "ll_model.pth"))
    cfg = full_config()
    (out / "ll_model_cfg.pkl").write_bytes(pickle.dumps(cfg, protocol=4))
    (OUT / "cfg_object.pkl").write_bytes(tl_config_object(cfg))
    (out / "edges.pkl").write_bytes(pickle.dumps(ACDC_EDGES, protocol=4))
    meta = {"case": NAME, "made_by": "scripts/make_interpbench_fixture.py", "seed": SEED,
            "note": "random weights, not trained: the edges are a fixed test circuit",
            "iit_weight": 1.0, "behavior_weight": 1.0, "strict_weight": 0.4}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "truth_edges.txt").write_text(
        "\n".join(eap_truth(ACDC_EDGES, CFG["n_layers"], True)) + "\n")
    (out / "truth_edges_letters.txt").write_text(
        "\n".join(eap_truth(ACDC_EDGES, CFG["n_layers"], False)) + "\n")

    # What torch itself reads back (weights_only: the file is a plain state dict).
    loaded = torch.load(str(out / "ll_model.pth"), weights_only=True)
    assert list(loaded) == list(sd)
    for k in sd:
        assert torch.equal(loaded[k], sd[k]), k
    p64 = {k: v.to(torch.float64) for k, v in loaded.items()
           if not k.endswith(("attn.mask", "attn.IGNORE"))}
    ref, stats = reference(CFG, p64, SEED + 1000)
    save_file(ref, str(out / "reference.safetensors"),
              metadata={"convention": "made by scripts/make_interpbench_fixture.py with "
                                      "make_fixtures.py's reference(); see "
                                      "tests/fixtures/README.md"})
    assert len(writer_names(CFG)) * len(reader_names(CFG)) == ref["eap_scores"].numel()
    sizes = {f.name: f.stat().st_size for f in sorted(out.iterdir())}
    print(NAME, json.dumps(stats), json.dumps(sizes))


if __name__ == "__main__":
    main()
