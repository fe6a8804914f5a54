"""twin-dpo: Direct Preference Optimization for a twin language model, on CPU or one GPU."""

__version__ = "0.1.0"
