"""Reward functions for the online methods: built-ins, user functions by dotted path, weighted sums.

A reward function scores a batch of completions:

    fn(prompts: list[str], completions: list[str], **columns: list) -> list[float]

`columns` are the prompt dataset's other fields, one value per completion (a prompt's value
repeated for each of its G completions). User functions are named `"package.module:function"`
and imported with importlib (never eval). Configured as a list of terms, e.g.

    - {function: regex, pattern: "^<answer>.*</answer>$", match: fullmatch, weight: 0.5}
    - {function: exact_match, column: answer, extract: "<answer>(.*)</answer>"}
    - {function: mypackage.rewards:politeness, weight: 2.0}

and combined as Σ_k weight_k · reward_k per completion.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, field_validator

from preftune.errors import ConfigError, DataError, PreftuneError
from preftune.model.loading import load_tokenizer
from preftune.online.reward_model import build_reward_model, score_texts


class RewardFunction(Protocol):
    def __call__(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]: ...


# ---------------------------------------------------------------- settings


class _Term(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: float = Field(1.0, description="this reward's factor in the weighted sum")


class RegexReward(_Term):
    """1.0 when the completion matches `pattern`, else 0.0 (`match: fullmatch` for a format check)."""

    function: Literal["regex"]
    pattern: str = Field(description="a Python regular expression")
    match: Literal["search", "fullmatch"] = Field(
        "search", description="search = the pattern occurs anywhere; fullmatch = the whole completion (stripped) has the format"
    )
    ignore_case: bool = False
    dotall: bool = Field(True, description="'.' also matches newlines (formats usually span lines)")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"not a valid regular expression: {error}") from None
        return pattern


class LengthReward(_Term):
    """1 − min(1, |n − target| / target): 1 at the target length, falling linearly to 0 at 0 or 2 × target and beyond."""

    function: Literal["length"]
    target: int = Field(ge=1, description="the wanted length")
    unit: Literal["words", "characters"] = Field("words", description="words = whitespace-separated pieces")


class ExactMatchReward(_Term):
    """1.0 when the completion's answer equals the reference answer in `column`, else 0.0."""

    function: Literal["exact_match"]
    column: str = Field("answer", description="the dataset column holding the reference answer")
    extract: str | None = Field(
        None, description="a regex with one group: the answer is its LAST match in the completion (none = 0.0); null = the whole completion"
    )
    normalize: bool = Field(True, description="compare case-folded, with surrounding and repeated whitespace removed")

    @field_validator("extract")
    @classmethod
    def _one_group(cls, pattern: str | None) -> str | None:
        if pattern is None:
            return None
        try:
            groups = re.compile(pattern).groups
        except re.error as error:
            raise ValueError(f"not a valid regular expression: {error}") from None
        if groups != 1:
            raise ValueError(f"needs exactly one capturing group, has {groups}")
        return pattern


class ContainsReward(_Term):
    """1.0 when the completion contains `text`, else 0.0."""

    function: Literal["contains"]
    text: str = Field(min_length=1, description="the token or substring to look for")
    ignore_case: bool = False


