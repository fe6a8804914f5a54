"""The chat formats of the common families, written for the tests from their public descriptions: special tokens,
BOS / EOS, whether the tokenizer adds BOS by itself, and a Jinja chat template producing the family's layout."""

from __future__ import annotations

from dataclasses import dataclass

CHATML = (  # Qwen, SmolLM: <|im_start|>role\ncontent<|im_end|>\n
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (  # BOS, then <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
    "m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (  # BOS, [INST] user [/INST]answer</s>; a system message goes in front of the first user message
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}{% for m in turns %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
GEMMA = (  # BOS, <start_of_turn>user|model\ncontent<end_of_turn>\n; system folded into the first user turn (Gemma 3)
    "{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}{% for m in turns %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI3 = (  # <|role|>\ncontent<|end|>\n
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class FamilyTokenizer:
    specials: tuple[str, ...]
    bos: str
    eos: str
    pad: str
    adds_bos: bool  # the tokenizer puts BOS in front of every encoded text by itself
    template: str


FAMILY_TOKENIZERS = {
    "chatml": FamilyTokenizer(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_start|>", "<|im_end|>",
                              "<|endoftext|>", False, CHATML),
    "llama3": FamilyTokenizer(("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                               "<|eot_id|>"), "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", True, LLAMA3),
    "mistral": FamilyTokenizer(("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>", "<unk>", True, MISTRAL),
    "gemma": FamilyTokenizer(("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>",
                             "<pad>", True, GEMMA),
    "phi3": FamilyTokenizer(("<|endoftext|>", "<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<s>",
                            "<|end|>", "<|endoftext|>", False, PHI3),
}  # fmt: skip
