#!/usr/bin/env python3
"""Make the reference fixtures for the Llama-family architectures (llama, mistral, qwen2,
gpt_neox, gemma2) that the Rust tests compare against.

Usage (from anywhere):

    python3 scripts/make_family_fixtures.py

re-creates, deterministically (fixed seeds, CPU, float64 reference arithmetic):

    tests/fixtures/models/llama_gqa/        LlamaForCausalLM, GQA 4q/2kv, llama3 rope scaling,
                                            hub spelling (rope_theta + rope_scaling)
    tests/fixtures/models/mistral_sharded/  MistralForCausalLM, 4q/1kv, head_dim 12, bfloat16,
                                            sharded (model.safetensors.index.json), rope_parameters
    tests/fixtures/models/qwen2_bias/       Qwen2ForCausalLM, q/k/v biases, tied, float16,
                                            tokenizer.json + data.jsonl
    tests/fixtures/models/neox_parallel/    GPTNeoXForCausalLM (Pythia), rotary_pct 0.25,
                                            parallel attention+MLP, LayerNorm, untied embed_out
    tests/fixtures/models/gemma2_full/      Gemma2ForCausalLM, 3 layers, soft-caps, sliding window
                                            4, query_pre_attn_scalar 24, (1+w) RMSNorm, bfloat16

each with the files `save_pretrained` writes (config.json, *.safetensors) and reference.safetensors
(the keys of tests/fixtures/README.md; gemma2_full also has `patch_all_gap`). It also checks the
config-only fixtures tests/fixtures/configs/*.json (hub config.json files) against their published
shapes and asserts their EAP-IG edge counts.

The reference numbers come from an independent hand-written functional forward in float64
(`forward` below) that reads config.json itself (both rotary spellings). For every fixture the
script asserts that its logits match transformers' model (float32, eager attention) to < 1e-4,
that every per-reader gradient matches central finite differences (relative error < 1e-6), and,
for all but Gemma-2, that patching every edge reproduces the corrupted run (< 1e-9). Like
make_fixtures.py it creates scripts/.venv from scripts/requirements.txt on first use.
"""

import hashlib
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
            [str(py), "-c", "import torch, transformers, safetensors, numpy, tokenizers"],
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
F64 = torch.float64


# --------------------------------------------------------------------------------------------
# Fixture specifications
# --------------------------------------------------------------------------------------------

LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=128)

SPECS = {
    # spelling: how config.json is left on disk. "hub": the older keys the hub's checkpoints use
    # (rope_theta / rope_scaling / rotary_pct / rotary_emb_base, torch_dtype, no layer_types);
    # "new": exactly what transformers 5 writes (rope_parameters, dtype, layer_types).
    "llama_gqa": dict(
        seed=401, cls="LlamaConfig", dtype="float32", shard=None, spelling="hub",
        cfg=dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, max_position_embeddings=256, rope_theta=10000.0,
                 rope_scaling=dict(LLAMA3_SCALING), bos_token_id=1, eos_token_id=2)),
    "mistral_sharded": dict(
        seed=402, cls="MistralConfig", dtype="bfloat16", shard="16KB", spelling="new",
        cfg=dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=12, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, max_position_embeddings=256, sliding_window=None,
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                 bos_token_id=1, eos_token_id=2)),
    "qwen2_bias": dict(
        seed=403, cls="Qwen2Config", dtype="float16", shard=None, spelling="hub",
        cfg=dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, max_position_embeddings=256, rope_theta=10000.0,
                 use_sliding_window=False, bos_token_id=None, eos_token_id=None)),
    "neox_parallel": dict(
        seed=404, cls="GPTNeoXConfig", dtype="float32", shard=None, spelling="hub",
        cfg=dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, rotary_pct=0.25, rotary_emb_base=10000,
                 use_parallel_residual=True, hidden_act="gelu", layer_norm_eps=1e-5,
                 tie_word_embeddings=False, max_position_embeddings=256,
                 bos_token_id=0, eos_token_id=0)),
    "gemma2_full": dict(
        seed=405, cls="Gemma2Config", dtype="bfloat16", shard=None, spelling="new",
        qk_gain=1.3,  # larger q/k weights so the attention soft-cap bites
        cfg=dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                 final_logit_softcapping=3.0, sliding_window=4,
                 hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                 tie_word_embeddings=True, max_position_embeddings=256,
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                 pad_token_id=0, bos_token_id=2, eos_token_id=1)),
}

# Qwen2's config.json gets sliding_window 4 with use_sliding_window false: the window must be
# ignored (transformers does), so a loader that slides anyway fails this fixture.
QWEN2_IGNORED_WINDOW = 4

