#!/usr/bin/env python3
"""Writes ioi.txt, greater_than.txt and docstring.txt: the hand-found circuits of ACDC's public
code (ArthurConmy/Automatic-Circuit-Discovery, snapshot bc99ace8), rewritten into eap's edge
names. Run from this folder: `python3 translate_acdc.py`. No dependencies.

This re-states the *effect* of ACDC's `get_ioi_true_edges`, `get_greaterthan_true_edges` and
`get_docstring_subgraph_true_edges` on a graph whose nodes are eap's writers (`input`,
`a{L}.h{H}`, `m{L}`) and readers (`a{L}.h{H}<q|k|v>`, `m{L}`, `logits`). ACDC's extra edges inside a
head (`hook_q_input -> hook_q -> hook_result`) have no counterpart and are dropped; an ACDC edge
`X -> blocks.L.hook_q_input[H]` becomes `X->aL.hH<q>`. See docs/tasks.md.
"""

def writer_layer(w):
    # the layer whose computation produces the writer; input comes before layer 0
    if w == "input":
        return -1
    return int(w[1:].split(".")[0])

def is_edge(w, r):
    """eap's rule: heads of layer L read writers of layers < L; the MLP of layer L also reads
    the heads of layer L; logits read everything."""
    if r == "logits":
        return True
    wl = writer_layer(w)
    if r.startswith("m"):
        rl = int(r[1:])
        return wl < rl or (wl == rl and w.startswith("a"))
    rl = int(r[1:].split(".")[0])
    return wl < rl

def head(l, h):
    return f"a{l}.h{h}"

def head_inputs(l, h, letters="qkv"):
    return [f"a{l}.h{h}<{c}>" for c in letters]

# ---------------------------------------------------------------- IOI (GPT-2 small)
IOI_CIRCUIT = {
    "name mover": [(9, 9), (10, 0), (9, 6)],
    "backup name mover": [(10, 10), (10, 6), (10, 2), (10, 1), (11, 2), (9, 7), (9, 0), (11, 9)],
    "negative": [(10, 7), (11, 10)],
    "s2 inhibition": [(7, 3), (7, 9), (8, 6), (8, 10)],
    "induction": [(5, 5), (5, 8), (5, 9), (6, 9)],
    "duplicate token": [(0, 1), (0, 10), (3, 0)],
    "previous token": [(2, 2), (4, 11)],
}
IOI_SPECIAL = [
    ("INPUT", "previous token", "qkv"),
    ("INPUT", "duplicate token", "qkv"),
    ("INPUT", "s2 inhibition", "q"),
    ("INPUT", "negative", "kv"),
    ("INPUT", "name mover", "kv"),
    ("INPUT", "backup name mover", "kv"),
    ("previous token", "induction", "kv"),
    ("induction", "s2 inhibition", "kv"),
    ("duplicate token", "s2 inhibition", "kv"),
    ("s2 inhibition", "negative", "q"),
    ("s2 inhibition", "name mover", "q"),
    ("s2 inhibition", "backup name mover", "q"),
    ("negative", "OUTPUT", ""),
    ("name mover", "OUTPUT", ""),
    ("backup name mover", "OUTPUT", ""),
]

