"""pocket-r1: grow, run and modify DeepSeek-R1-style reasoning models offline on one computer."""

__version__ = "0.1.0"