# Word-level tokenizer for qwen2_bias (ids < vocab_size). Whitespace pre-tokenizer: the text is
# split on whitespace, which is dropped, so "Paris" and " Paris" are the same single token.
TOKENIZER_WORDS = ["[UNK]", "[PAD]", "the", "capital", "city", "of", "France", "Italy", "is",
                   "called", "Paris", "Rome", "after", "Mary", "and", "John", "ate", "thanked",
                   "red", "green", "blue", "a", "to", "gave", "went", "home", ".", ","]
PROMPTS = [
    dict(clean="the capital city of France is called", corrupted="the capital city of Italy is called",
         answer="Paris", wrong="Rome"),
    dict(clean="after Mary and John ate John thanked", corrupted="after Mary and John ate Mary thanked",
         answer="Mary", wrong="John"),
    dict(clean="red green blue red green blue red", corrupted="red blue green red blue green red",
         answer="green", wrong="blue"),
]


# --------------------------------------------------------------------------------------------
# Architecture from config.json (independent of transformers' config classes)
# --------------------------------------------------------------------------------------------

def parse_arch(cfg):
    """Everything the functional forward needs, read from a config.json dict in either spelling."""
    mt = cfg["model_type"]
    assert mt in ("llama", "mistral", "qwen2", "gpt_neox", "gemma2"), mt
    d, H, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    kv = cfg.get("num_key_value_heads") or H
    dh = cfg.get("head_dim") or d // H
    rp = cfg.get("rope_parameters")
    if rp:  # newer transformers spelling
        theta = float(rp["rope_theta"])
        scaling = rp if rp.get("rope_type", "default") != "default" else None
        partial = float(rp.get("partial_rotary_factor", 1.0))
    else:  # hub spelling
        theta = float(cfg.get("rope_theta", cfg.get("rotary_emb_base", 10000.0)))
        scaling = cfg.get("rope_scaling")
        partial = float(cfg.get("rotary_pct", cfg.get("partial_rotary_factor",
                                                         0.25 if mt == "gpt_neox" else 1.0)))
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        assert kind == "llama3", f"rope scaling {kind!r} not modelled"
        scaling = {k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                           "original_max_position_embeddings")}
    # Which layers use sliding-window attention, and the window.
    if mt == "gemma2":
        types = cfg.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                           for i in range(L)]
        window = cfg.get("sliding_window")
    elif mt == "qwen2":
        use = cfg.get("use_sliding_window", False)
        window = cfg.get("sliding_window") if use else None
        types = cfg.get("layer_types") or [
            "sliding_attention" if window is not None and i >= cfg.get("max_window_layers", 28)
            else "full_attention" for i in range(L)]
    elif mt == "mistral":
        window = cfg.get("sliding_window")
        types = ["sliding_attention" if window is not None else "full_attention"] * L
    else:
        window, types = None, ["full_attention"] * L
    sliding = [t == "sliding_attention" and window is not None for t in types]
    gemma = mt == "gemma2"
    return dict(
        model_type=mt, n_layers=L, d=d, n_heads=H, n_kv=kv, dh=dh,
        d_mlp=cfg["intermediate_size"], vocab=cfg["vocab_size"],
        theta=theta, rot_dim=int(dh * partial), llama3=scaling,
        norm="ln" if mt == "gpt_neox" else ("rms1p" if gemma else "rms"),
        eps=cfg["layer_norm_eps"] if mt == "gpt_neox" else cfg["rms_norm_eps"],
        mlp="gelu" if mt == "gpt_neox" else ("geglu_tanh" if gemma else "swiglu"),
        parallel=mt == "gpt_neox" and cfg.get("use_parallel_residual", True),
        attn_scale=(cfg["query_pre_attn_scalar"] ** -0.5) if gemma else dh ** -0.5,
        attn_softcap=cfg.get("attn_logit_softcapping") if gemma else None,
        final_softcap=cfg.get("final_logit_softcapping") if gemma else None,
        embed_scale=math.sqrt(d) if gemma else 1.0,
        tied=cfg.get("tie_word_embeddings", mt == "gemma2"),
        sliding=sliding, window=window)


