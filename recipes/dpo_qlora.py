"""QLoRA DPO: the LoRA recipe with the frozen base in 4-bit NF4 (bitsandbytes; works on CPU too)."""

from dataclasses import replace

from recipes.dpo_lora import recipe as lora

recipe = replace(lora, name="dpo-qlora", model=replace(lora.model, load_in_4bit=True))
