"""Preference data: load files into text pairs, tokenise them with an exact prompt/answer boundary, split."""

from preftune.data.formats import FORMATS, load_pairs
from preftune.data.records import LoadReport, PreferencePair, TokenizedPair
from preftune.data.split import split_train_validation
from preftune.data.tokenize import TokenizationReport, tokenize_answer_boundary, tokenize_pairs

__all__ = [
    "FORMATS",
    "LoadReport",
    "PreferencePair",
    "TokenizationReport",
    "TokenizedPair",
    "load_pairs",
    "split_train_validation",
    "tokenize_answer_boundary",
    "tokenize_pairs",
]