def unified_params(arch, sd):
    """HF state dict (float64) -> per-layer tensors in one layout:
    Wq [H,dh,d], bq [H,dh], Wk/Wv [KV,dh,d], bk/bv [KV,dh], Wo [H,d,dh] (head h's slice of o_proj),
    bo [d] (or 0), norm weights/biases, MLP matrices as nn.Linear [out,in]."""
    H, KV, dh, d = arch["n_heads"], arch["n_kv"], arch["dh"], arch["d"]
    layers = []
    if arch["model_type"] == "gpt_neox":
        emb = sd["gpt_neox.embed_in.weight"]
        unemb = sd["embed_out.weight"] if "embed_out.weight" in sd else sd["lm_head.weight"]
        final = (sd["gpt_neox.final_layer_norm.weight"], sd["gpt_neox.final_layer_norm.bias"])
        for L in range(arch["n_layers"]):
            pre = f"gpt_neox.layers.{L}."
            W = sd[pre + "attention.query_key_value.weight"].reshape(H, 3, dh, d)
            bqkv = sd[pre + "attention.query_key_value.bias"].reshape(H, 3, dh)
            Wo = sd[pre + "attention.dense.weight"]
            layers.append(dict(
                Wq=W[:, 0], Wk=W[:, 1], Wv=W[:, 2], bq=bqkv[:, 0], bk=bqkv[:, 1], bv=bqkv[:, 2],
                Wo=Wo.reshape(d, H, dh).permute(1, 0, 2), bo=sd[pre + "attention.dense.bias"],
                n1=(sd[pre + "input_layernorm.weight"], sd[pre + "input_layernorm.bias"]),
                n2=(sd[pre + "post_attention_layernorm.weight"],
                    sd[pre + "post_attention_layernorm.bias"]),
                W_in=sd[pre + "mlp.dense_h_to_4h.weight"], b_in=sd[pre + "mlp.dense_h_to_4h.bias"],
                W_out=sd[pre + "mlp.dense_4h_to_h.weight"],
                b_out=sd[pre + "mlp.dense_4h_to_h.bias"]))
    else:
        emb = sd["model.embed_tokens.weight"]
        unemb = emb if arch["tied"] else sd["lm_head.weight"]
        if arch["tied"]:
            assert "lm_head.weight" not in sd, "tied lm_head should not be stored"
        final = (sd["model.norm.weight"], None)
        for L in range(arch["n_layers"]):
            pre = f"model.layers.{L}."

            def get(name, shape, default_zero=True):
                if pre + name in sd:
                    return sd[pre + name].reshape(shape)
                assert default_zero, pre + name
                return torch.zeros(shape, dtype=F64)
            lay = dict(
                Wq=get("self_attn.q_proj.weight", (H, dh, d), False),
                Wk=get("self_attn.k_proj.weight", (KV, dh, d), False),
                Wv=get("self_attn.v_proj.weight", (KV, dh, d), False),
                bq=get("self_attn.q_proj.bias", (H, dh)), bk=get("self_attn.k_proj.bias", (KV, dh)),
                bv=get("self_attn.v_proj.bias", (KV, dh)),
                Wo=sd[pre + "self_attn.o_proj.weight"].reshape(d, H, dh).permute(1, 0, 2),
                bo=get("self_attn.o_proj.bias", (d,)),
                n1=(sd[pre + "input_layernorm.weight"], None),
                W_gate=sd[pre + "mlp.gate_proj.weight"], W_up=sd[pre + "mlp.up_proj.weight"],
                W_down=sd[pre + "mlp.down_proj.weight"])
            if arch["model_type"] == "gemma2":
                lay["post_attn"] = (sd[pre + "post_attention_layernorm.weight"], None)
                lay["n2"] = (sd[pre + "pre_feedforward_layernorm.weight"], None)
                lay["post_ff"] = (sd[pre + "post_feedforward_layernorm.weight"], None)
            else:
                lay["n2"] = (sd[pre + "post_attention_layernorm.weight"], None)
            layers.append(lay)
    return dict(emb=emb, unemb=unemb, final=final, layers=layers)


# --------------------------------------------------------------------------------------------
# Functional forward, float64
# --------------------------------------------------------------------------------------------

def norm(arch, x, wb):
    w, b = wb
    eps = arch["eps"]
    if arch["norm"] == "ln":  # biased variance, eps inside the square root
        x = x - x.mean(-1, keepdim=True)
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w + b
    x = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)  # as HF: x * rsqrt(mean(x^2)+eps)
    return x * (1.0 + w) if arch["norm"] == "rms1p" else x * w


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def inv_freq(arch):
    """Rotary inverse frequencies (float64), llama3 frequency scaling as Llama 3.1 defines it."""
    dim = arch["rot_dim"]
    inv = 1.0 / (arch["theta"] ** (torch.arange(0, dim, 2, dtype=F64) / dim))
    s = arch["llama3"]
    if s is None:
        return inv
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old / lo, old / hi
    out = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, out)


