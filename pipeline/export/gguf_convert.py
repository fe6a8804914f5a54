"""Hugging Face folder -> GGUF for the Llama and Qwen2 families, offline, on top of the `gguf` package.

No llama.cpp checkout, download or compiler: tensors are renamed with gguf's
own name map, Llama's q/k projections are permuted into the rotary layout
llama.cpp uses, and the byte-level BPE tokenizer goes in with its merges,
token types, special ids and chat template. F16 and Q8_0 are written here
(`gguf.quants`); K-quants come from llama.cpp's quantizer (export/orchestrate.py).
Every file is checked by the export's proofs, not trusted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file
from transformers import AutoTokenizer

from pipeline.errors import UserError

SUPPORTED = ("llama", "qwen2")
# llama.cpp pre-tokenizer names for byte-level BPE vocabularies, tried in this order until one tokenizes
# the probe texts exactly like the Hugging Face tokenizer (export/proofs.py: pick_pre_tokenizer).
PRE_CANDIDATES = (
    "smollm",
    "qwen2",
    "llama-bpe",
    "gpt-2",
    "default",
    "deepseek-llm",
    "deepseek-coder",
    "starcoder",
    "falcon",
    "gpt-4o",
    "tekken",
    "olmo",
    "refact",
    "command-r",
)
FAMILY_PRE = {"qwen2": "qwen2"}  # the guess when no tokenizer probe can run


@dataclass
class Converted:
    path: Path
    arch: str
    tensors: int
    outtype: str
    pre: str


def check_architecture(config: dict[str, Any]) -> str:
    """The model type, if this converter writes it; else one line naming it and what is supported."""
    model_type = config.get("model_type", "?")
    if model_type not in SUPPORTED:
        raise UserError(
            f"GGUF export: architecture '{model_type}' is not supported; twin-dpo converts {', '.join(SUPPORTED)}; "
            "export without GGUF with --set export.formats=adapter,merged"
        )
    return model_type


def _rope_theta(config: dict[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ("default", None):
        raise UserError(f"GGUF export: rope scaling '{kind}' is not supported by twin-dpo's converter")
    return float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)


def permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from HF's half-split rotary layout to llama.cpp's interleaved pairs.

    HF rotates (x[i], x[i + d/2]); GGML's normal rope rotates (x[2i], x[2i + 1]). For each head, rows
    [0..d/2) and [d/2..d) become pairs: new row 2i = old row i, new row 2i+1 = old row i + d/2.
    """
    rows = weight.shape[0]
    head_dim = rows // n_head
    return weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# ------------------------------------------------------------------ tokenizer


def tokenizer_fields(folder: Path) -> dict[str, Any]:
    """Tokens, types, merges, special ids and chat template of a byte-level BPE tokenizer."""
    spec_path = folder / "tokenizer.json"
    if not spec_path.is_file():
        raise UserError(
            f"GGUF export: {folder} has no tokenizer.json; only fast byte-level BPE tokenizers are supported"
        )
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(
            f"GGUF export: tokenizer model '{model.get('type')}' is not supported; twin-dpo writes byte-level BPE "
            "(gpt2) vocabularies"
        )
    tok = AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    vocab = tok.get_vocab()
    size = max(int(config.get("vocab_size", 0)), max(vocab.values()) + 1)
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    added = {i: a for i, a in tok.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        elif i in added:
            tokens.append(by_id[i])
            types.append(3 if added[i].special else 4)  # CONTROL / USER_DEFINED
        else:
            tokens.append(by_id[i])
            types.append(1)  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tok("a", add_special_tokens=True)["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "pad": tok.pad_token_id,
        "unk": tok.unk_token_id,
        "add_bos": len(probe) > len(plain) and probe[0] == tok.bos_token_id,
        "chat_template": tok.chat_template,
    }


def _write_tokenizer(writer, fields: dict[str, Any], pre: str) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    for key, adder in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("pad", writer.add_pad_token_id),
        ("unk", writer.add_unk_token_id),
    ):
        if fields[key] is not None:
            adder(fields[key])
    writer.add_add_bos_token(bool(fields["add_bos"]))
    if fields["chat_template"]:
        writer.add_chat_template(fields["chat_template"])


def write_vocab_only(folder: Path, out: Path, pre: str, fields: dict[str, Any] | None = None) -> Path:
    """A GGUF holding only metadata and the tokenizer: enough for llama.cpp to tokenize (vocab_only)."""
    config = json.loads((folder / "config.json").read_text())
    writer = gguf.GGUFWriter(str(out), check_architecture(config))
    _write_hparams(writer, config)
    _write_tokenizer(writer, fields or tokenizer_fields(folder), pre)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# ------------------------------------------------------------------ weights


def _write_hparams(writer, config: dict[str, Any]) -> None:
    n_head = config["num_attention_heads"]
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // n_head
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(int(config["vocab_size"]))


def _load_tensors(folder: Path) -> dict[str, np.ndarray]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"GGUF export: {folder} holds no safetensors weights")
    out = {}
    for f in files:
        for name, tensor in load_file(str(f)).items():
            out[name] = tensor.float().numpy()
    return out


def convert(
    folder: Path, out: Path, outtype: str = "f16", pre: str | None = None, fields: dict[str, Any] | None = None
) -> Converted:
    """Write `out` (F16 or Q8_0) from the merged model folder."""
    config = json.loads((folder / "config.json").read_text())
    arch = check_architecture(config)
    model_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]
    n_layer = config["num_hidden_layers"]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    names = gguf.get_tensor_name_map(model_arch, n_layer)
    fields = fields or tokenizer_fields(folder)
    pre = pre or FAMILY_PRE.get(arch, "gpt-2")

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(config.get("_name_or_path") or folder.name)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hparams(writer, config)
    _write_tokenizer(writer, fields, pre)

    tensors = _load_tensors(folder)
    tied = config.get("tie_word_embeddings", False)
    count = 0
    for hf_name, data in tensors.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"GGUF export: no GGUF name for tensor '{hf_name}' of a {arch} model")
        if arch == "llama":
            if hf_name.endswith("q_proj.weight"):
                data = permute_rotary(data, n_head)
            elif hf_name.endswith("k_proj.weight"):
                data = permute_rotary(data, n_kv)
        if data.ndim == 1:
            writer.add_tensor(name, data.astype(np.float32))
        elif outtype == "q8_0" and data.shape[-1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            writer.add_tensor(name, data.astype(np.float16))
        count += 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return Converted(out, arch, count, outtype, pre)
