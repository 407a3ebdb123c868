"""Training stages: pretrain (base model from random weights) and GRPO (R1-Zero-style RL)."""
