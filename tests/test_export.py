"""Export on tiny Llama and Qwen2 models through llama.cpp's own converters: every file loads, the proofs catch a
broken file, and the formats that passed are kept when another fails."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import needs_llama_cpp, save_tiny, tiny_recipe
from pipeline import cli
from pipeline.export import llama_tools
from pipeline.training import dpo as train


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def trained_run(request, tmp_path_factory, small_data, smol_tokenizer):
    """A 3-step LoRA DPO run on a tiny model of each family with SmolLM2's tokenizer (one llama.cpp knows)."""
    folder = save_tiny(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param, smol_tokenizer, steps=60)
    run_dir = tmp_path_factory.mktemp("runs") / request.param
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TWIN_DPO_CACHE", str(run_dir.parent / "cache"))
        train.train(tiny_recipe(folder, small_data), run_dir, max_steps=3)
    return request.param, folder, run_dir


@needs_llama_cpp
def test_export_writes_and_proves_every_format(trained_run, capsys):
    import gguf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family, base_dir, run_dir = trained_run
    code = cli.main(["export", str(run_dir)])
    assert code == 0, capsys.readouterr().err
    out = run_dir / "export"
    report = json.loads((out / "export.json").read_text())
    assert all(p["passed"] for p in report["proofs"].values()), report["proofs"]
    assert report["not_written"] == {}
    assert report["written"] == [*report["formats"], "Modelfile", "Modelfile.lora"]
    lora = report["proofs"]["gguf base + LoRA vs merged f16 (teacher-forced)"]
    assert lora["top1_agreement"] >= 0.99 and lora["without_adapter_top1"] < lora["top1_agreement"]
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
    # Qwen2's tokenizer class rebuilds the split rules, so llama.cpp does not know it by hash: found by probing
    assert bytes(field("tokenizer.ggml.pre").parts[-1]).decode() == {"llama": "smollm", "qwen2": "qwen2"}[family]
    assert bytes(field("tokenizer.chat_template").parts[-1]).decode() == tokenizer.chat_template
    lora = gguf.GGUFReader(out / "gguf" / "lora-f16.gguf")
    assert bytes(lora.fields["general.type"].parts[-1]).decode() == "adapter"
    assert any(t.name == "blk.0.attn_q.weight.lora_a" for t in lora.tensors)

    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith('FROM ./gguf/model-q4_k_m.gguf\nTEMPLATE """')
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    with_adapter = (out / "Modelfile.lora").read_text()
    assert with_adapter.startswith('FROM ./gguf/base-f16.gguf\nADAPTER ./gguf/lora-f16.gguf\nTEMPLATE """')


def _zero_one_tensor(path, name: str) -> None:
    """Break a GGUF file the way a wrong converter would: one weight matrix written as zeros."""
    import gguf

    reader = gguf.GGUFReader(path, "r+")
    (tensor,) = [t for t in reader.tensors if t.name == name]
    tensor.data[...] = 0
    reader.data.flush()


@needs_llama_cpp
@pytest.mark.parametrize("trained_run", ["llama"], indirect=True)
def test_a_broken_gguf_fails_its_proof_and_the_formats_that_passed_stay(trained_run, monkeypatch, capsys):
    _, _, run_dir = trained_run
    convert = llama_tools.convert

    def broken(folder, out, outtype="f16"):
        convert(folder, out, outtype)
        if outtype == "f16":
            _zero_one_tensor(out, "blk.0.attn_q.weight")

    monkeypatch.setattr(llama_tools, "convert", broken)
    before = sorted(p.name for p in run_dir.iterdir())
    code = cli.main(["export", str(run_dir), "--set", "export.formats=adapter,merged,gguf-f16,gguf-q4_k_m"])
    err = capsys.readouterr().err
    assert code == 2
    assert "written: adapter, merged" in err
    assert "not written: gguf-f16: proof failed: gguf f16 (llama.cpp) vs transformers" in err
    assert "not written: gguf-q4_k_m: the f16 GGUF that every other GGUF is checked against failed its proof" in err
    out = run_dir / "export"
    report = json.loads((out / "export.json").read_text())
    assert report["written"] == ["adapter", "merged"] and set(report["not_written"]) == {"gguf-f16", "gguf-q4_k_m"}
    assert (out / "merged" / "model.safetensors").is_file() and (out / "adapter").is_dir()
    assert not list(out.glob("gguf/*.gguf")) and not (out / "Modelfile").exists()
    after = sorted(p.name for p in run_dir.iterdir())
    assert [n for n in after if n not in before and n != "export"] == [], "no temporary folder left behind"


