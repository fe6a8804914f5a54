"""The recipe schema: frozen dataclasses, one docstring under each field, the allowed values beside it.

A recipe module builds one `Recipe` and names it `recipe`; variants derive with `dataclasses.replace`.
This package imports no torch: a typo in a recipe costs a second, not a model load.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
TWIN_PREFIX = "twin:"  # `twin:<SFT recipe>`: the model that recipe makes, merged, built once (training/twin.py)
TWIN_MODEL = "twin:sft_twin"  # the embedded twin: recipes/sft_twin.py applied to EMBEDDED_MODEL
EXPORT_FORMATS = ("adapter", "merged", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "gguf-lora")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = EMBEDDED_MODEL
    """The twin: a local folder, a Hugging Face Hub id, `twin:sft_twin` (the embedded twin: SmolLM2-135M-Instruct after
    LoRA SFT on the author's answers, built once and cached) or `embedded:smollm2-135m-instruct` (the instruct model
    itself, which ships with twin-dpo). `twin:<recipe>` builds the twin from any SFT recipe."""
    backend: str = field(default="auto", metadata={"choices": ("auto", "hf", "unsloth")})
    """`auto` (unsloth on a CUDA GPU when installed, else hf), `unsloth` or `hf`."""
    load_in_4bit: bool = False
    """Keep the frozen base in 4-bit NF4 (bitsandbytes): QLoRA. Only with method `lora`."""
    dtype: str = field(default="auto", metadata={"choices": ("auto", "float32", "bfloat16", "float16")})
    """`auto`: on GPU bf16 weights (fp16 without bf16); on CPU fp32 weights with bf16 autocast where the CPU has native
    bf16 (AVX512-BF16/AMX), else plain fp32. Or `float32`, `bfloat16`, `float16` (on CPU: the autocast dtype)."""
    max_seq_length: int = 1024
    """Longest sequence the model is prepared for, in tokens (Unsloth's `max_seq_length`); >= data.max_length."""
    trust_remote_code: bool = False
    """Run Python code shipped with a Hub model. Off: only turn on for a model you trust."""
    allow_pickle_weights: bool = False
    """Load `.bin`/`.pt` weights (pickle, can run code) when a folder has no safetensors. Off by default."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for a Hub model; None = the default branch."""
    adapter: str | None = None
    """The twin as a LoRA adapter on the base: an adapter folder, a run folder, or `runs:<recipe>` (its newest
    finished run). DPO then trains a copy of it against a frozen copy as the reference. None = the base is the twin."""
    twin_reference: str = field(default="adapter-copy", metadata={"choices": ("adapter-copy", "merged-copy")})
    """With `adapter`: `adapter-copy` (a frozen copy of the adapter on the shared base: the base is in memory once)
    or `merged-copy` (the adapter merged into a second full copy of the base: the memory it costs, for comparison)."""


@dataclass(frozen=True)
class LoraSettings:
    r: int = 32
    """LoRA rank. 32 as in the Handbook's DPO run (ch. 6)."""
    alpha: int = 32
    """LoRA alpha; the update is scaled by alpha / r (= 1 here, as in the Handbook)."""
    dropout: float = 0.0
    """Dropout on the LoRA input, 0 as in the Handbook (and what Unsloth's fast path wants)."""
    target_modules: tuple[str, ...] = ALL_LINEAR
    """Linear layers that get an adapter: all seven projections of a Llama/Qwen2 block."""
    bias: str = field(default="none", metadata={"choices": ("none", "all", "lora_only")})
    """Train biases too: `none`, `all` or `lora_only`."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r."""


@dataclass(frozen=True)
class DataConfig:
    train: str = "embedded:train"
    """Preference pairs to train on: a .jsonl/.json/.csv/.parquet file, a Hub dataset id, or `embedded:train`."""
    eval: str | None = "embedded:heldout"
    """Held-out pairs (same forms); None = hold out `eval_fraction` of the train rows."""
    train_split: str = "train"
    """Split name when `train` is a Hub dataset."""
    eval_split: str = "test"
    """Split name when `eval` is a Hub dataset."""
    eval_fraction: float = 0.05
    """Share of train rows held out when `eval` is None (the Handbook holds out 5%)."""
    system_prompt: str | None = None
    """System message put before each prompt; None = whatever the chat template does by default."""
    max_length: int = 1024
    """Longest prompt + answer in tokens after the chat template (the Handbook's 1024); longer answers are cut."""


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 2e-6
    """Peak learning rate: dpo_lora's, the Handbook's 2e-6: the lowest swept rate that learns the held-out preference
    in one epoch (README: Defaults)."""
    epochs: float = 1.0
    """Passes over the train pairs: one, light on purpose (style imitation fights DPO's pull toward formal text)."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 = run all epochs."""
    batch_size: int = 2
    """Pairs per forward pass (the Handbook's per-device batch of 2)."""
    grad_accum: int = 1
    """Forward passes per optimizer step; the effective batch is batch_size * grad_accum pairs."""
    beta: float = 0.5
    """DPO beta: how strongly the policy is held to the reference (the Handbook's 0.5; TRL's default is 0.1)."""
    loss_type: str = field(
        default="sigmoid",
        metadata={
            "choices": (
                "sigmoid",
                "hinge",
                "ipo",
                "exo_pair",
                "nca_pair",
                "robust",
                "bco_pair",
                "sppo_hard",
                "aot",
                "aot_unpaired",
                "apo_zero",
                "apo_down",
                "discopop",
                "sft",
                "sigmoid_norm",
            )
        },
    )
    """TRL DPO loss: sigmoid (the DPO paper), ipo, hinge, robust, apo_zero, sigmoid_norm, ..."""
    warmup_steps: int = 10
    """Linear warm-up steps (the Handbook's 10)."""
    scheduler: str = field(
        default="linear",
        metadata={
            "choices": ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
        },
    )
    """Learning-rate schedule after warm-up: linear, cosine or constant."""
    weight_decay: float = 0.01
    """AdamW weight decay (the Handbook's 0.01)."""
    optim: str = "auto"
    """Optimizer: `auto` (adamw_8bit on CUDA as in the Handbook, adamw_torch on CPU), or any transformers optim name."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass. Off: measured slower on CPU when memory allows."""
    compile: bool = False
    """torch.compile (inductor) each transformer block, compiled once and shared by all layers (training/compiled.py).
    Off: on the 2-core CPU it does not win back its compile time in a default run (README, the bench's lever table)."""
    group_by_length: bool = True
    """Batch pairs of similar length (random groups of 50 batches, sorted inside) so less compute goes to padding.
    The order is drawn once from the seed and repeated in every epoch."""
    fast_head: bool = True
    """Score only completion positions through the LM head (training/fast_head.py); TRL's CPU path scores all."""
    padding_free: bool = True
    """DPO with the completion-only head: each pair's two answers go through the model as one packed row, no
    padding between them, attention kept inside each sequence (training/packing.py). Same numbers up to float32
    rounding; fewer tokens computed."""
    prefix_sharing: bool = True
    """With padding_free: the prompt is computed once per pair and both answers attend to it."""
    precompute_ref: bool = True
    """Compute the reference log-probs once, cache them on disk, and read them at every step (training/reference.py)."""
    save_every: int = 25
    """Write a checkpoint every this many optimizer steps (resume, interrupts); 0 = none. 25 = four per default run."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept; older ones are deleted once a newer one is marked complete."""
    logging_steps: int = 1
    """Write a metrics.jsonl line every this many optimizer steps."""
    eval_every: float = 0.5
    """Evaluate on the held-out pairs every this share of training (the Handbook: 20%); 0 = only before and after."""
    seed: int = 0
    """Seed for LoRA init, data order and dropout (the Handbook's 0)."""
    threads: int = 0
    """CPU threads for torch; 0 = one per CPU this process may run on (split between processes under --nproc)."""
    report_to: str = field(default="none", metadata={"choices": ("none", "tensorboard", "trackio", "wandb", "mlflow")})
    """Also send the curves to a tracker (TRL's report_to): tensorboard writes RUN/tensorboard/; needs `.[track]`."""


@dataclass(frozen=True)
class ExportConfig:
    formats: tuple[str, ...] = field(default=EXPORT_FORMATS, metadata={"subset_of": EXPORT_FORMATS})
    """What `make export` writes: adapter, merged, gguf-f16, gguf-q8_0, gguf-q4_k_m, gguf-lora (the adapter as a
    GGUF LoRA on the base's f16 GGUF, for Ollama's ADAPTER)."""
    merged_dtype: str = field(default="float16", metadata={"choices": ("float16", "bfloat16")})
    """dtype of the merged safetensors: float16 or bfloat16."""
    temperature: float = 0.7
    """Ollama Modelfile default sampling temperature."""
    top_p: float = 0.9
    """Ollama Modelfile default nucleus sampling share."""
    repeat_penalty: float = 1.1
    """Ollama Modelfile default repetition penalty (1 = off)."""
    num_ctx: int = 2048
    """Ollama Modelfile context window in tokens."""


@dataclass(frozen=True)
class Recipe:
    name: str
    """Name of the recipe, used in run folder names (`runs/<name>-<time>/`). Every recipe names itself."""
    method: str = field(default="lora", metadata={"choices": ("lora", "full", "sft")})
    """`lora` (a trainable adapter, reference = adapter off), `full` (all weights, a separate frozen reference) or
    `sft` (LoRA supervised fine-tuning on the chosen answers: how the twin itself is made)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


SECTIONS = {
    "model": ModelConfig,
    "lora": LoraSettings,
    "data": DataConfig,
    "train": TrainConfig,
    "export": ExportConfig,
}


def _declared(kind: str) -> dict[str, tuple[str, ...]]:
    """Every field whose metadata declares `kind`, by key (`method`, `model.backend`, ...)."""
    tables = [("", Recipe)] + [(f"{name}.", cls) for name, cls in SECTIONS.items()]
    return {prefix + f.name: f.metadata[kind] for prefix, cls in tables for f in fields(cls) if kind in f.metadata}


def choices() -> dict[str, tuple[str, ...]]:
    """`{"model.backend": ("auto", "hf", "unsloth"), ...}`: the allowed values declared on each field."""
    return _declared("choices")


def subsets() -> dict[str, tuple[str, ...]]:
    """Tuple fields whose items must come from a fixed list (export.formats)."""
    return _declared("subset_of")
