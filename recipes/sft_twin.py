"""Make the twin: LoRA SFT of the embedded instruct model on the author's voice (the train split's chosen answers).

The Handbook's SFT of TwinLlama (ch. 5: LoRA r 32 / alpha 32 on all projections, lr 3e-4, 3 epochs, the chat
template applied, loss on the answers only) scaled to 200 short answers on 2 cores: 2 epochs at lr 2e-4,
batch 4. The held-out split (40 answers on 10 unseen topics) is never trained on.
"""

from pipeline.recipe import DataConfig, LoraSettings, ModelConfig, Recipe, TrainConfig

recipe = Recipe(
    name="sft-twin",
    method="sft",
    model=ModelConfig(),
    lora=LoraSettings(r=32, alpha=32, dropout=0.0),
    data=DataConfig(train="embedded:train", eval="embedded:heldout", max_length=1024),
    train=TrainConfig(
        learning_rate=2e-4,  # the usual LoRA SFT rate, a little under the Handbook's 3e-4 for 2 epochs instead of 3
        epochs=2.0,
        batch_size=4,
        warmup_steps=10,
        eval_every=0.5,
        precompute_ref=False,  # SFT has no reference model
    ),
)
