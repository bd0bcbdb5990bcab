"""Runnable examples: ``python -m vlmlabel.examples.cartpole``."""
