"""Training: the DPO run and the SFT run on one run protocol (lock, checkpoints, resume, divergence stop,
atomic summary), the reference log-prob cache, the completion-only LM head, and the trainer arguments.

The CLI imports this package before `prepare.begin` imports Unsloth, which must come before transformers,
trl and peft; so those libraries (and accelerate, datasets, tqdm's trainer hooks) are imported inside the
functions that use them. torch alone may be imported at the top: Unsloth does not need to precede it.
"""