def rotary(arch, x, cos, sin):
    """HF layout: rotate_half on the first rot_dim dims (halves, not interleaved pairs)."""
    r = arch["rot_dim"]
    xr, xp = x[..., :r], x[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
    rot = torch.cat((-x2, x1), dim=-1)
    return torch.cat((xr * cos + rot * sin, xp), dim=-1)


def writer_names(arch):
    names = ["input"]
    for L in range(arch["n_layers"]):
        names += [f"a{L}.h{h}" for h in range(arch["n_heads"])] + [f"m{L}"]
    return names


def reader_names(arch):
    names = []
    for L in range(arch["n_layers"]):
        for letter in "qkv":
            names += [f"a{L}.h{h}<{letter}>" for h in range(arch["n_heads"])]
        names.append(f"m{L}")
    return names + ["logits"]


def edge_mask(arch):
    """u -> v iff u is written before v reads. Parallel attention+MLP: m{L} reads the residual
    stream entering layer L, at the same time as layer L's heads."""
    def t_w(name):
        if name == "input":
            return 0
        L = int(name[1:].split(".")[0])
        return 2 * L + 1 if name[0] == "a" else 2 * L + 2

    def t_r(name):
        if name == "logits":
            return 10 ** 9
        L = int(name[1:].split(".")[0].split("<")[0])
        return 2 * L + 1 if (name[0] == "a" or arch["parallel"]) else 2 * L + 2
    ws, rs = writer_names(arch), reader_names(arch)
    return torch.tensor([[t_w(w) < t_r(r) for r in rs] for w in ws])


def forward(arch, p, tokens, track=False, perturb=None, replace=None, stats=None):
    """Run the model on `tokens`. Returns (logits, acts, deltas, inputs).

    acts[writer]: [B,P,d]. inputs[reader]: the reader's input (residual stream before the norm it
    applies). track=True gives every reader input its own zero tensor requiring grad (deltas).
    perturb[reader] is added to that reader's input only; replace[reader] replaces it (used to
    patch edges). With grouped-query attention each query head's key and value are computed from
    its own copy of the residual stream (ungrouped K/V readers)."""
    perturb, replace = perturb or {}, replace or {}
    n_b, n_p = tokens.shape
    d, H, KV = arch["d"], arch["n_heads"], arch["n_kv"]
    g = H // KV
    kv_of = torch.arange(H) // g  # query head -> its key/value head
    acts, deltas, inputs = {}, {}, {}

    def zero(*shape):
        return torch.zeros(*shape, dtype=F64, requires_grad=track)

    def reader_input(name, x):
        if name in replace:
            x = replace[name]
        x = x + perturb.get(name, 0)
        inputs[name] = x
        return x

    pos = torch.arange(n_p, dtype=F64)
    freqs = pos[:, None] * inv_freq(arch)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
    qi, ki = torch.arange(n_p)[:, None], torch.arange(n_p)[None, :]

    resid = p["emb"][tokens] * arch["embed_scale"]
    acts["input"] = resid
    for L, w in enumerate(p["layers"]):
        resid_in = resid
        xs = {}
        for letter in "qkv":
            dlt = zero(n_b, n_p, H, d)
            xl = []
            for h in range(H):
                name = f"a{L}.h{h}<{letter}>"
                deltas[name] = (dlt, h)
                xl.append(reader_input(name, resid + dlt[:, :, h]))
            xs[letter] = norm(arch, torch.stack(xl, dim=2), w["n1"])  # [B,P,H,d]
        q = torch.einsum("bphd,hed->bphe", xs["q"], w["Wq"]) + w["bq"]
        k = torch.einsum("bphd,hed->bphe", xs["k"], w["Wk"][kv_of]) + w["bk"][kv_of]
        v = torch.einsum("bphd,hed->bphe", xs["v"], w["Wv"][kv_of]) + w["bv"][kv_of]
        q, k = rotary(arch, q, cos, sin), rotary(arch, k, cos, sin)
        s = torch.einsum("bqhe,bkhe->bhqk", q, k) * arch["attn_scale"]
        if stats is not None:
            stats.setdefault("max_abs_score", []).append(s.detach().abs().max().item())
        if arch["attn_softcap"] is not None:
            cap = arch["attn_softcap"]
            s = cap * torch.tanh(s / cap)
        allowed = ki <= qi
        if arch["sliding"][L]:
            allowed = allowed & (ki > qi - arch["window"])  # transformers: kv > q - window
        s = s.masked_fill(~allowed, float("-inf"))
        pattern = torch.softmax(s, dim=-1)
        if stats is not None:
            stats.setdefault("mean_max_attn", []).append(pattern.detach().max(-1).values.mean().item())
        z = torch.einsum("bhqk,bkhe->bqhe", pattern, v)
        heads = torch.einsum("bqhe,hde->bqhd", z, w["Wo"])  # [B,P,H,d], no o_proj bias
        for h in range(H):
            acts[f"a{L}.h{h}"] = heads[:, :, h]
        attn = heads.sum(2) + w["bo"]
        if arch["model_type"] == "gemma2":
            attn = norm(arch, attn, w["post_attn"])
        if not arch["parallel"]:
            resid = resid + attn
        dlt = zero(n_b, n_p, d)
        deltas[f"m{L}"] = (dlt, None)
        x = norm(arch, reader_input(f"m{L}", (resid_in if arch["parallel"] else resid) + dlt),
                 w["n2"])
        if arch["mlp"] == "gelu":
            out = gelu_erf(x @ w["W_in"].T + w["b_in"]) @ w["W_out"].T  # writer: without b_out
            bias_out = w["b_out"]
        else:
            act = torch.nn.functional.silu if arch["mlp"] == "swiglu" else gelu_tanh
            out = (act(x @ w["W_gate"].T) * (x @ w["W_up"].T)) @ w["W_down"].T
            bias_out = 0
            if arch["model_type"] == "gemma2":
                out = norm(arch, out, w["post_ff"])  # exact additive contribution
        acts[f"m{L}"] = out
        if arch["parallel"]:
            resid = resid_in + attn + out + bias_out
        else:
            resid = resid + out + bias_out
    dlt = zero(n_b, n_p, d)
    deltas["logits"] = (dlt, None)
    x = norm(arch, reader_input("logits", resid + dlt), p["final"])
    logits = x @ p["unemb"].T
    if arch["final_softcap"] is not None:
        cap = arch["final_softcap"]
        logits = cap * torch.tanh(logits / cap)
    return logits, acts, deltas, inputs


def metric(logits, answer, wrong):
    last = logits[:, -1, :]
    idx = torch.arange(logits.shape[0])
    return (last[idx, answer] - last[idx, wrong]).mean()


def random_inputs(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, P), generator=g)
    while True:
        corrupted = torch.randint(0, vocab, (B, P), generator=g)
        if (corrupted != tokens).any(dim=1).all():
            break
    answer = torch.randint(0, vocab, (B,), generator=g)
    wrong = (answer + torch.randint(1, vocab, (B,), generator=g)) % vocab
    assert (answer != wrong).all()
    return tokens, corrupted, answer, wrong


