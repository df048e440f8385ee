#!/usr/bin/env python3
"""Make the reference fixtures that the Rust tests compare against.

Usage (from anywhere):

    python3 scripts/make_fixtures.py

re-creates every fixture under tests/fixtures/ deterministically (fixed seeds, CPU, float64
reference arithmetic). On first use it creates its own virtual environment at scripts/.venv,
installs scripts/requirements.txt into it (torch, transformers, safetensors, numpy; PyPI's Linux
torch wheel pulls in the CUDA libraries too, a few GB, ~2 minutes) and re-runs itself there.

What it writes (see tests/fixtures/README.md for the conventions):

    tests/fixtures/models/<name>/config.json
    tests/fixtures/models/<name>/model.safetensors
    tests/fixtures/models/<name>/reference.safetensors
    tests/fixtures/eapig_graph.json

The reference numbers come from an independent hand-written functional forward in float64
(`forward` below) that follows TransformerLens conventions. For the Hugging Face GPT-2 fixtures the
script asserts that its logits match transformers' GPT2LMHeadModel to < 1e-4; for every fixture it
checks the per-reader gradients against central finite differences.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
VENV = SCRIPTS / ".venv"
FIXTURES = ROOT / "tests" / "fixtures"


def _ensure_venv():
    """Re-exec inside scripts/.venv, creating it and installing requirements if needed."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    try:
        subprocess.check_call(
            [str(py), "-c", "import torch, transformers, safetensors, numpy"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except subprocess.CalledProcessError:
        subprocess.check_call([str(py), "-m", "pip", "install", "-r",
                               str(SCRIPTS / "requirements.txt")])
    os.execv(str(py), [str(py), str(Path(__file__).resolve())] + sys.argv[1:])


if __name__ == "__main__":
    _ensure_venv()

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

torch.set_grad_enabled(True)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

B, P = 3, 7  # examples, tokens per example


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

# TransformerLens configs (HookedTransformerConfig field names).
TL_MODELS = {
    "tl_attn_only_shortformer": dict(
        seed=301, dtype="float32",
        cfg=dict(n_layers=3, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_mlp=None, d_vocab=64,
                 d_vocab_out=64, act_fn=None, normalization_type="LN", attn_only=True,
                 positional_embedding_type="shortformer", attention_dir="causal",
                 attn_scale=math.sqrt(8), use_attn_scale=True, eps=1e-5)),
    "tl_relu_nonorm": dict(
        seed=302, dtype="bfloat16",
        cfg=dict(n_layers=2, d_model=24, n_ctx=16, d_head=8, n_heads=3, d_mlp=64, d_vocab=72,
                 d_vocab_out=72, act_fn="relu", normalization_type=None, attn_only=False,
                 positional_embedding_type="standard", attention_dir="causal",
                 attn_scale=math.sqrt(8), use_attn_scale=True, eps=1e-5)),
    "tl_lnpre_gelu_bidir": dict(
        seed=303, dtype="float32",
        cfg=dict(n_layers=2, d_model=16, n_ctx=16, d_head=8, n_heads=2, d_mlp=64, d_vocab=80,
                 d_vocab_out=50, act_fn="gelu", normalization_type="LNPre", attn_only=False,
                 positional_embedding_type="standard", attention_dir="bidirectional",
                 attn_scale=3.0, use_attn_scale=True, eps=1e-5)),
}

HF_MODELS = {
    # name: (seed, prefix?, hf config kwargs)
    "gpt2_hf": (201, True, dict(vocab_size=96, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                n_inner=64)),
    "gpt2_hf_noprefix": (202, False, dict(vocab_size=60, n_positions=16, n_embd=16, n_layer=3,
                                          n_head=2, n_inner=64)),
}


# --------------------------------------------------------------------------------------------
# Functional forward (TransformerLens conventions), float64
# --------------------------------------------------------------------------------------------

def layer_norm(x, w, b, kind, eps):
    if kind is None:
        return x
    x = x - x.mean(-1, keepdim=True)
    x = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)  # biased variance, eps inside
    if kind == "LN":
        x = x * w + b
    elif kind != "LNPre":
        raise ValueError(f"normalization {kind!r}")
    return x


def activation(x, name):
    if name == "relu":
        return torch.relu(x)  # relu'(0) = 0
    if name == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if name == "gelu_new":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    raise ValueError(f"act_fn {name!r}")


def writer_names(cfg):
    names = ["input"]
    for L in range(cfg["n_layers"]):
        names += [f"a{L}.h{h}" for h in range(cfg["n_heads"])]
        if not cfg["attn_only"]:
            names.append(f"m{L}")
    return names


def reader_names(cfg):
    names = []
    for L in range(cfg["n_layers"]):
        for letter in "qkv":
            names += [f"a{L}.h{h}<{letter}>" for h in range(cfg["n_heads"])]
        if not cfg["attn_only"]:
            names.append(f"m{L}")
    names.append("logits")
    return names


def _time_w(name):
    if name == "input":
        return 0
    L = int(name[1:].split(".")[0])
    return 2 * L + 1 if name.startswith("a") else 2 * L + 2


def _time_r(name):
    if name == "logits":
        return 10 ** 9
    L = int(name[1:].split(".")[0].split("<")[0])
    return 2 * L + 1 if name.startswith("a") else 2 * L + 2


def edge_mask(cfg):
    ws, rs = writer_names(cfg), reader_names(cfg)
    return torch.tensor([[_time_w(w) < _time_r(r) for r in rs] for w in ws])


def forward(cfg, p, tokens, track=False, perturb=None, override=None):
    """Run the model. p: TransformerLens-named float64 params.

    Returns (logits, acts, deltas). acts[writer] is [B,P,d]. With track=True every reader input
    gets its own zero tensor (requires grad) added: deltas[reader] is that tensor (or a view of a
    per-layer tensor). perturb maps a reader name to a [B,P,d] tensor added to that reader's input
    (for finite differences). override maps `input`, `a{L}` ([B,P,H,d], every head of the layer)
    or `m{L}` to constant outputs that replace that sublayer's (EAP-IG-activations' hooks).
    """
    override = override or {}
    n_b, n_p = tokens.shape
    d, H, dh = cfg["d_model"], cfg["n_heads"], cfg["d_head"]
    norm, eps = cfg["normalization_type"], cfg["eps"]
    scale = cfg["attn_scale"] if cfg["use_attn_scale"] else 1.0
    perturb = perturb or {}
    dt = p["embed.W_E"].dtype

    def zero(*shape):
        return torch.zeros(*shape, dtype=dt, requires_grad=track)

    pos = p["pos_embed.W_pos"][:n_p]
    short = cfg["positional_embedding_type"] == "shortformer"
    resid = p["embed.W_E"][tokens] + (0 if short else pos)
    if "input" in override:
        resid = override["input"]
    acts = {"input": resid}
    deltas = {}
    for L in range(cfg["n_layers"]):
        pre = f"blocks.{L}."
        xs = {}
        for letter in "qkv":
            dlt = zero(n_b, n_p, H, d)
            extra = torch.stack([perturb.get(f"a{L}.h{h}<{letter}>", torch.zeros(n_b, n_p, d,
                                 dtype=dt)) for h in range(H)], dim=2)
            for h in range(H):
                deltas[f"a{L}.h{h}<{letter}>"] = (dlt, h)
            x = resid[:, :, None, :] + dlt + extra
            xs[letter] = layer_norm(x, p.get(pre + "ln1.w"), p.get(pre + "ln1.b"), norm, eps)
            if short and letter in "qk":
                # TransformerLens: query/key input = ln1(resid) + W_pos, added AFTER ln1.
                xs[letter] = xs[letter] + pos[None, :, None, :]
        q = torch.einsum("bphd,hde->bphe", xs["q"], p[pre + "attn.W_Q"]) + p[pre + "attn.b_Q"]
        k = torch.einsum("bphd,hde->bphe", xs["k"], p[pre + "attn.W_K"]) + p[pre + "attn.b_K"]
        v = torch.einsum("bphd,hde->bphe", xs["v"], p[pre + "attn.W_V"]) + p[pre + "attn.b_V"]
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / scale
        if cfg["attention_dir"] == "causal":
            mask = torch.ones(n_p, n_p, dtype=torch.bool).triu(1)  # key > query
            scores = scores.masked_fill(mask, float("-inf"))
        elif cfg["attention_dir"] != "bidirectional":
            raise ValueError(cfg["attention_dir"])
        pattern = torch.softmax(scores, dim=-1)
        z = torch.einsum("bhqk,bkhe->bqhe", pattern, v)
        head_out = torch.einsum("bqhe,hed->bqhd", z, p[pre + "attn.W_O"])
        if f"a{L}" in override:
            head_out = override[f"a{L}"]
        for h in range(H):
            acts[f"a{L}.h{h}"] = head_out[:, :, h]
        resid = resid + head_out.sum(2) + p[pre + "attn.b_O"]
        if not cfg["attn_only"]:
            dlt = zero(n_b, n_p, d)
            deltas[f"m{L}"] = (dlt, None)
            x = resid + dlt + perturb.get(f"m{L}", 0)
            x = layer_norm(x, p.get(pre + "ln2.w"), p.get(pre + "ln2.b"), norm, eps)
            hidden = activation(x @ p[pre + "mlp.W_in"] + p[pre + "mlp.b_in"], cfg["act_fn"])
            out = hidden @ p[pre + "mlp.W_out"]
            if f"m{L}" in override:
                out = override[f"m{L}"]
            acts[f"m{L}"] = out
            resid = resid + out + p[pre + "mlp.b_out"]
    dlt = zero(n_b, n_p, d)
    deltas["logits"] = (dlt, None)
    x = layer_norm(resid + dlt + perturb.get("logits", 0), p.get("ln_final.w"),
                   p.get("ln_final.b"), norm, eps)
    logits = x @ p["unembed.W_U"] + p["unembed.b_U"]
    return logits, acts, deltas


def metric(logits, answer, wrong):
    last = logits[:, -1, :]
    idx = torch.arange(logits.shape[0])
    return (last[idx, answer] - last[idx, wrong]).mean()


def make_inputs(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg["d_vocab"], (B, P), generator=g)
    while True:
        corrupted = torch.randint(0, cfg["d_vocab"], (B, P), generator=g)
        if (corrupted != tokens).any(dim=1).all():
            break
    answer = torch.randint(0, cfg["d_vocab_out"], (B,), generator=g)
    wrong = (answer + torch.randint(1, cfg["d_vocab_out"], (B,), generator=g)) % cfg["d_vocab_out"]
    assert (answer != wrong).all()
    return tokens, corrupted, answer, wrong


def reference(cfg, p64, seed):
    """Compute every reference tensor; returns dict name -> tensor (float32 / int64)."""
    tokens, corrupted, answer, wrong = make_inputs(cfg, seed)
    logits, acts, deltas = forward(cfg, p64, tokens, track=True)
    m = metric(logits, answer, wrong)
    m.backward()
    grads = {}
    for r, (dlt, h) in deltas.items():
        grads[r] = (dlt.grad[:, :, h] if h is not None else dlt.grad).detach()
    with torch.no_grad():
        c_logits, c_acts, _ = forward(cfg, p64, corrupted)
    ws, rs = writer_names(cfg), reader_names(cfg)
    assert set(ws) == set(acts) and set(rs) == set(grads)
    mask = edge_mask(cfg)
    G = torch.stack([grads[r] for r in rs])  # [R,B,P,d]
    A = torch.stack([acts[w].detach() for w in ws])
    C = torch.stack([c_acts[w] for w in ws])
    scores = torch.einsum("wbpd,rbpd->wr", C - A, G) * mask
    scores_zero = torch.einsum("wbpd,rbpd->wr", -A, G) * mask

    # Validate gradients by central finite differences (float64) on random directions.
    gen = torch.Generator().manual_seed(seed + 7)
    eps_fd = 1e-5
    worst = 0.0
    with torch.no_grad():
        for r in rs:
            u = torch.randn(B, P, cfg["d_model"], generator=gen, dtype=torch.float64)
            mp = metric(forward(cfg, p64, tokens, perturb={r: eps_fd * u})[0], answer, wrong)
            mm = metric(forward(cfg, p64, tokens, perturb={r: -eps_fd * u})[0], answer, wrong)
            fd = (mp - mm) / (2 * eps_fd)
            an = (grads[r] * u).sum()
            err = abs(fd - an).item() / max(1.0, abs(an).item())
            worst = max(worst, err)
    assert worst < 1e-6, f"finite-difference check failed: {worst}"

    out = {
        "tokens": tokens, "corrupted_tokens": corrupted, "answer": answer, "wrong": wrong,
        "logits": logits.detach(), "corrupted_logits": c_logits,
        "metric": m.detach().reshape(1),
        "eap_scores": scores, "eap_scores_zero": scores_zero,
    }
    for r in rs:
        out[f"grad.{r}"] = grads[r]
    for w in ws:
        out[f"act.{w}"] = acts[w].detach()
        out[f"corrupted_act.{w}"] = c_acts[w]
    out = {k: (v.to(torch.float32) if v.is_floating_point() else v.to(torch.int64)).contiguous()
           for k, v in out.items()}
    stats = dict(fd_rel_err=worst, metric=m.item(),
                 n_edges=int(mask.sum()), max_abs_score=scores.abs().max().item())
    return out, stats


# --------------------------------------------------------------------------------------------
# Random weights
# --------------------------------------------------------------------------------------------

def tl_random_params(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    d, H, dh, V, Vo = (cfg["d_model"], cfg["n_heads"], cfg["d_head"], cfg["d_vocab"],
                       cfg["d_vocab_out"])

    def rn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def gain(*shape):
        return 1.0 + 0.3 * torch.randn(*shape, generator=g)

    p = {"embed.W_E": rn(V, d, std=0.8), "pos_embed.W_pos": rn(cfg["n_ctx"], d, std=0.5)}
    ln = cfg["normalization_type"] == "LN"
    for L in range(cfg["n_layers"]):
        pre = f"blocks.{L}."
        if ln:
            p[pre + "ln1.w"], p[pre + "ln1.b"] = gain(d), rn(d, std=0.1)
        for m in "QKV":
            p[pre + f"attn.W_{m}"] = rn(H, d, dh, std=1 / math.sqrt(d))
            p[pre + f"attn.b_{m}"] = rn(H, dh, std=0.1)
        p[pre + "attn.W_O"] = rn(H, dh, d, std=1 / math.sqrt(H * dh))
        p[pre + "attn.b_O"] = rn(d, std=0.1)
        if not cfg["attn_only"]:
            if ln:
                p[pre + "ln2.w"], p[pre + "ln2.b"] = gain(d), rn(d, std=0.1)
            p[pre + "mlp.W_in"] = rn(d, cfg["d_mlp"], std=1 / math.sqrt(d))
            p[pre + "mlp.b_in"] = rn(cfg["d_mlp"], std=0.1)
            p[pre + "mlp.W_out"] = rn(cfg["d_mlp"], d, std=1 / math.sqrt(cfg["d_mlp"]))
            p[pre + "mlp.b_out"] = rn(d, std=0.1)
    if ln:
        p["ln_final.w"], p["ln_final.b"] = gain(d), rn(d, std=0.1)
    p["unembed.W_U"] = rn(d, Vo, std=1 / math.sqrt(d))
    p["unembed.b_U"] = rn(Vo, std=0.1)
    return p


def hf_randomize(model, seed):
    """Seeded non-trivial weights for a transformers GPT-2 model (Conv1D: weight [in, out])."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in sorted(model.named_parameters()):
            if ".ln_" in name or name.startswith(("ln_f", "transformer.ln_f")):
                if name.endswith("weight"):
                    prm.copy_(1.0 + 0.3 * torch.randn(prm.shape, generator=g))
                else:
                    prm.copy_(0.1 * torch.randn(prm.shape, generator=g))
            elif name.endswith("bias"):
                prm.copy_(0.1 * torch.randn(prm.shape, generator=g))
            elif name.endswith("wte.weight"):
                prm.copy_(0.8 * torch.randn(prm.shape, generator=g))
            elif name.endswith("wpe.weight"):
                prm.copy_(0.5 * torch.randn(prm.shape, generator=g))
            else:
                prm.copy_(torch.randn(prm.shape, generator=g) / math.sqrt(prm.shape[0]))


def hf_to_tl(sd, hcfg):
    """Hand conversion of a GPT-2 (Conv1D) state dict to TransformerLens names, float64."""
    sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v.to(torch.float64)
          for k, v in sd.items()}
    d, H = hcfg.n_embd, hcfg.n_head
    dh = d // H
    p = {"embed.W_E": sd["wte.weight"], "pos_embed.W_pos": sd["wpe.weight"]}
    for L in range(hcfg.n_layer):
        h, pre = f"h.{L}.", f"blocks.{L}."
        p[pre + "ln1.w"], p[pre + "ln1.b"] = sd[h + "ln_1.weight"], sd[h + "ln_1.bias"]
        p[pre + "ln2.w"], p[pre + "ln2.b"] = sd[h + "ln_2.weight"], sd[h + "ln_2.bias"]
        W, bias = sd[h + "attn.c_attn.weight"], sd[h + "attn.c_attn.bias"]
        for i, m in enumerate("QKV"):
            p[pre + f"attn.W_{m}"] = W[:, i * d:(i + 1) * d].reshape(d, H, dh).permute(1, 0, 2)
            p[pre + f"attn.b_{m}"] = bias[i * d:(i + 1) * d].reshape(H, dh)
        p[pre + "attn.W_O"] = sd[h + "attn.c_proj.weight"].reshape(H, dh, d)
        p[pre + "attn.b_O"] = sd[h + "attn.c_proj.bias"]
        p[pre + "mlp.W_in"], p[pre + "mlp.b_in"] = sd[h + "mlp.c_fc.weight"], sd[h + "mlp.c_fc.bias"]
        p[pre + "mlp.W_out"] = sd[h + "mlp.c_proj.weight"]
        p[pre + "mlp.b_out"] = sd[h + "mlp.c_proj.bias"]
    p["ln_final.w"], p["ln_final.b"] = sd["ln_f.weight"], sd["ln_f.bias"]
    p["unembed.W_U"] = sd["wte.weight"].T.contiguous()
    p["unembed.b_U"] = torch.zeros(sd["wte.weight"].shape[0], dtype=torch.float64)
    cfg = dict(n_layers=hcfg.n_layer, d_model=d, n_ctx=hcfg.n_positions, d_head=dh, n_heads=H,
               d_mlp=sd["h.0.mlp.c_fc.weight"].shape[1], d_vocab=hcfg.vocab_size,
               d_vocab_out=hcfg.vocab_size, act_fn=hcfg.activation_function,
               normalization_type="LN", attn_only=False, positional_embedding_type="standard",
               attention_dir="causal", attn_scale=math.sqrt(dh), use_attn_scale=True,
               eps=hcfg.layer_norm_epsilon)
    return p, cfg


# --------------------------------------------------------------------------------------------
# Fixture writers
# --------------------------------------------------------------------------------------------

def write_reference(out_dir, ref):
    # One metadata key only: safetensors writes its metadata map in hash order, so several keys
    # would make the bytes differ between runs.
    save_file(ref, str(out_dir / "reference.safetensors"),
              metadata={"convention": "made by scripts/make_fixtures.py; score[u,v] = "
                                      "sum_{b,p} (a_u(corrupt) - a_u(clean)) . dM/d in_v "
                                      "(clean run), M = mean over b of logit diff at last pos"})


def make_tl(name, spec):
    cfg, seed = spec["cfg"], spec["seed"]
    out_dir = FIXTURES / "models" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    p32 = tl_random_params(cfg, seed)
    store_dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    stored = {k: v.to(store_dtype).contiguous() for k, v in p32.items()}
    save_file(stored, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    # Reference from exactly the stored values (bf16 rounding included), upcast.
    p64 = {k: v.to(torch.float64) for k, v in load_file(str(out_dir / "model.safetensors")).items()}
    ref, stats = reference(cfg, p64, seed + 1000)
    write_reference(out_dir, ref)
    return cfg, ref, stats


def make_hf(name, seed, prefix, kwargs):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model
    out_dir = FIXTURES / "models" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    hcfg = GPT2Config(activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **kwargs)
    torch.manual_seed(seed)
    model = (GPT2LMHeadModel if prefix else GPT2Model)(hcfg).eval()
    hf_randomize(model, seed)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    for extra in ("generation_config.json",):
        if (out_dir / extra).exists():
            (out_dir / extra).unlink()
    sd = load_file(str(out_dir / "model.safetensors"))
    has_prefix = all(k.startswith("transformer.") for k in sd)
    assert has_prefix == prefix, sorted(sd)[:5]
    assert not any(k.startswith("lm_head") for k in sd), "tied lm_head should not be saved"
    saved_cfg = json.loads((out_dir / "config.json").read_text())
    assert saved_cfg["model_type"] == "gpt2"
    p64, cfg = hf_to_tl(sd, hcfg)
    ref, stats = reference(cfg, p64, seed + 1000)
    # Validate the hand-written forward against transformers (float32, eager attention).
    lm = GPT2LMHeadModel.from_pretrained(str(out_dir), attn_implementation="eager").eval()
    assert lm.lm_head.weight.data_ptr() == lm.transformer.wte.weight.data_ptr() or torch.equal(
        lm.lm_head.weight, lm.transformer.wte.weight)
    with torch.no_grad():
        diffs = []
        for toks, key in ((ref["tokens"], "logits"), (ref["corrupted_tokens"], "corrupted_logits")):
            hf_logits = lm(toks).logits
            diffs.append((hf_logits - ref[key]).abs().max().item())
    max_diff = max(diffs)
    assert max_diff < 1e-4, f"{name}: max |logits - transformers| = {max_diff}"
    stats["max_abs_diff_vs_transformers"] = max_diff
    write_reference(out_dir, ref)
    return cfg, ref, stats


# --------------------------------------------------------------------------------------------
# EAP-IG circuit file (Graph.to_json layout)
# --------------------------------------------------------------------------------------------

def eapig_graph(cfg, scores, top_n=20):
    """EAP-IG Graph.to_json layout for an attention-only model.

    Edges: in_graph = the top_n real edges by |score| (ties broken by EAP-IG's matrix order),
    no pruning. Nodes: in_graph when an endpoint of an in-graph edge (a reader <q>/<k>/<v>
    belongs to its head); 'logits' is always in_graph, as in EAP-IG. Node and edge insertion order
    follow EAP-IG's Graph.from_model (MLP nodes omitted: the model is attention-only, so EAP-IG's
    m{L} nodes would carry nothing). cfg holds the keys EAP-IG's from_model records."""
    ws, rs = writer_names(cfg), reader_names(cfg)
    mask = edge_mask(cfg)
    wi, ri = {w: i for i, w in enumerate(ws)}, {r: i for i, r in enumerate(rs)}
    H, nl = cfg["n_heads"], cfg["n_layers"]
    edges = []  # (name, parent, reader)
    stream = ["input"]
    for L in range(nl):
        heads = [f"a{L}.h{h}" for h in range(H)]
        for node in stream:
            for hd in heads:
                for letter in "qkv":
                    edges.append((f"{node}->{hd}<{letter}>", node, f"{hd}<{letter}>"))
        stream += heads
    for node in stream:
        edges.append((f"{node}->logits", node, "logits"))
    assert len(edges) == int(mask.sum())
    in_graph = torch.zeros_like(mask)
    flat = scores.abs().masked_fill(~mask, float("-inf")).flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    in_graph.view(-1)[order[:top_n]] = True
    nodes_in = set()
    for name, parent, reader in edges:
        if in_graph[wi[parent], ri[reader]]:
            nodes_in.add(parent)
            nodes_in.add(reader.split("<")[0])
    nodes = {w: {"in_graph": w in nodes_in} for w in ws}
    nodes["logits"] = {"in_graph": True}
    edge_dict = {}
    for name, parent, reader in edges:
        i, j = wi[parent], ri[reader]
        edge_dict[name] = {"score": float(scores[i, j]), "in_graph": bool(in_graph[i, j])}
    d = {"cfg": {"n_layers": nl, "n_heads": H, "parallel_attn_mlp": False,
                 "d_model": cfg["d_model"]},
         "nodes": nodes, "edges": edge_dict}
    return d, int(in_graph.sum())


def main():
    (FIXTURES / "models").mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, (seed, prefix, kwargs) in HF_MODELS.items():
        _, ref, stats = make_hf(name, seed, prefix, kwargs)
        summary[name] = stats
    refs = {}
    for name, spec in TL_MODELS.items():
        cfg, ref, stats = make_tl(name, spec)
        refs[name] = (cfg, ref)
        summary[name] = stats
    cfg, ref = refs["tl_attn_only_shortformer"]
    graph, n_in = eapig_graph(cfg, ref["eap_scores"])
    (FIXTURES / "eapig_graph.json").write_text(json.dumps(graph) + "\n")
    summary["eapig_graph.json"] = {"edges": len(graph["edges"]), "edges_in_graph": n_in}
    for k, v in summary.items():
        print(k, json.dumps(v))


if __name__ == "__main__":
    main()
