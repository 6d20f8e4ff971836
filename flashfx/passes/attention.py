"""The attention pass: every attention it can prove equivalent becomes one `torch.ops.flashfx.attention` node.

Runs on the canonical torch-level graph (after `flashfx.rewriter.canonicalize`). Recognised forms (the FORMS table):

- explicit: `q @ kᵀ` → scale (a constant multiply before/after the matmul, or folded into q or k) → masks
  (additive float bias, `masked_fill(m, -inf)`, `where(c, s, -inf)`; causal masks built in the graph become
  `is_causal=True`) → softmax over the last dim (optionally upcast to float32 and cast back) → dropout (vanishes
  in eval or at p=0) → `@ v`. The score ops between the matmul and the softmax come from the SCORE_OPS table, the
  probability ops between the softmax and `@ v` from the PROB_OPS table: one pattern, variants from tables.
- sdpa: `F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)`.
- mha: `F.multi_head_attention_forward` as Dynamo records `nn.MultiheadAttention` / `nn.TransformerEncoderLayer`
  (packed or separate in-projections, cross-attention, key_padding_mask / attn_mask / is_causal, dropout; not
  bias_k/bias_v, add_zero_attn, or used attention weights): split into projections + the op + out-projection.

K/V repeated for grouped-query attention (`repeat_kv`: unsqueeze → expand → reshape / flatten, or
`repeat_interleave` on the head dim) are passed un-repeated: the op reads kv head h // (Hq // Hkv), never
materialising the repeat. Masks are made cheap to read: a causal mask built in the graph (arange comparisons,
tril/triu) becomes `is_causal=True`, and a bool AND-tree (HF's `causal & padding`, expanded to [B, 1, L, S]) becomes
is_causal plus its small terms ([B, 1, 1, S]); all-true terms are dropped.

Where the parts live: the form readers (`_match_*`, SCORE_OPS, PROB_OPS, `Site`, `Decline`) in
`attention_forms.py`, the mask proofs (causal masks, AND-tree splitting) in `attention_masks.py`; this file checks
and prepares a matched site, un-repeats K/V, emits the op and runs the pass.

Decisions (also in flashfx/passes/README.md):
- Rows whose every key is masked: the op outputs 0. Eager softmax gives NaN there with -inf masks (SDPA gives 0),
  so -inf masks are rewritten and the site gets a note. A *finite* fill (`masked_fill(m, -1e9)`) makes eager
  average V on such rows, so it is rewritten only when the mask is proven causal (no row is fully masked),
  otherwise declined. Fill values at or below -1e4 count as "masked" (their exp underflows to 0 next to any
  score within ~1e4 of the row max). A float additive bias is passed through unchanged; the op reads values
  below -1e38 (HF's fp32/bf16 finfo.min masks) as -inf, so a row masked that way everywhere (left padding) gives
  0 where eager averages V, as HF's own sdpa path does: rewritten, with a note.
- Dropout in training (p > 0) becomes the op's dropout_p: the same distribution, a different random stream.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List, Optional, Tuple

import sympy
import torch
import torch.fx as fx

from flashfx.passes.attention_forms import (MHA_FUNCTIONS, SDPA_FUNCTIONS, Decline, Site, _match_explicit, _match_mha,
                                            _match_sdpa)
from flashfx.passes.attention_masks import (_is_causal_mask, _last_two, _only_new_dims, _simplify_attend,
                                            _split_float)
from flashfx.rewriter import cost as cost_model
from flashfx.rewriter.capture import name_symbols
from flashfx.rewriter.matcher import (arg, erase_dead, insert_node, is_call, normalize_dim, same_shape, same_size,
                                      tensor, written_in_place)
from flashfx.rewriter.pass_manager import PassContext, PassResult

PASS = "attention"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------------- small predicates

def _broadcastable(mask: torch.Tensor, target: torch.Size) -> bool:
    if mask.dim() > len(target):
        return False
    return all(same_size(m, 1) or same_size(m, t) for m, t in zip(reversed(mask.shape), reversed(target)))


# -------------------------------------------------------------------------------------- nn.MultiheadAttention

def _emit_mha(graph: fx.Graph, node: fx.Node, a: Dict[str, Any], op: Any) -> Tuple[fx.Node, Site]:
    """query [L, N, E] → packed projections → [N, H, L, hd] → op → [L, N, E] → out projection.

    Masks follow multi_head_attention_forward: bool masks are True where attention is *not* allowed, float masks
    are added; key_padding_mask is [N, S], attn_mask [L, S] or [N * H, L, S]. With is_causal, no key padding mask
    and need_weights=False it runs SDPA with is_causal=True and ignores attn_mask's contents: so does the rewrite.
    """
    qt = tensor(a["query"])
    E = qt.shape[-1]
    H = int(a["num_heads"])
    if not isinstance(E, int) or E % H:
        raise Decline(node, f"embed dim {E} is not a static multiple of num_heads {H}")
    if qt.dtype not in SUPPORTED_DTYPES:
        raise Decline(node, f"query dtype {qt.dtype} is not float16/bfloat16/float32")
    hd = E // H
    dropout_p = float(a["dropout_p"]) if a["training"] else 0.0

    def call(target: Any, *args: Any, method: bool = False, **kwargs: Any) -> fx.Node:
        return insert_node(graph, "call_method" if method else "call_function", target, args, kwargs, meta_from=node)

    with graph.inserting_before(node):
        if a["use_separate_proj_weight"]:  # nn.MultiheadAttention(kdim=..., vdim=...)
            ws = [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]]
        else:
            w_chunks = call(torch.chunk, a["in_proj_weight"], 3)
            ws = [call(operator.getitem, w_chunks, i) for i in range(3)]
        b_chunks = call(torch.chunk, a["in_proj_bias"], 3) if a["in_proj_bias"] is not None else None
        heads = []
        for i, x in enumerate((a["query"], a["key"], a["value"])):
            w = ws[i]
            b = call(operator.getitem, b_chunks, i) if b_chunks is not None else None
            proj = call(torch._C._nn.linear, x, w, b)  # [T, N, E]
            split = call(torch.unflatten, proj, -1, (H, hd))  # [T, N, H, hd]; no symbolic sizes in the graph
            heads.append(call(torch.permute, split, (1, 2, 0, 3)))  # [N, H, T, hd]
        q, k, v = heads
        site = Site("mha", node, q, k, v, scale=None, dropout_p=dropout_p, nodes=[node])
        kpm, mask = a["key_padding_mask"], a["attn_mask"]
        if a["is_causal"] and kpm is None and not a["need_weights"]:
            site.is_causal, mask = True, None
        if kpm is not None:  # [N, S] -> [N, 1, 1, S], a view
            view = call(operator.getitem, kpm, (slice(None), None, None, slice(None)))
            site.masks.append(("masked" if tensor(kpm).dtype == torch.bool else "float", view))
        if mask is not None:
            if tensor(mask).dim() == 3:  # [N * H, L, S] -> [N, H, L, S]
                mask = call(torch.unflatten, mask, 0, (-1, H))
            site.masks.append(("masked" if tensor(mask).dtype == torch.bool else "float", mask))
        _check_and_prepare(site)
        out = _emit(graph, site, op)  # [N, H, L, hd]
        merged = call(torch.flatten, call(torch.permute, out, (2, 0, 1, 3)), 2)  # [L, N, E]
        result = call(torch._C._nn.linear, merged, a["out_proj_weight"], a["out_proj_bias"])
    if dropout_p:
        site.notes.append(f"nn.MultiheadAttention dropout p={dropout_p} kept (the op draws its own random stream)")
    return result, site


# ------------------------------------------------------------------------------------------- K/V un-repeat

def _unrepeat(node: Any) -> Optional[Tuple[fx.Node, int, List[fx.Node]]]:
    """(kv, n_rep, nodes) when `node` is kv [B, Hkv, S, D] repeated n_rep times per head on dim 1 (repeat_kv order)."""
    t = tensor(node)
    if t is None or t.dim() != 4:
        return None
    if is_call(node, (torch.repeat_interleave,), ("repeat_interleave",)):
        src, reps, dim = arg(node, 0, "input"), arg(node, 1, "repeats"), arg(node, 2, "dim")
        if isinstance(reps, int) and normalize_dim(dim, 4) == 1 and tensor(src) is not None and tensor(src).dim() == 4:
            return src, reps, [node]
        return None
    if is_call(node, (torch.flatten,), ("flatten",)):
        dims = (arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1))
        if tuple(normalize_dim(d, 5) for d in dims) != (1, 2):
            return None
    elif not is_call(node, (torch.reshape,), ("reshape", "view")):
        return None
    expanded = node.args[0]
    if not is_call(expanded, (), ("expand",)) or tensor(expanded) is None or tensor(expanded).dim() != 5:
        return None
    unsq = expanded.args[0]
    u = tensor(unsq)
    if u is None or u.dim() != 5 or not same_size(u.shape[2], 1):
        return None
    if is_call(unsq, (operator.getitem,)):  # x[:, :, None], x[:, :, None, :, :], x[:, :, None, ...]
        index = unsq.args[1]
        ok = (isinstance(index, tuple) and len(index) >= 3 and index[:3] == (slice(None), slice(None), None)
              and _only_new_dims(index[3:]) and None not in index[3:])
    else:
        ok = is_call(unsq, (torch.unsqueeze,), ("unsqueeze",)) and normalize_dim(unsq.args[1], 5) == 2
    src = unsq.args[0]
    s, e = tensor(src), tensor(expanded)
    if not ok or s is None or s.dim() != 4:
        return None
    n_rep = e.shape[2]
    if not isinstance(n_rep, int):
        return None
    kept = [e.shape[i] for i in (0, 1, 3, 4)]
    merged = [s.shape[0], s.shape[1] * n_rep, s.shape[2], s.shape[3]]
    if not same_shape(kept, s.shape) or not same_shape(t.shape, merged):  # exactly dims 1 and 2 merged
        return None
    return src, n_rep, [node, expanded, unsq]


# ------------------------------------------------------------------------------------------- K/V cache copy

def _skip_empty_cat(node: Any) -> Optional[Tuple[fx.Node, fx.Node]]:
    """(tensor, cat) when `node` is `cat([empty, ..., tensor])`: one operand, the others empty, the same dtype and
    shape out as in, and no in-place write to that tensor's memory anywhere in the graph. Hugging Face builds a KV
    cache in every forward unless `use_cache=False`; its first update concatenates the keys and values onto an empty
    tensor, a full copy of each (and in training a slice and a copy back in the backward). The op reads any strides,
    so it reads the operand itself."""
    if not is_call(node, (torch.cat, torch.concat, torch.concatenate), ("cat",)):
        return None
    parts = arg(node, 0, "tensors")
    if not isinstance(parts, (list, tuple)) or not all(isinstance(p, fx.Node) for p in parts):
        return None
    full = [p for p in parts if tensor(p) is None or not _statically_empty(tensor(p))]
    if len(full) != 1:
        return None
    src, out = tensor(full[0]), tensor(node)
    if src is None or out is None or src.dtype != out.dtype or not same_shape(src.shape, out.shape):
        return None
    return None if written_in_place(full[0]) else (full[0], node)


def _statically_empty(t: torch.Tensor) -> bool:
    return any(isinstance(d, int) and d == 0 for d in t.shape)


# ----------------------------------------------------------------------------------------------- emitting

def _attention_op() -> Any:
    import flashfx.ops  # noqa: F401  (registers torch.ops.flashfx.*)

    ns = torch.ops.flashfx
    return ns.attention.default if hasattr(ns, "attention") else None


def _check_and_prepare(site: Site) -> None:
    """Shapes, dtypes, GQA and masks of a matched site (proven-causal masks become is_causal), else Decline."""
    qt, vt = tensor(site.q), tensor(site.v)
    kt = tensor(site.k[1] if isinstance(site.k, tuple) else site.k)
    if qt is None or kt is None or vt is None:
        raise Decline(site.out, "q, k or v has no shape metadata")
    if isinstance(site.k, tuple):  # k = kᵀ with its last two dims swapped
        dims = site.k[2]
        if len(dims) != kt.dim():
            raise Decline(site.out, "kᵀ is not a permutation of k")
        k_t_shape = [kt.shape[d] for d in dims]
        k_shape = (*k_t_shape[:-2], k_t_shape[-1], k_t_shape[-2])
    else:
        k_shape = tuple(kt.shape)
    if qt.dtype not in SUPPORTED_DTYPES or not (qt.dtype == kt.dtype == vt.dtype):
        raise Decline(site.out, f"q/k/v dtypes {qt.dtype}/{kt.dtype}/{vt.dtype}: the op needs one of "
                                f"float16/bfloat16/float32 for all three")
    out = tensor(site.out) if site.form != "mha" else None
    if out is not None and out.dtype != qt.dtype:
        raise Decline(site.out, f"the attention output is {out.dtype} but q is {qt.dtype}")
    if not (qt.dim() == len(k_shape) == vt.dim()) or qt.dim() not in (2, 3, 4):
        raise Decline(site.out, f"q/k/v of ranks {qt.dim()}/{len(k_shape)}/{vt.dim()}: the op takes "
                                "[B, H, L, D] (or [B, L, D], [L, D])")
    if not same_size(qt.shape[-1], k_shape[-1]) or not same_size(vt.shape[-1], qt.shape[-1]):
        raise Decline(site.out, "q, k and v head dims differ")
    if not same_size(k_shape[-2], vt.shape[-2]):
        raise Decline(site.out, "k and v sequence lengths differ")
    if qt.dim() > 2 and (not same_size(qt.shape[0], k_shape[0]) or not same_size(qt.shape[0], vt.shape[0])):
        raise Decline(site.out, "q and k/v batch sizes differ (broadcast batch dims are not supported)")
    if qt.dim() == 4:
        hq, hk, hv = qt.shape[1], k_shape[1], vt.shape[1]
        if not same_size(hk, hv) or not isinstance(hq, int) or not isinstance(hk, int) or hk == 0 or hq % hk:
            raise Decline(site.out, f"head counts q={hq} k={hk} v={hv} are not grouped-query compatible")
    L, S = qt.shape[-2], k_shape[-2]
    target = torch.Size([*qt.shape[:-2], L, S])
    site.masks = [_undo_negation(kind, mask) for kind, mask in site.masks]
    for kind, mask in site.masks:
        m = tensor(mask)
        if m is None or not _broadcastable(m, target):
            raise Decline(site.out, f"mask {getattr(mask, 'name', mask)} of shape "
                                    f"{tuple(m.shape) if m is not None else '?'} does not broadcast to the scores")
    # causal masks built in the graph become is_causal (saves reading the mask, and the kernel skips tiles)
    if same_size(L, S):
        kept = []
        for kind, mask in site.masks:
            full = tensor(mask) is not None and same_shape(_last_two(tensor(mask)), (L, S))
            if not site.is_causal and full and _is_causal_mask(kind.replace("_finite", ""), mask):
                site.is_causal = True
                site.notes.append(f"mask {mask.name} proven causal: is_causal=True, the mask is not read")
            else:
                kept.append((kind, mask))
        site.masks = kept
    # bool AND-trees (HF: causal & padding, expanded to [B, 1, L, S]): read only the small terms
    kept, from_float = [], set()
    for kind, mask in site.masks:
        if kind == "float":  # HF eager's where(causal & padding, 0, finfo.min): the same split, read as bool
            terms = _split_float(mask, L, S, same_size(L, S) and not site.is_causal)
            if terms is not None and all(tensor(t) is not None and _broadcastable(tensor(t), target) for t in terms):
                site.is_causal = True
                kept += [("attend", t) for t in terms]
                from_float.update(terms)
                site.notes.append(f"bias {mask.name} = causal & {len(terms)} key-only term(s) (its fill reads as -inf "
                                  f"in the op): the kernel reads {', '.join(t.name for t in terms) or 'no mask'}; "
                                  "a row with every key masked gives 0, where eager averages V")
                continue
        simpler = _simplify_attend(mask, L, S, same_size(L, S) and not site.is_causal) if kind == "attend" else None
        if simpler is None or not all(tensor(t) is not None and _broadcastable(tensor(t), target)
                                      for t in simpler[1]):
            kept.append((kind, mask))
            continue
        causal, terms = simpler
        site.is_causal = site.is_causal or causal
        kept += [("attend", t) for t in terms]
        site.notes.append(f"mask {mask.name} = {'causal & ' if causal else ''}{len(terms)} smaller term(s): the kernel "
                          f"reads {', '.join(t.name for t in terms) or 'no mask'}")
    site.masks = kept
    for kind, mask in site.masks:
        if kind.endswith("_finite"):
            raise Decline(site.out, f"mask {mask.name} fills with a finite value: rows with every key masked would "
                                    "average V in eager but give 0 in the fused op, and no row is proven unmasked")
        if kind in ("masked", "attend") and site.form == "explicit" and mask not in from_float:
            site.notes.append(f"mask {mask.name}: rows with every key masked give 0 (eager gives NaN with -inf)")
        if kind == "float" and site.form == "explicit":
            site.notes.append(f"bias {mask.name}: a row whose every bias value is below -1e38 (finfo.min masks) "
                              "gives 0, where eager averages V (HF's sdpa path gives 0 too)")


def _undo_negation(kind: str, mask: Any) -> Tuple[str, Any]:
    """("masked", ~m) is ("attend", m): the op wants True = attend, and m may simplify further."""
    negated = is_call(mask, (torch.logical_not, operator.invert), ("logical_not", "__invert__"))
    if kind.startswith("masked") and negated and tensor(mask.args[0]) is not None \
            and tensor(mask.args[0]).dtype == torch.bool:
        return kind.replace("masked", "attend"), mask.args[0]
    return kind, mask


def _emit(graph: fx.Graph, site: Site, op: Any) -> fx.Node:
    def call(target: Any, *args: Any, method: bool = False, **kwargs: Any) -> fx.Node:
        return insert_node(graph, "call_method" if method else "call_function", target, args, kwargs,
                           meta_from=site.out)

    with graph.inserting_before(site.out):
        q, v = site.q, site.v
        if isinstance(site.k, tuple):  # k = permute(src, dims ∘ swap): one view, none at all when it is identity
            _, src, dims = site.k
            n = len(dims)
            swap = (*range(n - 2), n - 1, n - 2)
            k_dims = tuple(dims[d] for d in swap)
            k = src if k_dims == tuple(range(n)) else call(torch.permute, src, k_dims)
        else:
            k = site.k
        ku, vu = _unrepeat(k), _unrepeat(v)
        if ku is not None and vu is not None and ku[1] == vu[1] and same_shape(tensor(ku[0]).shape,
                                                                                 tensor(vu[0]).shape):
            k, v = ku[0], vu[0]
            site.nodes += ku[2] + vu[2]
            site.notes.append(f"grouped-query attention: K/V repeated {ku[1]}x are read un-repeated")
        k_cat, v_cat = _skip_empty_cat(k), _skip_empty_cat(v)
        if k_cat is not None and v_cat is not None:
            (k, kc), (v, vc) = k_cat, v_cat
            site.nodes += [kc, vc]
            site.cache_copies_skipped = 2
            site.notes.append("K/V concatenated onto an empty cache: read directly, the copies skipped")
        bias = _combine_masks(site, call)
        rank = tensor(q).dim()
        if rank == 3:  # [B, L, D] -> [B, 1, L, D], views
            q, k, v = (call(torch.unsqueeze, x, 1) for x in (q, k, v))
            if bias is not None and tensor(bias).dim() == 3:
                bias = call(torch.unsqueeze, bias, 1)
        elif rank == 2:  # [L, D] -> [1, 1, L, D]; a bias of rank <= 2 broadcasts as it is
            q, k, v = (call(torch.unsqueeze, call(torch.unsqueeze, x, 0), 0) for x in (q, k, v))
        out = call(op, q, k, v, bias, site.is_causal, site.scale, site.dropout_p)
        if rank < 4:
            out = call(torch.squeeze, out, 1) if rank == 3 else call(torch.squeeze, out, (0, 1))
    return out


def _combine_masks(site: Site, call: Callable[..., fx.Node]) -> Optional[fx.Node]:
    """One op bias from the site's masks: a float additive bias, or a bool attend-mask."""
    if site.masks and all(kind == "attend" for kind, _ in site.masks):  # several bool masks: one AND
        total = site.masks[0][1]
        for _, mask in site.masks[1:]:
            total = call(torch.logical_and, total, mask)
        return total
    terms = []
    for kind, mask in site.masks:
        kind = kind.replace("_finite", "")
        if kind == "masked":  # the op wants True = attend (a `~m` was already undone when preparing)
            mask = call(torch.logical_not, mask)
            kind = "attend"
        terms.append((kind, mask))
    if not terms:
        return None
    if len(terms) == 1:
        return terms[0][1]
    # several masks: sum them as float biases (this materialises their broadcast; noted)
    total = None
    for kind, mask in terms:
        if kind == "attend":
            mask = call(torch.where, mask, 0.0, float("-inf"))
        total = mask if total is None else call(operator.add, total, mask)
    site.notes.append(f"{len(terms)} masks summed into one float bias (materialised at their broadcast shape)")
    return total


