"""The shared engine: one trainer, evaluation and inference used by every command."""
