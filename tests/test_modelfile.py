"""The Ollama TEMPLATE renders exactly what the tokenizer's chat template renders."""

from __future__ import annotations

import shutil

import pytest

from chat_templates import FAMILY_TOKENIZERS
from conftest import CHATML, build_tokenizer
from pipeline.errors import UserError
from pipeline.export import modelfile

SMOLLM = (  # SmolLM2-Instruct's template: inserts a default system turn
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (  # header-style template with a BOS string and braces in the literal text
    "{{ '<|begin_of_text|>{{x}}' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\n\n'"
    " + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CONVERSATIONS = modelfile.CONVERSATIONS + ([{"role": "user", "content": 'A {{ brace }} and "quotes"\nand a newline'}],)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("template", [CHATML, SMOLLM, LLAMA3], ids=["chatml", "smollm", "llama3"])
def test_template_matches_chat_template(tokenizer, template):
    tokenizer.chat_template = template
    go_text = modelfile.go_template(modelfile.derive(tokenizer))
    expected = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CONVERSATIONS]
    assert modelfile.render_python(go_text, CONVERSATIONS) == expected
    assert modelfile.prove(tokenizer, go_text)["identical"]
    tokenizer.chat_template = CHATML


@pytest.mark.skipif(
    shutil.which("go") is None, reason="Go is not installed (apt-get install golang-go); CI installs it"
)
@pytest.mark.parametrize("template", [CHATML, SMOLLM, LLAMA3], ids=["chatml", "smollm", "llama3"])
def test_python_interpreter_agrees_with_go(tokenizer, template):
    tokenizer.chat_template = template
    go_text = modelfile.go_template(modelfile.derive(tokenizer))
    assert modelfile.render_go(go_text, CONVERSATIONS) == modelfile.render_python(go_text, CONVERSATIONS)
    tokenizer.chat_template = CHATML


def test_a_wrong_template_fails_the_proof(tokenizer):
    tokenizer.chat_template = SMOLLM
    parts = modelfile.derive(tokenizer)
    wrong = modelfile.go_template(
        modelfile.Parts("", parts.prefix, parts.suffix, parts.generation)
    )  # lost default system
    proof = modelfile.prove(tokenizer, wrong)
    assert not proof["identical"] and "You are a helpful AI assistant" in proof["first_mismatch"]["expected"]
    tokenizer.chat_template = CHATML


@pytest.mark.parametrize(
    "template, message",
    [
        (
            "{% for m in messages %}{{ raise_exception('no system') if m['role'] == 'system' }}{% endfor %}",
            "Modelfile: cannot probe the chat template",
        ),
        (  # turns in reverse order: no TEMPLATE of blocks can say that
            "{% for m in messages | reverse %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}",
            "Modelfile: the chat template renders the system turn differently",
        ),
    ],
    ids=["raises", "reorders"],
)
def test_a_template_that_cannot_be_translated_is_refused_with_the_reason(tokenizer, template, message):
    tokenizer.chat_template = template
    with pytest.raises(UserError, match=message):
        modelfile.derive(tokenizer)
    tokenizer.chat_template = CHATML


def test_stop_tokens_and_parameters(tokenizer):
    parts = modelfile.derive(tokenizer)
    assert modelfile.stop_tokens(tokenizer, parts) == ["<|im_end|>", "<|im_start|>"]
    text = modelfile.modelfile_text(
        "gguf/model-q4_k_m.gguf", "T", ["<|im_end|>"], {"temperature": 0.7, "num_ctx": 2048}
    )
    assert (
        text == 'FROM ./gguf/model-q4_k_m.gguf\nTEMPLATE """T"""\nPARAMETER stop "<|im_end|>"\nPARAMETER temperature '
        "0.7\nPARAMETER num_ctx 2048\n"
    )


@pytest.mark.parametrize("family", sorted(FAMILY_TOKENIZERS))
def test_each_familys_chat_format_becomes_a_template_with_its_stop_tokens(family):
    """ChatML, Llama 3, Mistral [INST] and Gemma (the system message folded into the first user turn), Phi-3: the
    TEMPLATE renders what the model is trained on, byte for byte, without the BOS llama.cpp adds from the GGUF."""
    tok = build_tokenizer(family=family)
    spec = FAMILY_TOKENIZERS[family]
    parts = modelfile.derive(tok)
    go_text = modelfile.go_template(parts)
    expected = [modelfile.render(tok, c) for c in CONVERSATIONS]
    assert modelfile.render_python(go_text, CONVERSATIONS) == expected
    if shutil.which("go"):
        assert modelfile.render_go(go_text, CONVERSATIONS) == expected
    assert modelfile.prove(tok, go_text)["identical"]
    assert (parts.system_fold is not None) == (family in ("mistral", "gemma"))
    assert spec.eos in modelfile.stop_tokens(tok, parts)
    if spec.adds_bos:
        assert spec.bos not in go_text and not expected[0].startswith(spec.bos)
    with_system = CONVERSATIONS[2]
    assert "You are terse." in modelfile.render_python(go_text, [with_system])[0]
