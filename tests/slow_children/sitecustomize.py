"""A test device, not part of twin-dpo: on PYTHONPATH with TWIN_DPO_TEST_STEP_DELAY=SECONDS, every Python process
started (the launcher and each training process under it) sleeps that long in each optimizer step, so a test can
kill one process of a tiny model's run at a chosen moment. tests/slow_steps.py does the same for one process."""

import os

if os.environ.get("TWIN_DPO_TEST_STEP_DELAY"):
    import time

    from transformers import Trainer

    _step = Trainer.training_step

    def _slow_step(self, *args, **kwargs):
        time.sleep(float(os.environ["TWIN_DPO_TEST_STEP_DELAY"]))
        return _step(self, *args, **kwargs)

    Trainer.training_step = _slow_step
