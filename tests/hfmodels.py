"""Tiny, randomly initialised Hugging Face models saved with ``save_pretrained`` (no download, no
network): a BERT with a 30-word WordPiece vocabulary, as a sentence-transformers model (Pooling +
Normalize), a feature extractor and a sequence classifier, and a ViT image classifier. For the
``kiln import`` tests (unit and integration).
"""

from __future__ import annotations

from pathlib import Path

WORDS = [
    "the",
    "a",
    "an",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "hello",
    "world",
    "kiln",
    "model",
    "serve",
    "fast",
    "slow",
    "red",
    "blue",
    "good",
    "bad",
    "great",
    "awful",
    "movie",
    "film",
    "is",
    "was",
    "not",
    "very",
]
LABELS = {0: "negative", 1: "positive"}


def _tiny_bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        **extra,
    )


def _tokenizer(tmp: Path):
    from transformers import BertTokenizerFast

    vocab = tmp / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(str(vocab))


def bert_feature_extractor(dest: Path, seed: int = 0) -> Path:
    """A ``BertModel`` + its fast tokenizer (transformers: feature extraction → mean-pooled embedding)."""
    import torch
    from transformers import BertModel

    torch.manual_seed(seed)
    dest.mkdir(parents=True, exist_ok=True)
    BertModel(_tiny_bert_config()).save_pretrained(dest)
    _tokenizer(dest.parent).save_pretrained(dest)
    return dest


def sentence_transformer(dest: Path, pooling: str = "mean", seed: int = 0) -> Path:
    """A sentence-transformers model: the tiny BERT, ``pooling`` Pooling, Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    base = bert_feature_extractor(dest.parent / f"{dest.name}-base", seed)
    transformer = Transformer(str(base), max_seq_length=32)
    modules = [transformer, Pooling(32, pooling), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save_pretrained(str(dest))
    return dest


def bert_classifier(dest: Path, seed: int = 0) -> Path:
    """A ``BertForSequenceClassification`` with two named labels."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    dest.mkdir(parents=True, exist_ok=True)
    config = _tiny_bert_config(num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    BertForSequenceClassification(config).save_pretrained(dest)
    _tokenizer(dest.parent).save_pretrained(dest)
    return dest


def vit_classifier(dest: Path, seed: int = 0) -> Path:
    """A ``ViTForImageClassification`` on 32×32 RGB images with three labels, and its image processor."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    dest.mkdir(parents=True, exist_ok=True)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        id2label={0: "red", 1: "green", 2: "blue"},
        label2id={"red": 0, "green": 1, "blue": 2},
    )
    ViTForImageClassification(config).save_pretrained(dest)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dest)
    return dest
