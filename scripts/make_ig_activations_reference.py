#!/usr/bin/env python3
"""PyTorch reference for EAP-IG-activations (hannamw/EAP-IG `get_scores_ig_activations`).

    python3 scripts/make_ig_activations_reference.py

For the TransformerLens fixtures `tl_lnpre_gelu_bidir` (with MLPs) and `tl_attn_only_shortformer`
(attention only) it writes `tests/fixtures/models/<name>/ig_activations.safetensors`:

- `scores_<steps>` [n_writers, n_readers] for steps 1, 3 and 12: for the input, then each layer's
  attention (all heads) and MLP, `steps` clean runs with that sublayer's output replaced by the
  constant `corrupted + k/steps (clean - corrupted)`, k = 1..steps; every run's per-reader
  gradient of M (the batch-mean logit difference) is contracted with Δ = corrupted - clean;
  averaged over all runs (attention-only models: the MLP runs are plain clean runs, as EAP-IG's
  hooks on absent MLPs never fire).
- `integrals_<steps>` [n_sublayers]: per sublayer, the Riemann sum over its own runs of
  Σ_{u in it, v} Δ_u · dM/d in_v; `exact` [n_sublayers]: M(that sublayer at its corrupted value)
  - M(clean), which the integrals approach (completeness).

It reuses scripts/make_fixtures.py's float64 functional forward (same conventions) on the
committed weights, and the fixture's reference tokens.
"""

import json
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

if __name__ == "__main__":
    import make_fixtures as _mf  # noqa: E402  (re-exec into scripts/.venv happens there)
    _mf._ensure_venv()

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import make_fixtures as mf  # noqa: E402

STEPS = (1, 3, 12)


def run(name):
    d = mf.FIXTURES / "models" / name
    cfg = json.loads((d / "config.json").read_text())
    p = {k: v.to(torch.float64) for k, v in load_file(str(d / "model.safetensors")).items()}
    for key in ["unembed.b_U"]:
        p.setdefault(key, torch.zeros(cfg["d_vocab_out"], dtype=torch.float64))
    refs = load_file(str(d / "reference.safetensors"))
    tokens, corrupted = refs["tokens"], refs["corrupted_tokens"]
    answer, wrong = refs["answer"], refs["wrong"]
    ws, rs = mf.writer_names(cfg), mf.reader_names(cfg)
    mask = mf.edge_mask(cfg)
    H = cfg["n_heads"]
    with torch.no_grad():
        clean_logits, a, _ = mf.forward(cfg, p, tokens)
        _, c, _ = mf.forward(cfg, p, corrupted)
    m_clean = mf.metric(clean_logits, answer, wrong).item()
    delta = torch.stack([c[w] - a[w] for w in ws])  # [W,B,P,d]

    def group(name_):  # the sublayer's value in the override layout
        if name_ == "input":
            return a["input"], c["input"], ["input"]
        if name_.startswith("a"):
            L = int(name_[1:])
            heads = [f"a{L}.h{h}" for h in range(H)]
            return (torch.stack([a[h] for h in heads], 2), torch.stack([c[h] for h in heads], 2),
                    heads)
        return a[name_], c[name_], [name_]

    sublayers = ["input"]
    for L in range(cfg["n_layers"]):
        sublayers += [f"a{L}", f"m{L}"]
    has_mlp = not cfg["attn_only"]
    out = {}
    exact = []
    for s in sublayers:
        if s.startswith("m") and not has_mlp:
            continue
        _, cs, _ = group(s)
        with torch.no_grad():
            lg, _, _ = mf.forward(cfg, p, tokens, override={s: cs})
        exact.append(mf.metric(lg, answer, wrong).item() - m_clean)
    out["exact"] = torch.tensor(exact)
    for steps in STEPS:
        G = torch.zeros(len(rs), *delta.shape[1:], dtype=torch.float64)
        integrals = []
        passes = 0
        for s in sublayers:
            own = None
            if not (s.startswith("m") and not has_mlp):
                a_s, c_s, writers = group(s)
                own = [ws.index(w) for w in writers]
            total = 0.0
            for k in range(1, steps + 1):
                passes += 1
                alpha = k / steps
                override = {} if own is None else {s: alpha * a_s + (1 - alpha) * c_s}
                logits, _, deltas = mf.forward(cfg, p, tokens, track=True, override=override)
                mf.metric(logits, answer, wrong).backward()
                # A replaced sublayer's readers get no gradient (grad stays None): zeros.
                def grad_of(dl, h):
                    g = dl.grad if dl.grad is not None else torch.zeros_like(dl)
                    return g[:, :, h] if h is not None else g
                grads = torch.stack([grad_of(*deltas[r]) for r in rs])
                G += grads
                if own is not None:
                    part = torch.einsum("wbpd,rbpd->wr", delta[own], grads) * mask[own]
                    total += part.sum().item()
            if own is not None:
                integrals.append(total / steps)
        scores = torch.einsum("wbpd,rbpd->wr", delta, G) * mask / passes
        out[f"scores_{steps}"] = scores
        out[f"integrals_{steps}"] = torch.tensor(integrals)
        err = max(abs(i - e) for i, e in zip(integrals, exact))
        print(f"{name}: steps {steps}: max |integral - exact| = {err:.3e}; "
              f"max |score| = {scores.abs().max().item():.4f}")
    out = {k: v.to(torch.float32).contiguous() for k, v in out.items()}
    save_file(out, str(d / "ig_activations.safetensors"))


def main():
    torch.set_num_threads(1)
    for name in ["tl_lnpre_gelu_bidir", "tl_attn_only_shortformer"]:
        run(name)


if __name__ == "__main__":
    main()
