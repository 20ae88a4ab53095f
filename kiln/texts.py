"""Text preprocessing shared by ``kiln import`` and serving: a Hugging Face ``tokenizer.json`` → the int64
arrays an exported text graph takes, with the ``tokenizers`` library (no transformers, no torch).

``kiln import`` checks the served path end to end (this tokenizer, then the ONNX graph) against the
original model run by transformers / sentence-transformers with its own tokenizer, so a tokenizer that
encodes differently fails the import's parity gate instead of drifting in production.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
# The graph inputs a BERT-style encoder takes, in the order the exported graph lists them.
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class TextTokenizer:
    """Encode a batch of strings: truncated to ``max_length`` tokens, padded to the longest in the batch.

    Args:
        path: the model's ``tokenizer.json`` (a fast tokenizer, as ``save_pretrained`` writes it).
        max_length: the most tokens a text keeps (special tokens included).
        inputs: the graph's input names; a subset of :data:`TEXT_INPUTS`.
        pad_id: the padding token's id (masked out by ``attention_mask``).
    """

    def __init__(self, path: str | Path, max_length: int, inputs: list[str], pad_id: int = 0):
        from tokenizers import Tokenizer

        unknown = sorted(set(inputs) - set(TEXT_INPUTS))
        if unknown:
            raise ValueError(f"text graph inputs {unknown} are not tokenizer outputs; known: {TEXT_INPUTS}")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.max_length = int(max_length)
        self.inputs = list(inputs)
        self.tokenizer.no_padding()  # padded here, to the longest text of the batch
        self.tokenizer.enable_truncation(self.max_length)
        self._pad_id = int(pad_id)

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch(list(texts))
        width = max(len(e.ids) for e in encodings)
        out = {
            "input_ids": np.full((len(encodings), width), self._pad_id, dtype=np.int64),
            "attention_mask": np.zeros((len(encodings), width), dtype=np.int64),
            "token_type_ids": np.zeros((len(encodings), width), dtype=np.int64),
        }
        for i, e in enumerate(encodings):
            n = len(e.ids)
            out["input_ids"][i, :n] = e.ids
            out["attention_mask"][i, :n] = 1
            out["token_type_ids"][i, :n] = e.type_ids
        return {name: out[name] for name in self.inputs}

    def count(self, texts: list[str]) -> int:
        """Tokens the texts take after truncation (the usage an OpenAI client is told)."""
        return sum(len(e.ids) for e in self.tokenizer.encode_batch(list(texts)))


def texts_of(array: np.ndarray) -> list[str]:
    """A BYTES tensor's elements (bytes or str) as Python strings."""
    return [t.decode() if isinstance(t, bytes) else str(t) for t in np.asarray(array).reshape(-1)]
