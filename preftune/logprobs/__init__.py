"""The log-prob engine: per-sequence answer log-probs for every method, evaluator and probe."""

from preftune.logprobs.engine import SequenceLogps, sequence_logps, unshared_sequence_logps

__all__ = ["SequenceLogps", "sequence_logps", "unshared_sequence_logps"]
