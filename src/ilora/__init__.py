"""ilora: continual multi-task learning with routing-tuned, iteratively merged LoRA adapters."""

__version__ = "0.1.0"
