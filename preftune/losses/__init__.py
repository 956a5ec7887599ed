"""Preference losses: one pure function of log-probs per module, its formula and paper in the docstring.

What data a loss consumes, its settings and its controllers are the method's business
(`preftune.methods`); a loss module knows only tensors.
"""

from preftune.losses.base import LossOutput, implicit_reward_metrics, reward_metrics

__all__ = ["LossOutput", "implicit_reward_metrics", "reward_metrics"]
