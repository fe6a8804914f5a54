"""LoRA DPO on the twin: one trainable adapter; the reference is the same base with the adapter off.

The Handbook's DPO setup (ch. 6) scaled to a 135M model on 2 CPU cores:
LoRA r=32, alpha=32, dropout 0 on all seven projections, beta 0.5, one epoch,
linear schedule with 10 warm-up steps, weight decay 0.01, seed 0, max length 1024.

Learning rate, measured here (embedded SmolLM2-135M, 200 pairs, one epoch = 100
steps of 2 pairs, bf16 compute; held-out reward accuracy / margin after):
    2e-6 (the Handbook's)  0.53 / -0.00   bf16 rounding swallows updates this small
    1e-5                   1.00 /  1.01   (fp32 compute: 1.00 / 2.79)
    5e-5                   1.00 /  8.12   held-out DPO loss 0.0009: far past a light touch
1e-5 is the lightest of these that learns the voice in one epoch.
Batch 2 without accumulation: the Handbook's 2 x 8 would give 12 optimizer steps
on 200 pairs, fewer than its own 10 warm-up steps.
"""

from pipeline.recipe import DataConfig, LoraSettings, ModelConfig, Recipe, TrainConfig

recipe = Recipe(
    name="dpo-lora",
    method="lora",
    model=ModelConfig(),  # the embedded SmolLM2-135M-Instruct stands in for the twin
    lora=LoraSettings(r=32, alpha=32, dropout=0.0),
    data=DataConfig(train="embedded:train", eval="embedded:heldout", max_length=1024),
    train=TrainConfig(
        learning_rate=1e-5,  # measured, see the module docstring
        epochs=1.0,
        batch_size=2,
        grad_accum=1,
        beta=0.5,
        warmup_steps=10,
    ),
)
