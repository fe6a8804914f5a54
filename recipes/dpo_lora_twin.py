"""LoRA DPO on the twin adapter: the SFT adapter (make sft) trains on as the policy; a frozen copy is the reference.

One base in memory with two adapters on it (seeds/000). Everything else is the dpo_lora recipe.
`model.adapter = "runs:sft-twin"` means the newest finished sft-twin run in runs/; give a path to pin one.
"""

from dataclasses import replace

from recipes.dpo_lora import recipe as lora

recipe = replace(lora, name="dpo-lora-twin", model=replace(lora.model, adapter="runs:sft-twin"))
