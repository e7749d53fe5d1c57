"""Training MMDiT-X: data and caches, the flow-matching objective, LoRA adapters, the loop, torch.distributed.

    python scripts/train.py --data DIR --model-dir MODELS --out RUN --lora-rank 16      (see README, docs/training.md)
"""
