"""Preference data: load files into examples (a prompt with K answers), tokenise them with an exact prompt/answer boundary, split."""

from preftune.data.formats import FORMATS, load_examples, load_pairs
from preftune.data.records import Example, LoadReport, TokenizedExample
from preftune.data.split import split_train_validation
from preftune.data.tokenize import TokenizationReport, tokenize_answer_boundary, tokenize_examples, tokenize_pairs

__all__ = [
    "FORMATS",
    "Example",
    "LoadReport",
    "TokenizationReport",
    "TokenizedExample",
    "load_examples",
    "load_pairs",
    "split_train_validation",
    "tokenize_answer_boundary",
    "tokenize_examples",
    "tokenize_pairs",
]
