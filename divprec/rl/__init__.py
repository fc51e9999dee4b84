"""Reinforcement-learning probes of pre-trained models (GRPO on verifiable synthetic tasks)."""
