"""Full DPO: every weight trained, against a separate frozen copy of the twin run at every step.

The baseline the LoRA recipes are measured against (seeds/000: "for full training,
neither the reference nor the policy models use adapters"). Two full copies of
the weights plus Adam's two moments per weight: the memory LoRA avoids.
"""

from dataclasses import replace

from recipes.dpo_lora import recipe as lora

recipe = replace(
    lora,
    name="dpo-full",
    method="full",
    train=replace(
        lora.train,
        # Adam moves every weight, the tied embedding / LM head included, so full DPO needs a far smaller rate
        # than LoRA for a comparable pull; the lighter of the two measured (README: Defaults)
        learning_rate=2e-7,
        precompute_ref=False,  # the conventional setup: the reference model runs at every step
    ),
)
