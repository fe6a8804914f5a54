"""The twin on a device: where its weights are (paths, the embedded model), which backend and precision run
it, loading through transformers + PEFT or Unsloth, the twin as an adapter, and the process it runs in."""
