"""The twin on a device: where its weights are (paths, the embedded model), which backend and precision run
it, loading through transformers + PEFT or Unsloth, the twin as an adapter, and the process it runs in.

Unsloth must be imported before transformers, trl and peft (it patches them on import), and this package is
imported before we know whether the unsloth backend will run. So these modules import those libraries (and
torch, bitsandbytes, safetensors, which may pull them in) inside the functions that use them.
"""
