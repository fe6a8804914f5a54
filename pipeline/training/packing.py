"""Padding-free DPO: a pair's chosen and rejected answers go through the model as one packed row.

TRL's batch holds 2B right-padded rows, prompt + chosen for each pair and then prompt + rejected, so the prompt
runs twice and every row is padded to the longest. Here each pair becomes one row:

- prefix sharing on:  [prompt | chosen | rejected], the prompt computed once and seen by both answers;
- prefix sharing off: [prompt + chosen | prompt + rejected], two sequences without padding between them.

Position ids restart per sequence (the rejected answer continues from the prompt's end, as in its own row), and a
block-diagonal causal mask stops attention crossing sequences: a prompt token sees the prompt, an answer token the
prompt and its own answer. The rows of a batch are padded only to the longest packed pair (pairs arrive sorted by
length). The hidden states are then laid back out as TRL's rows, so the LM head, the loss and the logging read
exactly what they read without packing: in exact arithmetic the same numbers (tests/test_packing.py: float32
rounding only, for Llama- and Qwen-family models).

On CPU the mask is a dense [B, 1, L, L] boolean tensor for SDPA (L: the longest packed pair, so it is small).
SDPA's CPU kernel cannot skip the blocks such a mask rules out, and attention grows as L^2: at 1024 tokens a
packed pair's masked attention cost 2.2x TRL's two causal rows and over half of a training step. So from
ROWS_FROM packed tokens on, the attention alone runs per sequence: queries, keys and values are gathered into
TRL's rows (the prompt's copied to both answers), causal SDPA skips the blocks above the diagonal, and each
packed position takes its output from the row it belongs to (`Packed.back`). Projections, MLPs and the head
still run on the packed tokens, where the saving is (not under torch.compile, which traces the masked path).

Where the model's attention is neither SDPA nor eager (flash attention, flex), a sequence is longer than the
model's sliding window (the custom mask would lift the window), or the batch is not TRL's plain
right-padded pair layout (left padding, `keep_end` truncation that cut prompts differently, extra inputs such as
token type ids), the batch runs unpacked, as TRL builds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASKS = ("sdpa", "eager")  # attention implementations that take a custom 4-D mask
ROWS_FROM = 512  # packed length from which SDPA attends per gathered row (causal) instead of under the dense mask
ROWS = "_twin_dpo_rows"  # the mask's attribute carrying (index, back) to the attention below


@dataclass
class Packed:
    input_ids: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, 1, L, L]: bool (SDPA) or additive float (eager)
    index: torch.Tensor  # [2B, T]: where TRL's row r, position t lives in the flattened packed [B * L] states
    back: torch.Tensor  # [B, L]: which flattened [2B * T] row position each packed position is computed in
    tokens: int  # real tokens in the packed batch (no padding)


def _lengths(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Tokens per row, or None unless every row is right-padded (ones, then zeros)."""
    n = attention_mask.sum(1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), positions.unsqueeze(0) < n.unsqueeze(1)):
        return None
    return n


def attention_window(config) -> int | None:
    """The sliding-window size of a model with sliding-window layers (Mistral, Gemma 2/3), else None. A custom
    4-D mask replaces the model's own masks, window included, so packing applies only to sequences that fit in it."""
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return None
    types = getattr(text, "layer_types", None)
    return int(window) if not types or "sliding_attention" in types else None


