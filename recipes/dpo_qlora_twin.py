"""QLoRA DPO on the twin adapter: the dpo_lora_twin recipe with the shared base in 4-bit NF4."""

from dataclasses import replace

from recipes.dpo_lora_twin import recipe as twin

recipe = replace(twin, name="dpo-qlora-twin", model=replace(twin.model, load_in_4bit=True))
