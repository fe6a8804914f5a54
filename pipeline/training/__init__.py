"""Training: the DPO run and the SFT run on one run protocol (lock, checkpoints, resume, divergence stop,
atomic summary), the reference log-prob cache, the completion-only LM head, and the trainer arguments."""
