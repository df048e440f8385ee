"""The PyTorch reference for EAP on a Llama-family `transformers` model (llama, qwen2, mistral;
grouped-query attention) or on GPT-2 (`GPT2LMHeadModel`), computed the way EAP-IG does it
(hannamw/EAP-IG `attribute`): every head's q/k/v input is its own copy of the residual stream
(TransformerLens' split q/k/v input, ungrouped K/V: query head H reads its key/value through its
own copy), forward hooks store the writer outputs (embedding — for GPT-2 token plus position
embedding —, each head's z_H @ W_O[:, H] — for GPT-2 the rows H*dh..(H+1)*dh of attn.c_proj —,
each MLP's output without its output bias) as
Delta = corrupted - clean, and gradient hooks on every reader input contract that reader's
gradient with the Delta of all earlier writers, during the backward (one GEMM per hook on a
writer-major Delta [n_writers, B*P*d]; EAP-IG's einsum over [B, P, n_writers, d] gives the same
numbers but copies the Delta slice at every hook). The decoder layers' forward
is replaced by a split-input version that uses the layer's own modules (norms, projections,
rotary, MLP) and the attention mask transformers builds for it. For GPT-2 that is GPT2Block:
ln_1, attn.c_attn (Conv1D, x @ W + b: columns [0,d) q, [d,2d) k, [2d,3d) v, head H in columns
H*dh..(H+1)*dh of each), causal softmax with attn.scaling (1/sqrt(dh)), attn.c_proj, ln_2,
mlp.c_fc -> mlp.act (gelu_new) -> mlp.c_proj.

    scripts/.venv/bin/python scripts/bench_pytorch_eap_hf.py --like qwen2.5-0.5b \
        [--layers N] [--batch 32 --seq 16 --threads 2 --reps 3] [--save-scores FILE] [--dtype bfloat16]
    scripts/.venv/bin/python scripts/bench_pytorch_eap_hf.py --like gpt2 [--layers N] ...
    scripts/.venv/bin/python scripts/bench_pytorch_eap_hf.py --model DIR ...   # Llama family or GPT-2
    scripts/.venv/bin/python scripts/bench_pytorch_eap_hf.py --check-fixture tests/fixtures/models/qwen2_bias
    scripts/.venv/bin/python scripts/bench_pytorch_eap_hf.py --check-fixture tests/fixtures/models/gpt2_hf

Prints one JSON line: wall time of the EAP part (corrupted forward + clean forward + backward with
the contractions; best and mean over --reps after one warm-up), peak RSS (ru_maxrss) and the CPU
model. Scores follow tests/fixtures/README.md: score[u,v] = sum_{b,p} (a_u(corrupt) - a_u(clean))
. dM/d in_v, M = mean over the batch of the last-position logit difference, 0 where u -> v is no
edge. Only activation gradients are computed (parameters do not require grad). --check-fixture
runs on a fixture's model and inputs and asserts max |scores - eap_scores| <= 1e-4 max |eap_scores|.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
import types

import torch

LIKE = {
    # Qwen/Qwen2.5-0.5B (tests/fixtures/configs/qwen2.5-0.5b.json)
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        use_sliding_window=False)),
    # openai-community/gpt2 (GPT-2 small); random init (transformers' default) after manual_seed(0)
    "gpt2": ("GPT2Config", dict(
        vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True)),
}


def apply_mask(s, attention_mask):
    """Attention scores s [B,H,P,P] with transformers' mask (None: causal, key <= query)."""
    p = s.shape[-1]
    if attention_mask is None:
        mask = torch.ones(p, p, dtype=torch.bool).tril()
        return s.masked_fill(~mask, float("-inf"))
    if attention_mask.dtype == torch.bool:
        return s.masked_fill(~attention_mask, float("-inf"))
    return s + attention_mask


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


