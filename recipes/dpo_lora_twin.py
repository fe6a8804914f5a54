"""LoRA DPO on the twin adapter: the SFT adapter (make sft) trains on as the policy; a frozen copy is the reference.

One base in memory with two adapters on it (seeds/000): the base is the instruct model the SFT adapter was
trained on, not the merged twin. Everything else is the dpo_lora recipe.
`model.adapter = "runs:sft-twin"` means the newest finished sft-twin run in runs/; give a path to pin one.
"""

from dataclasses import replace

from pipeline.recipe import EMBEDDED_MODEL
from recipes.dpo_lora import recipe as lora

recipe = replace(
    lora, name="dpo-lora-twin", model=replace(lora.model, name_or_path=EMBEDDED_MODEL, adapter="runs:sft-twin")
)