def ioi_edges():
    L = 12
    heads = [hd for g in IOI_CIRCUIT.values() for hd in g]
    assert len(heads) == 26
    writers = ["input"] + [head(l, h) for l, h in heads] + [f"m{l}" for l in range(L)]
    readers = [r for l, h in heads for r in head_inputs(l, h)] + [f"m{l}" for l in range(L)] + ["logits"]
    # 1. start from every edge among the kept nodes: heads outside the circuit are masked with
    #    all their edges (iterative_correspondence_from_mask).
    edges = {(w, r) for w in writers for r in readers if is_edge(w, r)}
    # 2. for every circuit head: drop input->head, head->head and head->logits.
    circuit_heads = {head(l, h) for l, h in heads}
    def dropped(w, r):
        r_is_head = r.startswith("a")
        if r_is_head and (w == "input" or w in circuit_heads):
            return True
        return r == "logits" and w in circuit_heads
    edges = {e for e in edges if not dropped(*e)}
    # 3. add the special connections; INPUT is the embedding plus every MLP output, OUTPUT the
    #    logits plus every MLP input; an edge is added only where the reader's layer is larger.
    for src, dst, letters in IOI_SPECIAL:
        if src == "INPUT":
            ws = ["input"] + [f"m{l}" for l in range(L)]
        else:
            ws = [head(l, h) for l, h in IOI_CIRCUIT[src]]
        if dst == "OUTPUT":
            rs = [("logits", 13)] + [(f"m{l}", l) for l in range(L)]
        else:
            rs = [(r, l) for l, h in IOI_CIRCUIT[dst] for r in head_inputs(l, h, letters)]
        for w in ws:
            for r, rl in rs:
                if rl > writer_layer(w):
                    assert is_edge(w, r)
                    edges.add((w, r))
    return edges

# ---------------------------------------------------------------- Greater-Than (GPT-2 small)
GT = {
    "0305": [(0, 3), (0, 5)],
    "01": [(0, 1)],
    "MEARLY": [(0, None), (1, None), (2, None), (3, None)],
    "AMID": [(5, 5), (6, 1), (6, 9), (7, 10), (8, 11), (9, 1)],
    "MLATE": [(8, None), (9, None), (10, None), (11, None)],
}
GT_PAIRS = [("01", "MEARLY"), ("01", "AMID"), ("0305", "AMID"), ("MEARLY", "AMID"), ("AMID", "MLATE")]

def out_node(l, h):
    return f"m{l}" if h is None else head(l, h)

def in_nodes(l, h):
    return [f"m{l}"] if h is None else head_inputs(l, h)

def gt_edges():
    edges = set()
    def add(w, r):
        assert is_edge(w, r), (w, r)
        edges.add((w, r))
    for g in ["0305", "01", "MEARLY"]:              # attach input
        for l, h in GT[g]:
            for r in in_nodes(l, h):
                add("input", r)
    for g in ["AMID", "MLATE"]:                     # attach output
        for l, h in GT[g]:
            add(out_node(l, h), "logits")
    for g, nodes in GT.items():                     # MLPs of one group are interconnected
        if nodes[0][1] is not None:
            continue
        for l1, _ in nodes:
            for l2, _ in nodes:
                if l1 < l2:
                    add(f"m{l1}", f"m{l2}")
    for g1, g2 in GT_PAIRS:                         # connected pairs
        for l1, h1 in GT[g1]:
            for l2, h2 in GT[g2]:
                if l1 >= l2 and not (l1 == l2 and h1 is not None and h2 is None):
                    continue
                for r in in_nodes(l2, h2):
                    add(out_node(l1, h1), r)
    max_amid = max(l for l, _ in GT["AMID"])        # all MLPs before the last AMID layer chained
    for s in range(0, max_amid):
        for r in range(s + 1, max_amid):
            add(f"m{s}", f"m{r}")
    for l, h in GT["AMID"]:                         # every earlier MLP -> AMID query
        for s in range(0, l):
            add(f"m{s}", f"a{l}.h{h}<q>")
    return edges

# ---------------------------------------------------------------- Docstring (attn-only 4L, 8 heads)
def docstring_edges():
    e = [
        ("a0.h5", "a1.h4<v>"), ("input", "a0.h5<v>"),
        ("input", "a2.h0<q>"), ("a0.h5", "a2.h0<q>"),
        ("input", "a2.h0<k>"), ("a0.h5", "a2.h0<k>"),
        ("a1.h4", "a2.h0<v>"), ("input", "a1.h4<v>"),
        ("input", "a1.h2<q>"), ("input", "a1.h2<k>"),
        ("a0.h5", "a1.h2<q>"), ("a0.h5", "a1.h2<k>"),
    ]
    for h in (0, 6):
        e += [
            (f"a3.h{h}", "logits"),
            ("a1.h4", f"a3.h{h}<q>"),
            ("input", f"a3.h{h}<v>"), ("a0.h5", f"a3.h{h}<v>"),
            ("a2.h0", f"a3.h{h}<k>"), ("a1.h2", f"a3.h{h}<k>"),
        ]
    for w, r in e:
        assert is_edge(w, r)
    assert len(set(e)) == len(e) == 24   # ACDC's 37 minus its 13 edges inside heads
    return set(e)