class EapHooks:
    """Writer/reader bookkeeping and the split q/k/v decoder-layer forward."""

    def __init__(self, model):
        cfg = model.config
        assert cfg.model_type in ("llama", "qwen2", "mistral", "gpt2"), cfg.model_type
        self.gpt2 = cfg.model_type == "gpt2"
        self.model = model
        self.L, self.H = cfg.num_hidden_layers, cfg.num_attention_heads
        self.KV = self.H if self.gpt2 else cfg.num_key_value_heads
        self.d = cfg.hidden_size
        self.dh = (None if self.gpt2 else getattr(cfg, "head_dim", None)) or self.d // self.H
        self.d_mlp = (cfg.n_inner or 4 * self.d) if self.gpt2 else cfg.intermediate_size
        self.n_writers = 1 + self.L * (self.H + 1)
        self.n_readers = self.L * (3 * self.H + 1) + 1
        self.delta = None      # [n_writers, B*P*d]: corrupted - clean, writer-major
        self.scores = None     # [n_writers, n_readers]
        self.sign = 0          # +1 corrupted run, -1 clean run, 0 no recording
        self.grad_hooks = False
        if self.gpt2:
            inner = model.transformer
            # transformer.drop (identity in eval) sees wte[tok] + wpe[pos]: the `input` writer.
            assert not cfg.add_cross_attention
            inner.drop.register_forward_hook(self._embed_hook)
            inner.ln_f.register_forward_pre_hook(self._final_hook)
            for L, layer in enumerate(inner.h):
                layer.forward = types.MethodType(self._make_gpt2_layer_forward(L), layer)
            return
        inner = model.model
        inner.embed_tokens.register_forward_hook(self._embed_hook)
        inner.norm.register_forward_pre_hook(self._final_hook)
        for L, layer in enumerate(inner.layers):
            layer.forward = types.MethodType(self._make_layer_forward(L), layer)

    # writer index of layer L's first head, reader index of layer L's first <q>
    def w_head(self, L):
        return 1 + L * (self.H + 1)

    def r_layer(self, L):
        return L * (3 * self.H + 1)

    def edge_mask(self):
        m = torch.zeros(self.n_writers, self.n_readers, dtype=torch.bool)
        for L in range(self.L):
            r = self.r_layer(L)
            m[: self.w_head(L), r: r + 3 * self.H] = True          # into q/k/v of layer L
            m[: self.w_head(L) + self.H, r + 3 * self.H] = True    # into m{L} (sequential)
        m[:, -1] = True
        return m

    def record(self, index, value):
        """value [B,P,d] or [B,P,n,d] for writers index.. (forward hook)."""
        if self.sign == 0:
            return
        v = value.detach()
        if v.ndim == 3:
            v = v.unsqueeze(2)
        v = v.permute(2, 0, 1, 3).reshape(v.shape[2], -1)
        if self.sign > 0:
            self.delta[index: index + v.shape[0]] += v
        else:
            self.delta[index: index + v.shape[0]] -= v

    def contract(self, n_prev, r0, grad):
        """Gradient hook: grad [B,P,d] or [B,P,n,d] of readers r0.. ; writers < n_prev feed them.
        EAP-IG's einsum('bpwd,bprd->wr', delta[:, :, :n_prev], grad) as one GEMM on the
        writer-major Delta (no copy of Delta)."""
        g = grad.detach()
        if g.ndim == 3:
            g = g.unsqueeze(2)
        g = g.permute(0, 1, 3, 2).reshape(-1, g.shape[2])  # [B*P*d, r]
        self.scores[:n_prev, r0: r0 + g.shape[1]] += self.delta[:n_prev] @ g

    def reader(self, x, n_prev, r0):
        if self.grad_hooks and x.requires_grad:
            x.register_hook(lambda g: self.contract(n_prev, r0, g))
        return x

    def _embed_hook(self, module, args, out):
        self.record(0, out)
        if self.grad_hooks:
            out = out.detach().requires_grad_(True)  # activation gradients only
        return out

    def _final_hook(self, module, args):
        x = self.reader(args[0].clone(), self.n_writers, self.n_readers - 1)
        return (x,)

    def _make_layer_forward(self, L):
        hooks = self
        H, KV, dh = self.H, self.KV, self.dh
        kv_of = torch.arange(H) // (H // KV)

        def forward(layer, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
            attn = layer.self_attn
            rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
            b, p, d = hidden_states.shape
            n_prev, r0 = hooks.w_head(L), hooks.r_layer(L)
            # Split q/k/v inputs: one copy of the residual stream per head and letter.
            ins = []
            for i in range(3):
                x = hidden_states.unsqueeze(2).expand(b, p, H, d)
                ins.append(layer.input_layernorm(hooks.reader(x, n_prev, r0 + i * H)))
            Wq = attn.q_proj.weight.view(H, dh, d)
            Wk = attn.k_proj.weight.view(KV, dh, d)[kv_of]
            Wv = attn.v_proj.weight.view(KV, dh, d)[kv_of]
            q = torch.einsum("bphd,hed->bhpe", ins[0], Wq)
            k = torch.einsum("bphd,hed->bhpe", ins[1], Wk)
            v = torch.einsum("bphd,hed->bhpe", ins[2], Wv)
            if attn.q_proj.bias is not None:
                q = q + attn.q_proj.bias.view(1, H, 1, dh)
                k = k + attn.k_proj.bias.view(KV, dh)[kv_of].view(1, H, 1, dh)
                v = v + attn.v_proj.bias.view(KV, dh)[kv_of].view(1, H, 1, dh)
            cos, sin = position_embeddings
            q, k = rope(q, k, cos, sin)
            s = apply_mask(torch.matmul(q, k.transpose(2, 3)) * attn.scaling, attention_mask)
            z = torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)
            Wo = attn.o_proj.weight.view(d, H, dh)
            heads = torch.einsum("bhpe,dhe->bphd", z, Wo)  # hook_result: z_H @ W_O[:, H]^T
            hooks.record(n_prev, heads)
            attn_out = heads.sum(2)
            if attn.o_proj.bias is not None:
                attn_out = attn_out + attn.o_proj.bias
            resid = hidden_states + attn_out
            x = hooks.reader(resid.clone(), n_prev + H, r0 + 3 * H)  # hook_mlp_in
            mlp_out = layer.mlp(layer.post_attention_layernorm(x))
            hooks.record(n_prev + H, mlp_out)
            return resid + mlp_out

        return forward

    def _make_gpt2_layer_forward(self, L):
        """GPT2Block with split q/k/v inputs (called as block(hidden, past_key_values,
        attention_mask, encoder_hidden_states, ...))."""
        hooks = self
        H, dh = self.H, self.dh

        def forward(layer, hidden_states, past_key_values=None, attention_mask=None, *args,
                    **kwargs):
            attn = layer.attn
            b, p, d = hidden_states.shape
            n_prev, r0 = hooks.w_head(L), hooks.r_layer(L)
            # Split q/k/v inputs: one copy of the residual stream per head and letter.
            ins = []
            for i in range(3):
                x = hidden_states.unsqueeze(2).expand(b, p, H, d)
                ins.append(layer.ln_1(hooks.reader(x, n_prev, r0 + i * H)))
            # Conv1D: y = x @ W + b, W [d, 3d]; q/k/v blocks of d columns, head h at h*dh.
            W = attn.c_attn.weight.view(d, 3, H, dh)
            bias = attn.c_attn.bias.view(3, 1, H, 1, dh)
            q = torch.einsum("bphd,dhe->bhpe", ins[0], W[:, 0]) + bias[0]
            k = torch.einsum("bphd,dhe->bhpe", ins[1], W[:, 1]) + bias[1]
            v = torch.einsum("bphd,dhe->bhpe", ins[2], W[:, 2]) + bias[2]
            s = apply_mask(torch.matmul(q, k.transpose(2, 3)) * attn.scaling, attention_mask)
            z = torch.matmul(torch.softmax(s, dim=-1), v)
            Wo = attn.c_proj.weight.view(H, dh, d)  # Conv1D rows h*dh..(h+1)*dh: head h
            heads = torch.einsum("bhpe,hed->bphd", z, Wo)  # hook_result: z_H @ W_O[H]
            hooks.record(n_prev, heads)
            resid = hidden_states + (heads.sum(2) + attn.c_proj.bias)
            x = hooks.reader(resid.clone(), n_prev + H, r0 + 3 * H)  # hook_mlp_in
            mlp = layer.mlp
            h = mlp.act(mlp.c_fc(layer.ln_2(x)))
            mlp_out = h @ mlp.c_proj.weight  # MLP output without b_out (the fixtures' m{L})
            hooks.record(n_prev + H, mlp_out)
            return resid + (mlp_out + mlp.c_proj.bias)

        return forward

    def run(self, tokens, corrupted, answer, wrong, all_logits=False):
        """EAP scores (float32 on the model's dtype): corrupted forward, clean forward, backward."""
        b, p = tokens.shape
        dt = self.model.dtype
        self.delta = torch.zeros(self.n_writers, b * p * self.d, dtype=dt)
        self.scores = torch.zeros(self.n_writers, self.n_readers, dtype=dt)
        keep = 0 if all_logits else 1
        with torch.no_grad():
            self.sign = 1
            self.model(input_ids=corrupted, use_cache=False, logits_to_keep=keep)
        self.sign, self.grad_hooks = -1, True
        with torch.enable_grad():
            logits = self.model(input_ids=tokens, use_cache=False, logits_to_keep=keep).logits
            last = logits[:, -1, :]
            idx = torch.arange(b)
            metric = (last[idx, answer] - last[idx, wrong]).mean()
            self.sign = 0
            metric.backward()
        self.grad_hooks = False
        return self.scores, metric.item()


