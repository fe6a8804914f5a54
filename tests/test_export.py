"""Export on tiny Llama and Qwen2 models: every file loads, and the proofs catch a broken converter."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import needs_llama_cpp, tiny_recipe
from pipeline import cli
from pipeline.export import gguf_convert
from pipeline.training import dpo as train


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def trained_run(request, tmp_path_factory, small_data):
    """A 3-step LoRA DPO run on a tiny model of each family (the session's tiny models)."""
    folder = request.getfixturevalue(f"tiny_{request.param}")
    run_dir = tmp_path_factory.mktemp("runs") / request.param
    train.train(tiny_recipe(folder, small_data), run_dir, max_steps=3)
    return request.param, folder, run_dir


@needs_llama_cpp
def test_export_writes_and_proves_every_format(trained_run, capsys):
    import gguf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family, base_dir, run_dir = trained_run
    code = cli.main(["export", str(run_dir), "--set", "export.formats=adapter,merged,gguf-f16,gguf-q8_0"])
    assert code == 0, capsys.readouterr().err
    out = run_dir / "export"
    report = json.loads((out / "export.json").read_text())
    assert all(p["passed"] for p in report["proofs"].values()), report["proofs"]
    f16 = report["proofs"]["gguf f16 (llama.cpp) vs transformers"]
    assert f16["questions_identical"] == f16["questions"] == 8 and f16["prompts_tokenized_identically"] == 8
    assert report["proofs"]["merge (fp32) vs adapter model"]["max_abs_logit_diff"] < 1e-3
    assert "PASS" in capsys.readouterr().out

    # the adapter loads on the base with PEFT; the merged folder loads with plain transformers
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    adapter_model = PeftModel.from_pretrained(base, out / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    assert (
        merged.dtype == torch.float32 and json.loads((out / "merged" / "config.json").read_text())["dtype"] == "float16"
    )
    ids = torch.arange(5, 30).unsqueeze(0)
    with torch.no_grad():
        assert (adapter_model(ids).logits.argmax(-1) == merged(ids).logits.argmax(-1)).float().mean() > 0.95
    assert AutoTokenizer.from_pretrained(out / "merged").chat_template

    # the f16 GGUF read back: architecture, shapes, tokenizer
    reader = gguf.GGUFReader(out / "gguf" / "model-f16.gguf")
    field = lambda key: reader.fields[key]  # noqa: E731
    arch = bytes(field("general.architecture").parts[-1]).decode()
    assert arch == family
    assert int(field(f"{arch}.block_count").parts[-1][0]) == 2
    names = {t.name: t for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight"} <= set(names)
    assert ("blk.0.attn_q.bias" in names) == (family == "qwen2")
    assert list(names["blk.0.ffn_up.weight"].shape) == [64, 128]
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    assert len(field("tokenizer.ggml.tokens").data) == len(tokenizer)
    assert bytes(field("tokenizer.ggml.model").parts[-1]).decode() == "gpt2"
    assert bytes(field("tokenizer.chat_template").parts[-1]).decode() == tokenizer.chat_template

    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith('FROM ./gguf/model-q8_0.gguf\nTEMPLATE """')
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


@needs_llama_cpp
@pytest.mark.parametrize("trained_run", ["llama"], indirect=True)  # Qwen2 (NEOX rope) has no q/k permutation
def test_a_converter_without_the_qk_permutation_fails_the_f16_proof(trained_run, monkeypatch, capsys):
    _, _, run_dir = trained_run
    monkeypatch.setattr(gguf_convert, "permute_rotary", lambda weight, _n_head: weight)
    before = sorted(p.name for p in run_dir.iterdir())
    code = cli.main(["export", str(run_dir), "--set", "export.formats=merged,gguf-f16"])
    err = capsys.readouterr().err
    assert code == 2
    assert "export refused, a proof failed: gguf f16 (llama.cpp) vs transformers" in err
    after = sorted(p.name for p in run_dir.iterdir())
    assert [n for n in after if n not in before and n != "export"] == [], "no temporary folder left behind"
    if "export" not in before:
        assert not (run_dir / "export").exists()


def test_unsupported_architecture_is_one_line(tmp_path):
    from pipeline.errors import UserError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(UserError, match="architecture 'gpt_neox' is not supported; twin-dpo converts llama, qwen2"):
        gguf_convert.convert(tmp_path, tmp_path / "x.gguf")


def test_export_of_an_unfinished_run_is_refused(tmp_path, capsys):
    (tmp_path / "recipe.json").write_text("{}")
    assert cli.main(["export", str(tmp_path)]) == 2
    assert "is not finished (no summary.json)" in capsys.readouterr().err
