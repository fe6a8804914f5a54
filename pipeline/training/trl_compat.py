"""Every TRL internal twin-dpo touches, in one place.

TRL is wrapped, not forked; where the wrapping needs something TRL does not publish, it goes through here.
tests/test_trl_compat.py builds a real DPOTrainer and checks each of these, so a TRL upgrade that renames or
removes one fails that test by name instead of failing a user's run.
"""

from __future__ import annotations

from typing import Any


def tokens_trained(trainer) -> int:
    """Real (non-pad) tokens the trainer has trained on since it started (DPOTrainer and SFTTrainer count them)."""
    return int(trainer._total_train_tokens)


def prepare_inputs(trainer, batch: dict[str, Any]) -> dict[str, Any]:
    """Move a collated batch to the trainer's device the way its own loop does."""
    return trainer._prepare_inputs(batch)


def use_precomputed_reference(trainer) -> None:
    """Switch DPOTrainer to reading `ref_chosen_logps` / `ref_rejected_logps` from each batch (its precompute
    mode) after we filled those columns ourselves, so the reference model never runs during training."""
    trainer.precompute_ref_logps = True
    trainer.args.precompute_ref_log_probs = True


def uses_weighting(trainer) -> bool:
    """DPOTrainer's WPO weighting, which needs `log_sum_sq_probs` from the LM head."""
    return bool(trainer.use_weighting)


def ld_alpha(trainer):
    """LD-DPO's length weighting (None when off): part of the reference log-probs' identity."""
    return trainer.ld_alpha


def fused_output_class():
    """The output type of TRL's fused LM head, or None for a TRL without it."""
    try:
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError:
        return None
    return FusedCausalLMOutput