def build_model(a):
    import transformers
    if a.model or a.check_fixture:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            a.model or a.check_fixture, attn_implementation="eager", dtype=getattr(torch, a.dtype))
    else:
        cls, kw = LIKE[a.like]
        config = getattr(transformers, cls)(**kw)
        if a.layers:
            config.num_hidden_layers = a.layers  # n_layer for GPT-2 (attribute_map)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="eager", dtype=getattr(torch, a.dtype))
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--like", default="qwen2.5-0.5b", choices=sorted(LIKE))
    ap.add_argument("--layers", type=int, default=None, help="shrink --like to N layers")
    ap.add_argument("--model", default=None, help="a saved model directory instead of --like")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--all-logits", action="store_true",
                    help="unembed every position, as EAP-IG does (default: last position only)")
    ap.add_argument("--save-scores", default=None, help="write the score matrix (key `scores`)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the model's dtype: bfloat16 runs every op in bf16 (weights, activations, "
                         "Delta, scores), as PyTorch users run EAP on GPUs; compare with "
                         "`eap attribute --products bf16`")
    ap.add_argument("--check-fixture", default=None,
                    help="a fixture dir: compare with its reference.safetensors eap_scores")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import transformers
    model = build_model(a)
    hooks = EapHooks(model)
    mask = hooks.edge_mask()

    if a.check_fixture:
        from safetensors.torch import load_file
        ref = load_file(f"{a.check_fixture}/reference.safetensors")
        scores, m = hooks.run(ref["tokens"], ref["corrupted_tokens"], ref["answer"], ref["wrong"])
        want = ref["eap_scores"].to(scores.dtype)
        assert scores.shape == want.shape, (scores.shape, want.shape)
        err = (scores * mask - want).abs().max().item()
        scale = want.abs().max().item()
        ok = err <= 1e-4 * scale
        print(json.dumps({"check_fixture": a.check_fixture, "max_abs_err": err,
                          "max_abs_score": scale, "rel_err": err / scale,
                          "metric": m, "ref_metric": ref["metric"].item(), "ok": ok}))
        if a.save_scores:
            from safetensors.torch import save_file
            save_file({"scores": (scores * mask).float().contiguous()}, a.save_scores)
        sys.exit(0 if ok else 1)

    V = model.config.vocab_size
    tok = torch.tensor([[(bi * 7919 + pi * 104729) % V for pi in range(a.seq)]
                        for bi in range(a.batch)])
    corrupted = (tok + 1) % V
    answer = torch.tensor([(bi * 31 + 7) % V for bi in range(a.batch)])
    wrong = (answer + 1) % V
    times = []
    for _ in range(a.reps + 1):
        t = time.perf_counter()
        scores, m = hooks.run(tok, corrupted, answer, wrong, all_logits=a.all_logits)
        times.append(time.perf_counter() - t)
    scores = scores * mask
    if a.save_scores:
        from safetensors.torch import save_file
        save_file({"scores": scores.float().contiguous()}, a.save_scores)
    cfg = model.config
    print(json.dumps({
        "model": a.model or a.like, "layers": cfg.num_hidden_layers, "d_model": cfg.hidden_size,
        "heads": cfg.num_attention_heads, "kv_heads": hooks.KV,
        "d_mlp": hooks.d_mlp, "vocab": cfg.vocab_size,
        "batch": a.batch, "seq": a.seq, "threads": torch.get_num_threads(),
        "all_logits": a.all_logits, "dtype": a.dtype,
        "n_writers": hooks.n_writers, "n_readers": hooks.n_readers, "n_edges": int(mask.sum()),
        "eap_s_best": min(times[1:]), "eap_s_mean": sum(times[1:]) / a.reps,
        "eap_s_first": times[0], "reps": a.reps, "metric": m,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu": cpu_model(), "torch": torch.__version__, "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
