"""Runs one of llama.cpp's converters as it is, with two fallbacks for what it refuses outright.

`python converter_shim.py CONVERTER ARGS...` (export/llama_tools.py runs it; never imported). Everything else is
the converter's own code:
- a byte-level BPE tokenizer whose pre-tokenizer llama.cpp does not know by hash gets $TWIN_DPO_GGUF_PRE, the
  known one chosen by probing (llama_tools.PRE_CANDIDATES); without that variable the refusal stands;
- a family whose converter insists on a SentencePiece tokenizer.model (Gemma 2, Phi-3) but which comes with a
  byte-level BPE tokenizer.json instead is written as a gpt2 vocabulary, as llama.cpp's own Gemma 3 and Phi-4
  converters do for such tokenizers. Any other failure of the family's vocabulary step stands.
"""

import json
import os
import runpy
import sys

SCRIPT = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[:0] = [os.path.dirname(SCRIPT), os.path.join(os.path.dirname(SCRIPT), "gguf-py")]

import conversion  # noqa: E402  (llama.cpp's package, found through the path set above)
from conversion import base  # noqa: E402

recognized = base.TextModel.get_vocab_base_pre


def get_vocab_base_pre(self, tokenizer):
    try:
        return recognized(self, tokenizer)
    except NotImplementedError:
        if "TWIN_DPO_GGUF_PRE" not in os.environ:
            raise
        return os.environ["TWIN_DPO_GGUF_PRE"]


def byte_level_bpe(folder) -> bool:
    path = folder / "tokenizer.json"
    if (folder / "tokenizer.model").is_file() or not path.is_file():
        return False
    return "ByteLevel" in json.dumps(json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer"))


def with_bpe_fallback(cls):
    own = cls.set_vocab

    def set_vocab(self):
        try:
            return own(self)
        except (OSError, ValueError) as err:
            if "tokenizer.model" not in str(err) or not byte_level_bpe(self.dir_model):
                raise
            return self._set_vocab_gpt2()

    cls.set_vocab = set_vocab
    return cls


model_class = conversion.get_model_class
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
conversion.get_model_class = lambda *args, **kwargs: with_bpe_fallback(model_class(*args, **kwargs))
runpy.run_path(SCRIPT, run_name="__main__")
