"""Standard LoRA: sequential fine-tuning with no safety mechanism (the erosion baseline)."""
from .base import Method, register


@register
class StandardLoRA(Method):
    name = "standard"
    paper = "Hu et al., LoRA (ICLR 2022)"
    summary = "one LoRA adapter continued across domains, task loss only"
