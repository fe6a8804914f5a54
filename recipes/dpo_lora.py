"""LoRA DPO on the twin: one trainable adapter; the reference is the twin itself with the adapter off.

The twin is the embedded one (`twin:sft_twin`): SmolLM2-135M-Instruct after LoRA SFT on the author's train
answers (recipes/sft_twin.py), merged; the first run builds it once (model/twin.py), later runs reuse it.

The Handbook's DPO setup (ch. 6) scaled to a 135M model on 2 CPU cores:
LoRA r=32, alpha=32, dropout 0 on all seven projections, beta 0.5, one epoch,
linear schedule with 10 warm-up steps, weight decay 0.01, seed 0, max length 1024.
The learning rate is the Handbook's 2e-6, the lightest swept one that learns the held-out preference in one
epoch in bf16 and fp32 alike; the measurements are in the README ("Defaults and where they come from").
"""

from pipeline.recipe import TWIN_MODEL, DataConfig, LoraSettings, ModelConfig, Recipe, TrainConfig

recipe = Recipe(
    name="dpo-lora",
    method="lora",
    model=ModelConfig(name_or_path=TWIN_MODEL),
    lora=LoraSettings(r=32, alpha=32, dropout=0.0),
    data=DataConfig(train="embedded:train", eval="embedded:heldout", max_length=1024),
    train=TrainConfig(
        learning_rate=2e-6,  # the Handbook's; the lowest swept rate that learns in one epoch (README: Defaults)
        epochs=1.0,
        batch_size=2,
        grad_accum=1,
        beta=0.5,
        warmup_steps=10,
    ),
)
