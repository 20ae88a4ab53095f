"""Short captions for digits images, in varied phrasings ("a handwritten seven", "the digit 7", ...).

The XBT old dual encoder is trained on digits images paired with these captions, and the new text
model's projection on caption corpora drawn from them. Training uses :data:`TRAIN_TEMPLATES`; the
evaluation queries use :data:`EVAL_TEMPLATES`, phrasings no model saw in training, so the
text→image recall measures generalisation to new wordings, not memorised strings.
"""

from __future__ import annotations

import re

import numpy as np

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ADJECTIVES = ("handwritten", "scanned", "small", "blurry", "neat", "messy", "pixelated", "grey")
NOUNS = ("digit", "number", "numeral")
TRAIN_TEMPLATES = (
    "a {adj} {num}",
    "the {noun} {num}",
    "a {adj} {noun} {num}",
    "an image of the {noun} {num}",
    "a photo of a {adj} {num}",
    "{num}",
    "the {noun} {num}, {adj}",
    "a {num} written by hand",
    "a picture showing the {noun} {num}",
    "{adj} {noun} {num}",
    "this is a {num}",
    "a scan of the {noun} {num}",
)
EVAL_TEMPLATES = (
    "a drawing of the {noun} {num}",
    "someone wrote the {noun} {num}",
    "an example of a {adj} {num}",
    "the {adj} {noun} {num} in a tiny picture",
)


def caption(label: int, rng: np.random.Generator, templates: tuple[str, ...] = TRAIN_TEMPLATES) -> str:
    """A random caption of digit ``label``: template, adjective, noun, the number as word or numeral."""
    if not 0 <= label <= 9:
        raise ValueError(f"digit label must be 0..9, got {label}")
    template = templates[rng.integers(len(templates))]
    num = NUMBER_WORDS[label] if rng.random() < 0.5 else str(label)
    return template.format(
        adj=ADJECTIVES[rng.integers(len(ADJECTIVES))], noun=NOUNS[rng.integers(len(NOUNS))], num=num
    )


def captions(labels: np.ndarray, seed: int, templates: tuple[str, ...] = TRAIN_TEMPLATES) -> list[str]:
    """One caption per label, seeded."""
    rng = np.random.default_rng(seed)
    return [caption(int(y), rng, templates) for y in labels]


def corpus(
    per_class: int, seed: int, templates: tuple[str, ...] = TRAIN_TEMPLATES
) -> tuple[list[str], np.ndarray]:
    """``per_class`` captions of each digit and their labels."""
    labels = np.repeat(np.arange(10), per_class)
    return captions(labels, seed, templates), labels


def vocabulary(templates: tuple[str, ...] = TRAIN_TEMPLATES) -> list[str]:
    """Every word the training captions can contain, sorted (the old text tower's vocabulary)."""
    words: set[str] = set(NUMBER_WORDS) | set(ADJECTIVES) | set(NOUNS) | {str(d) for d in range(10)}
    for t in templates:
        words |= set(
            re.findall(r"[a-z0-9]+", t.replace("{adj}", "").replace("{noun}", "").replace("{num}", ""))
        )
    return sorted(words)
