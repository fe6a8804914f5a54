"""Preference and SFT data: reading files / Hub sets / the embedded set, row validation, the chat template,
length checks and length-grouped order; the fixed questions; assets/ (the embedded preference set)."""

from pipeline.data.pairs import ROLES, Pair, load_pairs, load_splits, parse_pairs
from pipeline.data.read import EMBEDDED, read_rows
from pipeline.data.template import LengthReport, check_lengths, grouped_order, messages, render_prompt, templated

__all__ = [
    "EMBEDDED",
    "ROLES",
    "LengthReport",
    "Pair",
    "check_lengths",
    "grouped_order",
    "load_pairs",
    "load_splits",
    "messages",
    "parse_pairs",
    "read_rows",
    "render_prompt",
    "templated",
]
