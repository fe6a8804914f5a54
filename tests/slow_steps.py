"""`python tests/slow_steps.py DELAY pipeline-args...`: the twin-dpo CLI with every optimizer step slowed by DELAY
seconds, so a test can kill a tiny model's run at a chosen moment. A test device, not a switch in twin-dpo."""

import sys
import time

from transformers import Trainer

from pipeline.cli import main

_step = Trainer.training_step


def _slow_step(self, *args, **kwargs):
    time.sleep(float(sys.argv[1]))
    return _step(self, *args, **kwargs)


Trainer.training_step = _slow_step

if __name__ == "__main__":
    sys.exit(main(sys.argv[2:]))
