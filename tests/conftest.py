"""Tiny real models, built in code: a byte-level BPE tokenizer trained on our own data (with a family's special
tokens and chat template), and 2-layer models of every common family with random weights. A whole LoRA DPO run on
them takes seconds."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from chat_templates import CHATML  # noqa: F401  (tests/ is on the path, like conftest; tests import it from here)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="needs llama.cpp (its converters, quantizer and runtime for the GGUF proofs): run `make setup-gguf`; "
    "`make test-slow` and CI build it",
)


def _corpus() -> list[str]:
    from pipeline.data import EMBEDDED

    texts = []
    for path in EMBEDDED.values():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [row["prompt"], row["chosen"], row["rejected"]]
    return texts


def build_tokenizer(vocab_size: int = 600, family: str = "chatml"):
    """A small byte-level BPE tokenizer trained on our corpus, with the special tokens, BOS / EOS, BOS-adding
    behaviour and chat template of a family's tokenizer (tests/chat_templates.py)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from chat_templates import FAMILY_TOKENIZERS

    spec = FAMILY_TOKENIZERS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(spec.specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    post = [processors.ByteLevel(trim_offsets=False)]
    if spec.adds_bos:  # like Llama 3's and Gemma's tokenizers: BOS in front of every encoded text
        bos_id = tok.token_to_id(spec.bos)
        post.append(
            processors.TemplateProcessing(
                single=f"{spec.bos} $A", pair=f"{spec.bos} $A $B", special_tokens=[(spec.bos, bos_id)]
            )
        )
    tok.post_processor = processors.Sequence(post)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad, unk_token=None
    )
    fast.chat_template = spec.template
    return fast


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "olmo2", "qwen3_moe")