def reference(arch, p, inputs, seed):
    """Every reference tensor (float32 / int64) plus validation figures."""
    tokens, corrupted, answer, wrong = inputs
    stats = {}
    logits, acts, deltas, clean_in = forward(arch, p, tokens, track=True, stats=stats)
    m = metric(logits, answer, wrong)
    m.backward()
    grads = {r: (dlt.grad[:, :, h] if h is not None else dlt.grad).detach()
             for r, (dlt, h) in deltas.items()}
    acts = {k: v.detach() for k, v in acts.items()}
    clean_in = {k: v.detach() for k, v in clean_in.items()}
    with torch.no_grad():
        c_logits, c_acts, _, c_in = forward(arch, p, corrupted)
    ws, rs = writer_names(arch), reader_names(arch)
    assert list(acts) == ws and list(grads) == rs, (list(acts), list(grads))
    mask = edge_mask(arch)
    G = torch.stack([grads[r] for r in rs])
    A = torch.stack([acts[w] for w in ws])
    C = torch.stack([c_acts[w] for w in ws])
    scores = torch.einsum("wbpd,rbpd->wr", C - A, G) * mask
    scores_zero = torch.einsum("wbpd,rbpd->wr", -A, G) * mask

    # Central finite differences on three random directions per reader (float64).
    gen = torch.Generator().manual_seed(seed + 7)
    eps_fd, worst = 1e-5, 0.0
    with torch.no_grad():
        for r in [r for r in rs for _ in range(3)]:
            u = torch.randn(B, P, arch["d"], generator=gen, dtype=F64)
            mp = metric(forward(arch, p, tokens, perturb={r: eps_fd * u})[0], answer, wrong)
            mm = metric(forward(arch, p, tokens, perturb={r: -eps_fd * u})[0], answer, wrong)
            fd = ((mp - mm) / (2 * eps_fd)).item()
            an = (grads[r] * u).sum().item()
            worst = max(worst, abs(fd - an) / max(1.0, abs(an)))
    assert worst < 1e-6, f"finite-difference check failed: {worst}"

    # Patch every edge: reader v receives in_v (clean run) + sum_{u->v} (corrupted_u - clean_u).
    with torch.no_grad():
        D = C - A
        repl = {r: clean_in[r] + torch.einsum("w,wbpd->bpd", mask[:, j].to(F64), D)
                for j, r in enumerate(rs)}
        pa_logits, _, _, pa_in = forward(arch, p, tokens, replace=repl)
        m_corr = metric(c_logits, answer, wrong)
        gap = abs(metric(pa_logits, answer, wrong) - m_corr).item()
        in_gap = max((pa_in[r] - c_in[r]).abs().max().item() for r in rs)

    out = {"tokens": tokens, "corrupted_tokens": corrupted, "answer": answer, "wrong": wrong,
           "logits": logits.detach(), "corrupted_logits": c_logits,
           "metric": m.detach().reshape(1), "eap_scores": scores, "eap_scores_zero": scores_zero}
    for r in rs:
        out[f"grad.{r}"] = grads[r]
    for w in ws:
        out[f"act.{w}"] = acts[w]
        out[f"corrupted_act.{w}"] = c_acts[w]
    out = {k: (v.to(torch.float32) if v.is_floating_point() else v.to(torch.int64)).contiguous()
           for k, v in out.items()}
    figures = dict(
        fd_rel_err=worst, metric=m.item(), corrupted_metric=m_corr.item(),
        patch_all_metric_gap=gap, patch_all_input_gap=in_gap,
        n_writers=len(ws), n_readers=len(rs), n_edges=int(mask.sum()),
        max_abs_score=scores.abs().max().item(),
        mean_max_attn=sum(stats["mean_max_attn"]) / len(stats["mean_max_attn"]),
        max_abs_attn_score=max(stats["max_abs_score"]),
        rms_input=acts["input"].pow(2).mean().sqrt().item(),
        rms_resid_final=clean_in["logits"].pow(2).mean().sqrt().item())
    return out, figures