def plan(
    input_ids, attention_mask, labels, share_prefix: bool, implementation: str, dtype, window: int | None = None
) -> Packed | None:
    """The packed layout of TRL's concatenated [chosen rows; rejected rows] batch, or None to run it unpacked."""
    if implementation not in MASKS or attention_mask is None or input_ids.dim() != 2 or input_ids.shape[0] % 2:
        return None
    n = _lengths(attention_mask)
    if n is None or (window is not None and int(n.max()) > window):
        return None
    pairs = input_ids.shape[0] // 2
    labelled = labels != -100
    width = input_ids.shape[1]
    first = torch.where(labelled.any(1), labelled.float().argmax(1), n)  # first completion position per row
    rows, n_list, first_list = input_ids.tolist(), n.tolist(), first.tolist()
    layouts = []  # per pair: (token ids, position ids, segment ids, chosen positions, rejected positions)
    for i in range(pairs):
        nc, nr = n_list[i], n_list[pairs + i]
        p = min(first_list[i], first_list[pairs + i]) if share_prefix else 0
        if share_prefix and rows[i][:p] != rows[pairs + i][:p]:
            return None  # the two rows do not start with the same prompt (keep_end truncation cut them apart)
        chosen, rejected = rows[i][:nc], rows[pairs + i][p:nr]
        ids = chosen + rejected
        pos = list(range(nc)) + list(range(p, nr))
        seg = [0] * p + [1] * (nc - p) + [2] * (nr - p)
        at_chosen = list(range(nc))
        at_rejected = list(range(p)) + list(range(nc, nc + nr - p))
        layouts.append((ids, pos, seg, at_chosen, at_rejected))
    length = max(len(lay[0]) for lay in layouts)
    device = input_ids.device
    ids = torch.zeros(pairs, length, dtype=input_ids.dtype)
    pos = torch.zeros(pairs, length, dtype=torch.long)
    seg = torch.full((pairs, length), -1, dtype=torch.long)
    index = torch.zeros(2 * pairs, width, dtype=torch.long)
    back = torch.zeros(pairs, length, dtype=torch.long)  # padding: the chosen row's first position (never read)
    for i, (t, q, s, at_c, at_r) in enumerate(layouts):
        ids[i, : len(t)] = torch.tensor(t, dtype=input_ids.dtype)
        pos[i, : len(q)] = torch.tensor(q)
        seg[i, : len(s)] = torch.tensor(s)
        index[i, : len(at_c)] = torch.tensor(at_c) + i * length
        index[pairs + i, : len(at_r)] = torch.tensor(at_r) + i * length
        back[i] = i * width
        back[i, : len(at_c)] = torch.arange(len(at_c)) + i * width  # prompt and chosen answer: the chosen row
        start = len(at_r) - (len(t) - len(at_c))  # the rejected answer's first position in its own row
        back[i, len(at_c) : len(t)] = torch.arange(start, len(at_r)) + (pairs + i) * width
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    q_seg, k_seg = seg.unsqueeze(2), seg.unsqueeze(1)
    # an answer token sees the shared prompt (segment 0) and its own sequence; padding sees only itself, so no
    # softmax row is empty (an empty row is NaN, and NaN times a zero gradient is still NaN)
    allowed = causal & ((q_seg == k_seg) & (q_seg >= 0) | (k_seg == 0) & (q_seg > 0))
    allowed |= torch.eye(length, dtype=torch.bool)
    mask = allowed.unsqueeze(1)
    if implementation == "eager":
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    mask = mask.to(device)
    index, back = index.to(device), back.to(device)
    if implementation == "sdpa" and length >= ROWS_FROM:
        _install_rows_attention()
        setattr(mask, ROWS, (index, back))
    return Packed(ids.to(device), pos.to(device), mask, index, back, int(sum(len(lay[0]) for lay in layouts)))


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] packed per-head states -> [2B, H, T, D] in TRL's rows."""
    b, h, length, d = x.shape
    flat = x.transpose(1, 2).reshape(b * length, h, d)
    return flat[index.reshape(-1)].reshape(*index.shape, h, d).transpose(1, 2)


def _install_rows_attention() -> None:
    """Route transformers' "sdpa" attention through `rows_attention` for masks that carry a row layout; every
    other call (generation, unpacked batches, short packed rows, other models) reaches SDPA unchanged."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(sdpa, ROWS, False):
        return

    def rows_attention(module, query, key, value, attention_mask, **kwargs):
        layout = None if torch.compiler.is_compiling() else getattr(attention_mask, ROWS, None)
        if layout is None or kwargs.get("is_causal") is False:
            return sdpa(module, query, key, value, attention_mask, **kwargs)
        index, back = layout
        out, weights = sdpa(module, _rows(query, index), _rows(key, index), _rows(value, index), None, **kwargs)
        # out: [2B, T, H, D]; each packed position reads its own row's output
        flat = out.reshape(-1, *out.shape[2:])
        return flat[back.reshape(-1)].reshape(*back.shape, *out.shape[2:]), weights

    setattr(rows_attention, ROWS, True)
    ALL_ATTENTION_FUNCTIONS["sdpa"] = rows_attention


def unpack(hidden: torch.Tensor, packed: Packed) -> torch.Tensor:
    """The packed [B, L, H] states laid out as TRL's [2B, T, H] rows (padding positions hold a copy of some state:
    they carry no label, so the head never reads them and no gradient reaches them)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat[packed.index.reshape(-1)].reshape(*packed.index.shape, hidden.shape[-1])
