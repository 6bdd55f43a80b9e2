"""specvlm: lossless speculative decoding for vision-language models, as a Ray Data batch pipeline."""

__version__ = "0.1.0"