# --------------------------------------------------------------------------------------------
# Building, saving and validating the transformers models
# --------------------------------------------------------------------------------------------

def randomize(model, family, seed, qk_gain=1.0):
    """Deterministic non-trivial weights: norm gains 1 + 0.3 randn (Gemma stores w = 0.3 randn for
    its (1 + w) gains), biases 0.1 randn, embeddings 0.8 randn (0.2 for Gemma, whose input is
    scaled by sqrt(d)), other matrices randn / sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in sorted(model.named_parameters()):
            shape = prm.shape
            if "norm" in name:
                if name.endswith("bias"):
                    prm.copy_(0.1 * torch.randn(shape, generator=g))
                elif family == "gemma2":
                    prm.copy_(0.3 * torch.randn(shape, generator=g))
                else:
                    prm.copy_(1.0 + 0.3 * torch.randn(shape, generator=g))
            elif name.endswith("bias"):
                prm.copy_(0.1 * torch.randn(shape, generator=g))
            elif "embed_tokens" in name or "embed_in" in name:
                prm.copy_((0.2 if family == "gemma2" else 0.8) * torch.randn(shape, generator=g))
            else:
                gain = qk_gain if (".q_proj." in name or ".k_proj." in name) else 1.0
                prm.copy_(gain * torch.randn(shape, generator=g) / math.sqrt(shape[1]))


def to_hub_spelling(cfg, family):
    """Rewrite a transformers-5 config dict to the older keys hub checkpoints carry."""
    cfg = dict(cfg)
    rp = cfg.pop("rope_parameters")
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    if family == "gpt_neox":
        cfg["rotary_pct"] = rp["partial_rotary_factor"]
        cfg["rotary_emb_base"] = rp["rope_theta"]
    else:
        cfg["rope_theta"] = rp["rope_theta"]
        if rp.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    if family == "qwen2":
        cfg.pop("layer_types")
        assert cfg["use_sliding_window"] is False
        cfg["sliding_window"] = QWEN2_IGNORED_WINDOW
    return cfg


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")  # transformers' layout


def load_state(out_dir):
    """The stored tensors (all shards), cast to float64."""
    idx = out_dir / "model.safetensors.index.json"
    files = (sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.exists()
             else ["model.safetensors"])
    sd = {}
    for f in files:
        sd.update(load_file(str(out_dir / f)))
    return {k: v.to(F64) for k, v in sd.items()}, {k: v.dtype for k, v in sd.items()}, files


def hf_logits(out_dir, token_sets):
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(str(out_dir), attn_implementation="eager",
                                              dtype=torch.float32).eval()
    with torch.no_grad():
        return lm, [lm(t).logits for t in token_sets]


def make_tokenizer(out_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(TOKENIZER_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[UNK]", "[PAD]"])
    tok.save(str(out_dir / "tokenizer.json"))
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))

    def one(word):
        ids = tok.encode(word).ids
        assert len(ids) == 1 and ids[0] != vocab["[UNK]"], (word, ids)
        assert tok.encode(" " + word).ids == ids, word  # leading space: same token
        return ids[0]
    rows, clean, corr = [], [], []
    for pr in PROMPTS:
        c, k = tok.encode(pr["clean"]).ids, tok.encode(pr["corrupted"]).ids
        assert len(c) == P and len(k) == P and 0 not in c + k, (pr, c, k)
        clean.append(c)
        corr.append(k)
        rows.append(json.dumps({"clean": pr["clean"], "corrupted": pr["corrupted"],
                                "answer": pr["answer"], "wrong": pr["wrong"]}))
    (out_dir / "data.jsonl").write_text("\n".join(rows) + "\n")
    answer = torch.tensor([one(pr["answer"]) for pr in PROMPTS])
    wrong = torch.tensor([one(pr["wrong"]) for pr in PROMPTS])
    return torch.tensor(clean), torch.tensor(corr), answer, wrong, len(vocab)


def make_fixture(name, spec):
    import transformers
    from transformers import AutoModelForCausalLM
    out_dir = FIXTURES / "models" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in out_dir.iterdir():  # stale shards / files from earlier runs
        f.unlink()
    hcfg = getattr(transformers, spec["cls"])(**spec["cfg"])
    family = hcfg.model_type
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(hcfg, attn_implementation="eager").eval()
    randomize(model, family, spec["seed"], spec.get("qk_gain", 1.0))
    model = model.to(getattr(torch, spec["dtype"]))
    kwargs = dict(safe_serialization=True)
    if spec["shard"]:
        kwargs["max_shard_size"] = spec["shard"]
    model.save_pretrained(str(out_dir), **kwargs)
    (out_dir / "generation_config.json").unlink(missing_ok=True)

    figures = {}
    if family == "qwen2":
        tokens, corrupted, answer, wrong, n_tok = make_tokenizer(out_dir)
        assert n_tok <= hcfg.vocab_size
        inputs = (tokens, corrupted, answer, wrong)
    else:
        inputs = random_inputs(hcfg.vocab_size, spec["seed"] + 1000)

    written = json.loads((out_dir / "config.json").read_text())
    if spec["spelling"] == "hub":
        # transformers 5 writes rope_parameters; rewrite to the hub's spelling and check that
        # transformers still loads the same configuration and the same logits.
        _, before = hf_logits(out_dir, inputs[:2])
        from transformers import AutoConfig
        cfg_before = AutoConfig.from_pretrained(str(out_dir)).to_dict()
        write_json(out_dir / "config.json", to_hub_spelling(written, family))
        cfg_after = AutoConfig.from_pretrained(str(out_dir)).to_dict()
        _, after = hf_logits(out_dir, inputs[:2])
        assert all(torch.equal(a, b) for a, b in zip(before, after)), "spelling changed logits"
        changed = sorted(k for k in set(cfg_before) | set(cfg_after)
                         if cfg_before.get(k) != cfg_after.get(k))
        # Only the storage-dtype key's name and, for qwen2, the ignored sliding window differ.
        allowed = {"dtype", "torch_dtype", "sliding_window"}
        assert set(changed) <= allowed, changed
        assert cfg_before["rope_parameters"] == cfg_after["rope_parameters"]
        assert cfg_before.get("layer_types") == cfg_after.get("layer_types")
        figures["hub_spelling_reload"] = "identical logits and rope_parameters"
    cfg = json.loads((out_dir / "config.json").read_text())
    arch = parse_arch(cfg)
    sd, dtypes, files = load_state(out_dir)
    assert set(dtypes.values()) == {getattr(torch, spec["dtype"])}, set(dtypes.values())
    p = unified_params(arch, sd)
    ref, fig = reference(arch, p, inputs, spec["seed"])
    figures.update(fig)

    # Validate against transformers (float32, eager attention).
    lm, hf = hf_logits(out_dir, inputs[:2])
    diff = max((hf[0] - ref["logits"]).abs().max().item(),
               (hf[1] - ref["corrupted_logits"]).abs().max().item())
    assert diff < 1e-4, f"{name}: max |logits - transformers| = {diff}"
    figures["max_abs_diff_vs_transformers"] = diff
    hf_types = list(getattr(lm.config, "layer_types", None) or [])
    if hf_types:
        assert [t == "sliding_attention" and lm.config.sliding_window is not None
                for t in hf_types] == arch["sliding"], (hf_types, arch["sliding"])
    figures["sliding_layers"] = [i for i, s in enumerate(arch["sliding"]) if s]
    hf_inv = lm.model.rotary_emb.inv_freq if family != "gpt_neox" else lm.gpt_neox.rotary_emb.inv_freq
    assert torch.allclose(hf_inv.to(F64), inv_freq(arch), rtol=1e-6, atol=0), (hf_inv, inv_freq(arch))
    if arch["llama3"] is not None:
        plain = dict(arch, llama3=None)
        changed = (inv_freq(plain) != inv_freq(arch)).tolist()
        assert any(changed) and not all(changed), changed  # some, not all, frequencies scaled
        figures["llama3_inv_freq"] = [round(x, 6) for x in inv_freq(arch).tolist()]
        figures["llama3_unscaled"] = [round(x, 6) for x in inv_freq(plain).tolist()]
    if any(arch["sliding"]):  # the window must really mask something at this prompt length
        wide = dict(arch, sliding=[False] * arch["n_layers"])
        with torch.no_grad():
            no_slide = forward(wide, p, inputs[0])[0]
        figures["sliding_effect_on_logits"] = (no_slide - ref["logits"].to(F64)).abs().max().item()
        assert figures["sliding_effect_on_logits"] > 1e-3
    if family == "gemma2":  # both soft-caps must change the result
        with torch.no_grad():
            for key in ("attn_softcap", "final_softcap"):
                uncapped = forward(dict(arch, **{key: None}), p, inputs[0])[0]
                effect = (uncapped - ref["logits"].to(F64)).abs().max().item()
                assert effect > 1e-3, (key, effect)
                figures[f"{key}_effect_on_logits"] = effect
        ref["patch_all_gap"] = torch.tensor([figures["patch_all_metric_gap"]], dtype=torch.float32)
    else:
        assert figures["patch_all_metric_gap"] < 1e-9, figures["patch_all_metric_gap"]
        assert figures["patch_all_input_gap"] < 1e-9, figures["patch_all_input_gap"]
    if arch["parallel"]:
        mask = edge_mask(arch)
        ws, rs = writer_names(arch), reader_names(arch)
        for L in range(arch["n_layers"]):
            for h in range(arch["n_heads"]):
                assert not mask[ws.index(f"a{L}.h{h}"), rs.index(f"m{L}")]
    save_file(ref, str(out_dir / "reference.safetensors"),
              metadata={"convention": "made by scripts/make_family_fixtures.py; score[u,v] = "
                                      "sum_{b,p} (a_u(corrupt) - a_u(clean)) . dM/d in_v "
                                      "(clean run), M = mean over b of logit diff at last pos"})
    figures["weight_files"] = files
    figures["dir_bytes"] = sum(f.stat().st_size for f in out_dir.iterdir())
    assert figures["dir_bytes"] < 300_000, figures["dir_bytes"]
    return figures


# --------------------------------------------------------------------------------------------
# Config-only fixtures: hub config.json files and their edge counts
# --------------------------------------------------------------------------------------------

def edge_count(cfg):
    """EAP-IG edge count: writers input + per layer n_heads heads + MLP; readers per layer
    3 n_heads + 1, then logits; parallel attention+MLP drops the layer-L-heads -> m{L} edges."""
    L, H = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    parallel = cfg["model_type"] == "gpt_neox" and cfg.get("use_parallel_residual", True)
    n = 0
    for layer in range(L):
        before = 1 + layer * (H + 1)  # writers already written when layer `layer` starts
        n += 3 * H * before + before + (0 if parallel else H)
    return n + 1 + L * (H + 1)


CONFIG_FACTS = {
    "qwen2.5-0.5b": (dict(model_type="qwen2", num_hidden_layers=24, hidden_size=896,
                          num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                          vocab_size=151936, tie_word_embeddings=True), 179_749),
    "gemma-2-2b": (dict(model_type="gemma2", num_hidden_layers=26, hidden_size=2304,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        intermediate_size=9216, vocab_size=256000), 74_218),
    "llama-3.1-8b": (dict(model_type="llama", num_hidden_layers=32, hidden_size=4096,
                          num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                          vocab_size=128256), 1_592_881),
    "pythia-160m": (dict(model_type="gpt_neox", num_hidden_layers=12, hidden_size=768,
                         num_attention_heads=12, use_parallel_residual=True), 32_347),
}


def check_configs():
    out = {}
    assert edge_count(dict(model_type="gpt2", num_hidden_layers=12, num_attention_heads=12)) \
        == 32_491  # GPT-2 small (DESIGN.md)
    for name, (facts, edges) in CONFIG_FACTS.items():
        cfg = json.loads((FIXTURES / "configs" / f"{name}.json").read_text())
        for k, v in facts.items():
            assert cfg[k] == v, (name, k, cfg[k], v)
        n = edge_count(cfg)
        assert n == edges, (name, n, edges)
        out[name] = n
    llama = json.loads((FIXTURES / "configs" / "llama-3.1-8b.json").read_text())
    assert llama["rope_scaling"]["rope_type"] == "llama3"
    return out


def main():
    import transformers
    (FIXTURES / "models").mkdir(parents=True, exist_ok=True)
    print("transformers", transformers.__version__, "torch", torch.__version__)
    for name, spec in SPECS.items():
        figures = make_fixture(name, spec)
        print(name, json.dumps(figures))
    print("config edge counts", json.dumps(check_configs()))
    for name in SPECS:
        d = FIXTURES / "models" / name
        for f in sorted(d.iterdir()):
            print(f"  {hashlib.sha256(f.read_bytes()).hexdigest()[:16]}  {f.stat().st_size:7d}  "
                  f"{name}/{f.name}")


if __name__ == "__main__":
    main()