# ----------------------------------------------------------------------------------------------- the pass

# form -> (the functions its anchor node calls, matcher(anchor) -> Site | MHA arguments | None, or raises Decline)
FORMS: Dict[str, Tuple[Tuple[Any, ...], Callable[[fx.Node], Any]]] = {
    "explicit": ((torch.softmax,), _match_explicit),
    "sdpa": (SDPA_FUNCTIONS, _match_sdpa),
    "mha": (MHA_FUNCTIONS, _match_mha),
}


def attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Replace every provable attention in `gm` by `torch.ops.flashfx.attention` (counts `attention.replaced`)."""
    if getattr(ctx.config, "attention", "exact") == "off":
        return PassResult(gm, False)
    graph = gm.graph
    op = None
    changed = False
    totals = [sympy.Integer(0), sympy.Integer(0)]  # HBM bytes of the replaced sites before / after
    sites = 0
    for node in list(graph.nodes):
        if getattr(node, "_erased", False) or node.op not in ("call_function", "call_method"):
            continue
        form = next((name for name, (anchor, _) in FORMS.items() if is_call(node, anchor)), None)
        if form is None:
            continue
        try:
            site = FORMS[form][1](node)
            if site is None:
                continue
            op = op or _attention_op()
            if op is None:
                raise Decline(node, "torch.ops.flashfx.attention is not registered (flashfx.ops failed to import)")
            before = _bytes(gm, site.nodes if isinstance(site, Site) else [node])
            if isinstance(site, Site):
                _check_and_prepare(site)
            existing = set(graph.nodes)
            try:
                if isinstance(site, dict):  # nn.MultiheadAttention: rebuilt from its arguments
                    new, site = _emit_mha(graph, node, site, op)
                else:
                    new = _emit(graph, site, op)
            except Exception:
                _erase_new(graph, existing)  # leave the graph exactly as it was
                raise
            if site.form == "mha":
                for user in list(node.users):
                    if user.args[1] == 0:
                        user.replace_all_uses_with(new)
                    graph.erase_node(user)
            else:
                site.out.replace_all_uses_with(new)
        except Decline as d:
            ctx.decline(PASS, d.node if isinstance(d.node, fx.Node) else node, d.reason)
            continue
        except Exception as e:  # a graph the matcher does not understand: never crash the compile
            ctx.decline(PASS, node, f"could not rewrite ({type(e).__name__}: {e})")
            continue
        erase_dead(graph, [site.out, *site.nodes])
        changed = True
        ctx.count(f"{PASS}.replaced")
        ctx.count(f"{PASS}.{site.form}")
        if site.cache_copies_skipped:
            ctx.count(f"{PASS}.cache_copies_skipped", site.cache_copies_skipped)
        after = _bytes(gm, [new])
        totals[0] += before
        totals[1] += after
        sites += 1
        names = name_symbols(gm)
        ctx.notes.append(f"{new.name} ({site.form}{', causal' if site.is_causal else ''}): HBM bytes "
                         f"{before.subs(names)} -> {after.subs(names)}" + "".join(f"; {n}" for n in site.notes))
    if changed:
        names = name_symbols(gm)
        ctx.notes.insert(0, f"attention: {sites} site(s), HBM bytes "
                            f"{sympy.simplify(totals[0]).subs(names)} -> {sympy.simplify(totals[1]).subs(names)} "
                            "(each node of the matched chains run as its own kernel, vs the fused op)")
        graph.lint()
        gm.recompile()
    return PassResult(gm, changed)


def _erase_new(graph: fx.Graph, existing: set) -> None:
    for n in reversed(list(graph.nodes)):
        if n not in existing and not n.users:
            graph.erase_node(n)


def _bytes(gm: fx.GraphModule, nodes: List[fx.Node]) -> Any:
    """HBM bytes of running `nodes` each as its own kernel (the cost model), a sympy expression."""
    total = sympy.Integer(0)
    for n in nodes:
        if n.graph is gm.graph:
            total += cost_model.node_cost(n, gm).hbm_bytes
    return sympy.simplify(total)