@needs_llama_cpp
def test_an_architecture_the_converter_does_not_write_is_one_line():
    from pipeline.errors import UserError

    with pytest.raises(UserError) as caught:
        llama_tools.check_architecture({"model_type": "opt", "architectures": ["OPTForCausalLM"]})
    line = str(caught.value)
    assert "architecture 'OPTForCausalLM' (model_type 'opt') is not one that llama.cpp's converter" in line
    assert "Qwen3" in line and "--set export.formats=adapter,merged" in line and "\n" not in line
    assert llama_tools.check_architecture({"model_type": "qwen3"}) == "Qwen3ForCausalLM"


def test_a_setting_llama_cpp_computes_differently_is_one_line():
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="qwen3_moe model has norm_topk_prob=false, which llama.cpp does not compute"):
        llama_tools.check_settings({"model_type": "qwen3_moe", "norm_topk_prob": False})
    llama_tools.check_settings({"model_type": "qwen3_moe", "norm_topk_prob": True})


def test_the_sdist_is_refused_when_its_hash_differs(tmp_path, monkeypatch):
    from pipeline.errors import UserError

    monkeypatch.setenv("TWIN_DPO_SDIST_DIR", str(tmp_path))
    (tmp_path / llama_tools.SDIST).write_bytes(b"not the pinned file")
    with pytest.raises(UserError, match="has sha256 .* expected 832db069.*delete it and run `make setup-gguf`"):
        llama_tools.sdist(download=False)
    (tmp_path / llama_tools.SDIST).unlink()
    with pytest.raises(UserError, match="is missing; run `make setup-gguf`"):
        llama_tools.sdist(download=False)


def test_export_of_an_unfinished_run_is_refused(tmp_path, capsys):
    (tmp_path / "recipe.json").write_text("{}")
    assert cli.main(["export", str(tmp_path)]) == 2
    assert "is not finished (no summary.json)" in capsys.readouterr().err


@needs_llama_cpp
@pytest.mark.parametrize("family", ["llama3", "mistral", "gemma", "phi3"])
def test_each_chat_format_exports_with_one_bos_and_its_modelfile(family, small_data, tmp_path):
    """The whole export on a model whose tokenizer has a family's special tokens, BOS behaviour and chat format:
    llama.cpp tokenizes the prompts exactly as training did (one BOS), and the Modelfile is proven."""
    from conftest import build_model, build_tokenizer, pretrain

    tok = build_tokenizer(family=family)
    model = build_model("llama", len(tok), ids=(tok.bos_token_id, tok.eos_token_id, tok.pad_token_id))
    pretrain(model, tok)  # confident predictions: greedy parity is not decided by near-ties
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    run_dir = tmp_path / "run"
    train.train(tiny_recipe(tmp_path / "model", small_data), run_dir, max_steps=2)
    code = cli.main(["export", str(run_dir), "--set", "export.formats=merged,gguf-f16,gguf-lora"])
    report = json.loads((run_dir / "export" / "export.json").read_text())
    assert code == 0 and report["not_written"] == {}, report["not_written"]
    f16 = report["proofs"]["gguf f16 (llama.cpp) vs transformers"]
    assert f16["prompts_tokenized_identically"] == f16["prompts"] and f16["passed"]
    assert report["proofs"]["Modelfile TEMPLATE vs chat template"]["passed"]
    modelfile = (run_dir / "export" / "Modelfile").read_text()
    assert f"PARAMETER stop {json.dumps(tok.eos_token)}" in modelfile and tok.bos_token not in modelfile.split('"""')[1]