class RewardModelReward(_Term):
    """The score of a sequence-classification reward model folder (e.g. `export_reward_model`'s output) on prompt + completion."""

    function: Literal["reward_model"]
    path: str = Field(description="a local folder with config.json, model.safetensors and the tokenizer")
    batch_size: int = Field(8, ge=1)
    max_length: int | None = Field(None, ge=1, description="keep at most this many tokens (the last ones)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("cpu", description="torch device for the reward model, e.g. cpu or cuda")


class CustomReward(_Term):
    """A user function `package.module:function` with the reward-function signature."""

    function: str = Field(description="package.module:function")

    @field_validator("function")
    @classmethod
    def _dotted_path(cls, function: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", function):
            raise ValueError(
                f"unknown reward function '{function}': use a built-in ({', '.join(BUILTINS)}) "
                "or a user function 'package.module:function'"
            )
        return function


BUILTINS: dict[str, type[_Term]] = {
    "regex": RegexReward,
    "length": LengthReward,
    "exact_match": ExactMatchReward,
    "contains": ContainsReward,
    "reward_model": RewardModelReward,
}


def _term_kind(value: Any) -> str:
    function = value.get("function") if isinstance(value, dict) else getattr(value, "function", None)
    return function if function in BUILTINS else "custom"


RewardTerm = Annotated[
    Annotated[RegexReward, Tag("regex")]
    | Annotated[LengthReward, Tag("length")]
    | Annotated[ExactMatchReward, Tag("exact_match")]
    | Annotated[ContainsReward, Tag("contains")]
    | Annotated[RewardModelReward, Tag("reward_model")]
    | Annotated[CustomReward, Tag("custom")],
    Discriminator(_term_kind),
]
_TERMS = TypeAdapter(list[RewardTerm])


def validate_reward_terms(raw: Any, *, key: str = "rewards") -> list[_Term]:
    """A YAML list of reward terms → validated settings; a `ConfigError` names `key[index].field`."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{key}: expected a non-empty list of reward terms like {{function: contains, text: ...}}")
    try:
        return _TERMS.validate_python(raw)
    except ValidationError as error:
        problems = []
        for issue in error.errors():
            location = [part for part in issue["loc"] if not isinstance(part, str) or part not in (*BUILTINS, "custom")]
            where = key + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location)
            problems.append(f"{where}: {issue['msg'].removeprefix('Value error, ')}")
        raise ConfigError("invalid reward settings:\n  " + "\n  ".join(problems)) from None


# ---------------------------------------------------------------- functions


def load_reward_function(dotted_path: str) -> RewardFunction:
    """Import `package.module:function` (the attribute may be dotted, e.g. `module:Class.method`)."""
    module_name, separator, attribute = dotted_path.partition(":")
    if not separator or not module_name or not attribute:
        raise ConfigError(f"reward function '{dotted_path}': expected 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise ConfigError(f"reward function '{dotted_path}': module '{module_name}' not found (is it on PYTHONPATH?)") from None
        raise ConfigError(f"reward function '{dotted_path}': importing '{module_name}' failed: {error}") from error
    except Exception as error:  # the user's module raised while importing
        raise ConfigError(f"reward function '{dotted_path}': importing '{module_name}' failed: {error!r}") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"reward function '{dotted_path}': '{module_name}' has no attribute '{attribute}'")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"reward function '{dotted_path}': '{attribute}' is a {type(target).__name__}, not callable")
    return target


def regex_reward(pattern: str, *, match: str = "search", ignore_case: bool = False, dotall: bool = True) -> RewardFunction:
    flags = (re.IGNORECASE if ignore_case else 0) | (re.DOTALL if dotall else 0)
    compiled = re.compile(pattern, flags)

    def reward(prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]:
        if match == "fullmatch":
            return [1.0 if compiled.fullmatch(completion.strip()) else 0.0 for completion in completions]
        return [1.0 if compiled.search(completion) else 0.0 for completion in completions]

    return reward


def length_reward(target: int, *, unit: str = "words") -> RewardFunction:
    def reward(prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]:
        lengths = [len(completion.split()) if unit == "words" else len(completion) for completion in completions]
        return [1.0 - min(1.0, abs(length - target) / target) for length in lengths]

    return reward


def exact_match_reward(*, column: str = "answer", extract: str | None = None, normalize: bool = True) -> RewardFunction:
    extractor = re.compile(extract, re.DOTALL) if extract else None

    def canonical(text: str) -> str:
        return " ".join(text.split()).casefold() if normalize else text

    def reward(prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]:
        if column not in columns:
            raise PreftuneError(
                f"exact_match reward: the data has no column '{column}' (columns: {', '.join(sorted(columns)) or 'none'})"
            )
        scores = []
        for completion, reference in zip(completions, columns[column], strict=True):
            if extractor is not None:
                found = extractor.findall(completion)
                if not found:
                    scores.append(0.0)
                    continue
                completion = found[-1]
            scores.append(1.0 if canonical(completion) == canonical(str(reference)) else 0.0)
        return scores

    return reward


def contains_reward(text: str, *, ignore_case: bool = False) -> RewardFunction:
    needle = text.casefold() if ignore_case else text

    def reward(prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]:
        return [1.0 if needle in (c.casefold() if ignore_case else c) else 0.0 for c in completions]

    return reward


def reward_model_reward(
    path: str, *, batch_size: int = 8, max_length: int | None = None, dtype: str = "float32", device: str = "cpu"
) -> RewardFunction:
    """Loads the model once; each call scores prompt + completion in eval mode without gradient."""
    tokenizer = load_tokenizer(path)
    model = build_reward_model(path, tokenizer, dtype=dtype).to(torch.device(device)).eval()

    def reward(prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]:
        return score_texts(model, tokenizer, prompts, completions, batch_size=batch_size, max_length=max_length)

    return reward


def build_reward_function(term: _Term) -> RewardFunction:
    """The callable a validated term describes (its weight is applied by `CombinedReward`)."""
    if isinstance(term, CustomReward):
        return load_reward_function(term.function)
    builders: dict[str, Callable[..., RewardFunction]] = {
        "regex": regex_reward,
        "length": length_reward,
        "exact_match": exact_match_reward,
        "contains": contains_reward,
        "reward_model": reward_model_reward,
    }
    return builders[term.function](**term.model_dump(exclude={"function", "weight"}))


def required_columns(term: _Term) -> tuple[str, ...]:
    """The dataset columns a reward term reads: `exact_match`'s `column`; for a user function, the
    parameters after (prompts, completions) that have no default (`fn(prompts, completions, answer, **kw)`
    needs `answer`). Columns a function takes from `**columns` with a fallback are not required."""
    if isinstance(term, ExactMatchReward):
        return (term.column,)
    if not isinstance(term, CustomReward):
        return ()
    try:
        parameters = list(inspect.signature(load_reward_function(term.function)).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable without a signature: nothing can be said up front
        return ()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in parameters[2:] if p.kind in named and p.default is inspect.Parameter.empty)


def _unique_names(terms: list[_Term]) -> list[str]:
    names = [term.function for term in terms]
    return [name if names.count(name) == 1 else f"{name}[{index}]" for index, name in enumerate(names)]


def check_reward_columns(terms: list[_Term], examples: list[Any]) -> None:
    """Before training: every example (with `columns` and `origin`) has every column the reward terms need.

    Raises a `DataError` at the first example without one, naming its file and line, the column and the
    reward. Only user functions are imported for this; no reward model is loaded."""
    for name, term in zip(_unique_names(terms), terms):
        for column in required_columns(term):
            for example in examples:
                if column not in example.columns:
                    present = ", ".join(sorted(example.columns)) or "none besides the prompt"
                    raise DataError(
                        f"reward '{name}' needs the column '{column}' in every prompt record, and this one has none "
                        f"(its columns: {present}); add it, or rename a field to it with data.columns",
                        path=example.origin or None, field=column,
                    )


@dataclass
class RewardScores:
    """`total[i]` = Σ_k weight_k · `per_function[name_k][i]` (unweighted per-function rewards, for metrics)."""

    total: list[float]
    per_function: dict[str, list[float]]


class CombinedReward:
    """The weighted sum of several reward functions; checks every function's output."""

    def __init__(self, functions: list[tuple[str, float, RewardFunction]]):
        if not functions:
            raise ConfigError("at least one reward function is needed")
        self.functions = functions
        self.columns: dict[str, tuple[str, ...]] = {}  # reward name -> the dataset columns it needs

    @classmethod
    def from_terms(cls, terms: list[_Term]) -> CombinedReward:
        unique = _unique_names(terms)
        combined = cls([(name, term.weight, build_reward_function(term)) for name, term in zip(unique, terms)])
        combined.columns = {name: required_columns(term) for name, term in zip(unique, terms)}
        return combined

    def columns_for(self, examples: list[Any], rows: list[int]) -> dict[str, list[Any]]:
        """The columns the rewards need, one value per completion (`rows[i]` = the example completion i answers)."""
        needed = sorted({column for columns in self.columns.values() for column in columns})
        return {column: [examples[row].columns[column] for row in rows] for column in needed}

    def score(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> RewardScores:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        for name, values in columns.items():
            if len(values) != len(completions):
                raise ValueError(f"column '{name}' has {len(values)} values for {len(completions)} completions")
        per_function: dict[str, list[float]] = {}
        total = [0.0] * len(completions)
        for name, weight, function in self.functions:
            values = _checked(name, function(prompts, completions, **columns), len(completions))
            per_function[name] = values
            total = [sum_ + weight * value for sum_, value in zip(total, values)]
        return RewardScores(total, per_function)

    def __call__(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]:
        return self.score(prompts, completions, **columns).total


def _checked(name: str, values: Any, expected: int) -> list[float]:
    if not isinstance(values, (list, tuple)) or len(values) != expected:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise PreftuneError(f"reward function '{name}' must return a list of {expected} numbers, got {got}")
    checked = []
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PreftuneError(f"reward function '{name}' returned {value!r} for completion {index}: expected a finite number")
        checked.append(float(value))
    return checked
