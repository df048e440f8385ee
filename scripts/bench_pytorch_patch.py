"""The PyTorch reference for ACDC's unit of work: one exact patched forward on a GPT-2-small-shaped
random model, as TransformerLens runs it for ACDC (split q/k/v inputs per head, hooks that swap
one edge's writer output for its corrupted value), with the logits of the last position only.

    scripts/.venv/bin/python scripts/bench_pytorch_patch.py [--batch 32 --seq 16 --threads 2]

Prints the best of five timings. Compare with `eap bench`'s ACDC lines (docs/performance.md).
"""

import argparse
import time

import torch


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


def layer_norm(x, w, b):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def make_model(L=12, d=768, h=12, dm=3072, V=50257, ctx=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02
    dh = d // h
    layers = []
    for _ in range(L):
        layers.append(dict(
            ln1_w=torch.ones(d), ln1_b=torch.zeros(d),
            W_Q=r(h, d, dh), W_K=r(h, d, dh), W_V=r(h, d, dh), W_O=r(h, dh, d),
            b_Q=torch.zeros(h, dh), b_K=torch.zeros(h, dh), b_V=torch.zeros(h, dh),
            b_O=torch.zeros(d),
            ln2_w=torch.ones(d), ln2_b=torch.zeros(d),
            W_in=r(d, dm), b_in=torch.zeros(dm), W_out=r(dm, d), b_out=torch.zeros(d)))
    return dict(W_E=r(V, d), W_pos=r(ctx, d), layers=layers,
                lnf_w=torch.ones(d), lnf_b=torch.zeros(d), h=h, dh=dh)


def plain_forward(m, tokens):
    """The same model without per-head input copies: the floor under any hook-based patched
    forward, which runs at least this."""
    b, p = tokens.shape
    x = m["W_E"][tokens] + m["W_pos"][:p]
    mask = torch.triu(torch.full((p, p), float("-inf")), 1)
    for w in m["layers"]:
        xn = layer_norm(x, w["ln1_w"], w["ln1_b"])
        q, k, v = (torch.einsum("bpd,hde->bphe", xn, W) + bias
                   for W, bias in zip((w["W_Q"], w["W_K"], w["W_V"]),
                                      (w["b_Q"], w["b_K"], w["b_V"])))
        s = torch.einsum("bqhe,bkhe->bhqk", q, k) / m["dh"] ** 0.5 + mask
        z = torch.einsum("bhqk,bkhe->bqhe", s.softmax(-1), v)
        x = x + torch.einsum("bqhe,hed->bqd", z, w["W_O"]) + w["b_O"]
        hmid = gelu_new(layer_norm(x, w["ln2_w"], w["ln2_b"]) @ w["W_in"] + w["b_in"])
        x = x + hmid @ w["W_out"] + w["b_out"]
    return layer_norm(x[:, -1], m["lnf_w"], m["lnf_b"]) @ m["W_E"].T


def forward(m, tokens, patch=None, keep=None):
    """`patch`: (layer, letter, head, delta) added to one head's q/k/v input (the edge's
    corrupted-minus-clean writer output), as ACDC's hooks on hook_{q,k,v}_input do.
    `keep`: a list that receives every head's output (the writers)."""
    b, p = tokens.shape
    x = m["W_E"][tokens] + m["W_pos"][:p]
    mask = torch.triu(torch.full((p, p), float("-inf")), 1)
    for l, w in enumerate(m["layers"]):
        # TransformerLens's use_split_qkv_input: one copy of the residual per head and letter.
        ins = [x.unsqueeze(2).expand(b, p, m["h"], x.shape[-1]).clone() for _ in range(3)]
        if patch is not None and patch[0] == l:
            ins[patch[1]][:, :, patch[2]] += patch[3]
        q, k, v = (torch.einsum("bphd,hde->bphe", layer_norm(t, w["ln1_w"], w["ln1_b"]), W) + bias
                   for t, W, bias in zip(ins, (w["W_Q"], w["W_K"], w["W_V"]),
                                         (w["b_Q"], w["b_K"], w["b_V"])))
        s = torch.einsum("bqhe,bkhe->bhqk", q, k) / m["dh"] ** 0.5 + mask
        z = torch.einsum("bhqk,bkhe->bqhe", s.softmax(-1), v)
        heads = torch.einsum("bqhe,hed->bqhd", z, w["W_O"])  # hook_result
        if keep is not None:
            keep.append(heads)
        x = x + heads.sum(2) + w["b_O"]
        hmid = gelu_new(layer_norm(x, w["ln2_w"], w["ln2_b"]) @ w["W_in"] + w["b_in"])
        x = x + hmid @ w["W_out"] + w["b_out"]
    xf = layer_norm(x[:, -1], m["lnf_w"], m["lnf_b"])
    return xf @ m["W_E"].T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    m = make_model()
    V = m["W_E"].shape[0]
    tok = torch.tensor([[(bi * 7919 + pi * 104729) % V for pi in range(a.seq)]
                        for bi in range(a.batch)])
    with torch.inference_mode():
        clean, corrupt = [], []
        forward(m, tok, keep=clean)
        forward(m, (tok + 1) % V, keep=corrupt)
        # One edge: head 3 of layer 2 into the q input of head 5 of layer 6.
        delta = corrupt[2][:, :, 3] - clean[2][:, :, 3]
        times = []
        for _ in range(a.reps + 1):
            t = time.perf_counter()
            forward(m, tok, patch=(6, 0, 5, delta))
            times.append(time.perf_counter() - t)
        plain = []
        for _ in range(a.reps + 1):
            t = time.perf_counter()
            plain_forward(m, tok)
            plain.append(time.perf_counter() - t)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {a.batch} x {a.seq}")
    print(f"patched forward (split q/k/v, one edge hooked): best {min(times[1:]):.3f} s")
    print(f"plain forward, no per-head inputs, no hooks:     best {min(plain[1:]):.3f} s")


if __name__ == "__main__":
    main()
