"""Training pipeline for pdserve's own small model (models/pdserve-tiny-py).

No weights can be downloaded where pdserve is developed, so it trains one: a small Llama-architecture model
on the Python standard library's source (code and docstrings), which every machine with Python has offline.

Modules:
  data       collect the stdlib ``.py`` files, split them by file into train / held-out
  tokenizer  train the byte-level BPE tokenizer (``tokenizers``)
  train      the single-command training entry point (``python -m training.train``)
  eval       held-out perplexity (model-agnostic: takes a logits callable) and the unigram baseline
  card       the model card (README.md) and the loss-curve PNG
"""

EOT = "<|endoftext|>"