def build_model(family: str, vocab_size: int, seed: int = 0, ids: tuple[int, int, int] = (1, 2, 0)):
    """A tiny random causal LM of `family` (hidden 64, 2 layers, 4 heads of 16, 2 KV heads), built from its
    transformers config class as a user would; `ids` are the (bos, eos, pad) token ids."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    bos, eos, pad = ids
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=True,
    )
    head = dict(head_dim=16)
    gemma = dict(head, query_pre_attn_scalar=16, sliding_window=64)
    configs = {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**common)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**common)),
        "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**common, **head)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**common, **head)),
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**common, **gemma)),
        "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**common, **gemma)),
        "phi3": lambda: T.Phi3ForCausalLM(
            T.Phi3Config(**common)
        ),  # fuses q/k/v into qkv_proj, gate/up into gate_up_proj
        "olmo2": lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**{**common, "tie_word_embeddings": False})),  # as OLMo 2 is
        "qwen3_moe": lambda: T.Qwen3MoeForCausalLM(
            T.Qwen3MoeConfig(  # norm_topk_prob as in the released Qwen3-MoE models (and llama.cpp)
                **common, **head, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True
            )
        ),
    }
    return configs[family]()


def pretrain(model, tokenizer, steps: int = 120, seed: int = 0):
    """A few seconds of language modelling on our corpus, so the tiny model predicts with confidence and
    uses attention: a random one has near-tied logits everywhere, which hides layout bugs (a missing q/k
    permutation) and makes numerically equivalent files disagree on ties."""
    import torch

    torch.manual_seed(seed)
    ids = torch.tensor([t for text in _corpus() for t in tokenizer(text + tokenizer.eos_token)["input_ids"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (16,))
        batch = torch.stack([ids[s : s + 64] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return loss.item()


def save_tiny(folder: Path, family: str, tokenizer=None, steps: int = 120) -> Path:
    """A pretrained tiny `family` model with our small BPE tokenizer, or with `tokenizer` (SmolLM2's, which
    llama.cpp's converter recognizes: the GGUF tests need it)."""
    tokenizer = tokenizer or build_tokenizer()
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = build_model(family, len(tokenizer), ids=ids)
    pretrain(model, tokenizer, steps)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (49,152 tokens, ChatML), read from the embedded GGUF."""
    from transformers import AutoTokenizer

    from pipeline.model import embedded

    path = embedded.gguf_path()
    if path is None:
        pytest.skip("the embedded model is not extracted: run `make setup`")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict[str, Path]:
    """16 train and 8 held-out pairs from the embedded set."""
    from pipeline.data import EMBEDDED

    folder = tmp_path_factory.mktemp("data")
    out = {}
    for name, n in (("train", 16), ("heldout", 8)):
        lines = EMBEDDED[f"embedded:{name}"].read_text(encoding="utf-8").splitlines()[:n]
        out[name] = folder / f"{name}.jsonl"
        out[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test runs in its own folder with its own cache, so runs/ and .cache/ never leak between tests."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TWIN_DPO_CACHE", str(tmp_path / "cache"))


def cli_sets(model_dir: Path, data: dict[str, Path]) -> list[str]:
    """`--set` arguments pointing a shipped recipe at a tiny model and the small data."""
    return [
        "--set",
        f"model.name_or_path={model_dir}",
        "--set",
        f"data.train={data['train']}",
        "--set",
        f"data.eval={data['heldout']}",
    ]


def train_argv(model_dir: Path, data: dict[str, Path], run_dir: Path, *sets: str) -> list[str]:
    """`train dpo_lora` for one step on a tiny model (fp32), as a user would type it."""
    return [
        "train",
        "dpo_lora",
        "--max-steps",
        "1",
        "--no-answers",
        "--run-dir",
        str(run_dir),
        *cli_sets(model_dir, data),
        "--set",
        "model.dtype=float32",
        *sets,
    ]


def tiny_recipe(model_dir: Path, data: dict[str, Path], **train):
    """The shipped LoRA recipe pointed at a tiny model and small data, fp32 so results do not depend on the CPU."""
    from recipes.dpo_lora import recipe

    settings = dict(learning_rate=1e-3, warmup_steps=0, eval_every=0.0, batch_size=2)
    settings.update(train)
    return replace(
        recipe,
        model=replace(recipe.model, name_or_path=str(model_dir), dtype="float32", max_seq_length=512),
        data=replace(recipe.data, train=str(data["train"]), eval=str(data["heldout"]), max_length=512),
        train=replace(recipe.train, **settings),
    )


def tiny_dpo_trainer(recipe, out_dir: Path):
    """A trl.DPOTrainer as training/dpo.py builds it for `recipe`, without training."""
    from datasets import Dataset
    from trl import DPOTrainer

    from pipeline.model import hf
    from pipeline.training import arguments
    from pipeline.training.prepare import prepare

    prep = prepare(recipe)
    loaded = hf.load(recipe, prep.backend, tokenizer=prep.tokenizer)
    return DPOTrainer(
        model=loaded.model,
        args=arguments.dpo_args(recipe, out_dir, "cpu", 4),
        train_dataset=Dataset.from_list(prep.train_rows),
        eval_dataset=Dataset.from_list(prep.eval_rows),
        processing_class=loaded.tokenizer,
        peft_config=loaded.peft_config,
    )


def move_lora_b(model) -> None:
    """Give every LoRA B a non-zero value (PEFT starts it at zero), so the policy differs from the reference and
    every LoRA weight gets a gradient."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)


def pairs_batch(trainer, indices):
    """The collated, device-ready training batch of the trainer's pairs at `indices`."""
    ds = trainer.train_dataset
    cols = ("prompt_ids", "chosen_ids", "rejected_ids")
    return trainer._prepare_inputs(trainer.data_collator([{c: ds[i][c] for c in cols} for i in indices]))


def autocast_step(trainer, batch, params: set[int]):
    """(loss, gradients, bytes kept for backward outside the parameters) of one DPO step under bf16 autocast."""
    import torch

    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    trainer.model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    trainer._metrics["train"].clear()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(kept.values())


def lean_trainer(model_dir: Path, data: dict[str, Path], out_dir: Path):
    """(trainer, a batch of its first 4 pairs): a tiny DPO trainer with every LoRA B moved off zero, the
    completion-only LM head and the lean linears installed (training/lean_linear.py), without the reference cache."""
    from pipeline.training import fast_head, lean_linear

    trainer = tiny_dpo_trainer(tiny_recipe(model_dir, data, precompute_ref=False), out_dir)
    move_lora_b(trainer.model)
    assert fast_head.install_on_trainer(trainer, True)
    lean_linear.install(trainer.model)
    return trainer, pairs_batch(trainer, range(4))


def spy_answer_models(monkeypatch) -> dict[str, dict]:
    """Record, for each `evaluate.generate` call (by its label), the logits of the model it was given on a fixed
    input and whether that model still has LoRA layers; the answers are then generated as usual."""
    import torch

    from pipeline.evaluation import evaluate

    seen: dict[str, dict] = {}
    real = evaluate.generate

    def spy(model, tokenizer, questions, system_prompt, max_new_tokens, label="answers"):
        with torch.no_grad():
            logits = model(input_ids=torch.arange(3, 19)[None]).logits[0].float().clone()
        lora = any("lora_" in name for name, _ in model.named_parameters())
        seen[label] = {"logits": logits, "lora": lora}
        return real(model, tokenizer, questions, system_prompt, max_new_tokens, label)

    monkeypatch.setattr(evaluate, "generate", spy)
    return seen


def adapter_logits(model_dir: Path, adapter_dir: Path | None):
    """The logits of base (+ adapter) on spy_answer_models' fixed input, loaded from scratch in fp32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        return model.eval()(input_ids=torch.arange(3, 19)[None]).logits[0].float()
