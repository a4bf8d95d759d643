"""zeropad: padding-free, exact packed training for language and vision-language models."""

__version__ = "0.1.0"