# ---------------------------------------------------------------- output
def sort_key(edge, n_heads):
    """eap's order: by writer index, then reader index (Graph::writer_index/reader_index)."""
    w, r = edge
    if w == "input":
        wi = 0
    elif w.startswith("a"):
        l, h = map(int, w[1:].split(".h"))
        wi = 1 + l * (n_heads + 1) + h
    else:
        wi = 1 + int(w[1:]) * (n_heads + 1) + n_heads
    if r == "logits":
        ri = 10**9
    elif r.startswith("a"):
        body, c = r[:-1].split("<")
        l, h = map(int, body[1:].split(".h"))
        ri = l * (3 * n_heads + 1) + "qkv".index(c) * n_heads + h
    else:
        ri = int(r[1:]) * (3 * n_heads + 1) + 3 * n_heads
    return (wi, ri)

HEADERS = {
    "ioi": """# IOI circuit of GPT-2 small (Wang et al. 2022), as ACDC encodes it for its ROC curves.
# Source: ArthurConmy/Automatic-Circuit-Discovery, acdc/ioi/utils.py, IOI_CIRCUIT and
# get_ioi_true_edges (snapshot bc99ace8). Translated by translate_acdc.py in this folder.
# Graph: Graph::new(12, 12, true). Edges: {n}.
# Translation: heads outside the 26 circuit heads are removed with all their edges; for circuit
# heads ACDC removes input->head, head->head and head->logits edges and then adds its 15
# "special connections" (INPUT = embedding and every MLP, OUTPUT = logits and every MLP input).
# As in ACDC's code, all MLP edges among kept nodes stay (MLP->MLP, input->MLP, MLP->logits,
# circuit head->later MLP, MLP->circuit head q/k/v). ACDC's head-internal q/k/v edges are dropped.
""",
    "greater_than": """# Greater-Than circuit of GPT-2 small (Hanna et al. 2023), as ACDC encodes it.
# Source: ArthurConmy/Automatic-Circuit-Discovery, acdc/greaterthan/utils.py, CIRCUIT and
# get_greaterthan_true_edges (snapshot bc99ace8). Translated by translate_acdc.py in this folder.
# Graph: Graph::new(12, 12, true). Edges: {n}.
# Groups: 0305 = a0.h3 a0.h5; 01 = a0.h1; MEARLY = m0-m3; AMID = a5.h5 a6.h1 a6.h9 a7.h10 a8.h11
# a9.h1; MLATE = m8-m11. ACDC's `X -> blocks.L.hook_q_input[H]` is our `X->aL.hH<q>`; its
# head-internal q/k/v edges are dropped.
""",
    "docstring": """# Docstring circuit of the 4-layer attention-only model (Heimersheim & Janiak 2023), as ACDC
# encodes it ("the manual graph, from Stefan").
# Source: ArthurConmy/Automatic-Circuit-Discovery, acdc/docstring/utils.py,
# get_docstring_subgraph_true_edges (snapshot bc99ace8). Translated by translate_acdc.py.
# Graph: Graph::new(4, 8, false). Edges: {n} (ACDC's 37 minus the 13 inside heads).
""",
}

if __name__ == "__main__":
    for name, edges, n_heads in [("ioi", ioi_edges(), 12), ("greater_than", gt_edges(), 12),
                                 ("docstring", docstring_edges(), 8)]:
        with open(f"{name}.txt", "w") as f:
            f.write(HEADERS[name].format(n=len(edges)))
            for w, r in sorted(edges, key=lambda e: sort_key(e, n_heads)):
                f.write(f"{w}->{r}\n")
        print(name, len(edges))
