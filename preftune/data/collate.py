"""Collate tokenised examples into a packed, prompt-shared batch for the log-prob engine.

Every example is one prompt followed by one or more answers (2 for a preference pair: chosen,
rejected; 2 for KTO: the completion and another example's completion). The prompt is stored
once; each answer is laid out after it with position ids that restart where the prompt ends,
and a block attention mask lets each answer see the prompt and itself but never a sibling answer. Several examples share a row (first-fit
decreasing into rows as long as the longest example), so short pairs do not pay for long ones.

Layout of one example inside a row (P prompt tokens, answers A0, A1):

    tokens     p0 .. p(P-1) | a0_0 .. a0_(n0-1) | a1_0 .. a1_(n1-1)
    positions  0  .. P-1    | P    .. P+n0-1    | P    .. P+n1-1
    sees       prompt       | prompt + A0       | prompt + A1

Answer token j of answer k is predicted by the hidden state one step before it in *its own*
sequence: the last prompt token for j = 0, else the previous token of the same answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

PROMPT_BRANCH = 0
PAD_EXAMPLE = -1


@dataclass
class PackedBatch:
    """A batch ready for `preftune.logprobs.sequence_logps`.

    Sequences are numbered answer-slot-major: with E examples of K answers each, sequence
    `k * E + e` is answer k of example e (for pairs: [0, E) chosen, [E, 2E) rejected).
    """

    input_ids: torch.Tensor  # [rows, length] long
    position_ids: torch.Tensor  # [rows, length] long
    attention_mask: torch.Tensor  # [rows, 1, length, length] bool, True = may attend
    target_index: torch.Tensor  # [targets] long, flat index (row * length + col) of the predicting position
    target_ids: torch.Tensor  # [targets] long, the answer token being scored
    target_sequence: torch.Tensor  # [targets] long, which sequence the target belongs to
    num_examples: int
    answers_per_example: int
    row_fill: list[int]  # real tokens at the start of each row; the rest of the row is padding

    @property
    def num_sequences(self) -> int:
        return self.num_examples * self.answers_per_example

    @property
    def num_tokens(self) -> int:
        """Tokens the model actually runs, padding included."""
        return self.input_ids.numel()

    def in_one_row(self) -> PackedBatch:
        """The same examples end to end in one row, the padding dropped: same sequences, targets and attention.

        Every row's real tokens come first, so they keep their order; the row masks become the
        blocks of one block-diagonal mask. Worth it only where attention skips what the mask hides
        (preftune/logprobs/attention.py): a dense kernel would pay for the row's length squared.
        """
        rows, length = self.input_ids.shape
        if rows == 1 and self.row_fill[0] == length:
            return self
        device = self.input_ids.device
        kept = torch.cat([torch.arange(fill, device=device) + row * length for row, fill in enumerate(self.row_fill)])
        new_place = torch.full((rows * length,), -1, dtype=torch.long, device=device)
        new_place[kept] = torch.arange(kept.numel(), device=device)
        mask = torch.block_diag(*(self.attention_mask[row, 0, :fill, :fill] for row, fill in enumerate(self.row_fill)))
        return PackedBatch(
            input_ids=self.input_ids.flatten()[kept][None],
            position_ids=self.position_ids.flatten()[kept][None],
            attention_mask=mask[None, None],
            target_index=new_place[self.target_index],
            target_ids=self.target_ids,
            target_sequence=self.target_sequence,
            num_examples=self.num_examples,
            answers_per_example=self.answers_per_example,
            row_fill=[kept.numel()],
        )

    def to(self, device: torch.device | str) -> PackedBatch:
        fields = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in vars(self).items()}
        return PackedBatch(**fields)


def pack_examples(
    prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[Sequence[int]]], *, pad_id: int
) -> PackedBatch:
    """Pack examples (prompt ids, K answer id lists each) into rows; see the module docstring."""
    if not prompts:
        raise ValueError("cannot pack an empty batch")
    num_answers = {len(example_answers) for example_answers in answers}
    if len(num_answers) != 1:
        raise ValueError(f"every example needs the same number of answers, got {sorted(num_answers)}")
    (answers_per_example,) = num_answers
    num_examples = len(prompts)
    lengths = [len(prompt) + sum(len(a) for a in example_answers) for prompt, example_answers in zip(prompts, answers)]
    for prompt, example_answers in zip(prompts, answers):
        if not prompt or any(not answer for answer in example_answers):
            raise ValueError("every example needs a non-empty prompt (at least one token to predict from) and answers")

    row_length = max(lengths)
    rows: list[list[int]] = []  # example indices per row
    row_fill: list[int] = []
    for example in sorted(range(num_examples), key=lambda e: -lengths[e]):
        for row, fill in enumerate(row_fill):
            if fill + lengths[example] <= row_length:
                rows[row].append(example)
                row_fill[row] += lengths[example]
                break
        else:
            rows.append([example])
            row_fill.append(lengths[example])

    input_ids = torch.full((len(rows), row_length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), row_length), dtype=torch.long)
    example_of = torch.full((len(rows), row_length), PAD_EXAMPLE, dtype=torch.long)
    branch_of = torch.full((len(rows), row_length), PROMPT_BRANCH, dtype=torch.long)
    target_index: list[int] = []
    target_ids: list[int] = []
    target_sequence: list[int] = []

    for row, examples in enumerate(rows):
        col = 0
        for example in examples:
            prompt = prompts[example]
            prompt_start = col
            input_ids[row, col : col + len(prompt)] = torch.tensor(prompt)
            position_ids[row, col : col + len(prompt)] = torch.arange(len(prompt))
            example_of[row, col : col + len(prompt)] = example
            col += len(prompt)
            last_prompt_flat = row * row_length + prompt_start + len(prompt) - 1
            for slot, answer in enumerate(answers[example]):
                n = len(answer)
                input_ids[row, col : col + n] = torch.tensor(answer)
                position_ids[row, col : col + n] = torch.arange(len(prompt), len(prompt) + n)
                example_of[row, col : col + n] = example
                branch_of[row, col : col + n] = slot + 1
                first_flat = row * row_length + col
                target_index.extend([last_prompt_flat, *range(first_flat, first_flat + n - 1)])
                target_ids.extend(answer)
                target_sequence.extend([slot * num_examples + example] * n)
                col += n

    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=_block_mask(example_of, branch_of),
        target_index=torch.tensor(target_index, dtype=torch.long),
        target_ids=torch.tensor(target_ids, dtype=torch.long),
        target_sequence=torch.tensor(target_sequence, dtype=torch.long),
        num_examples=num_examples,
        answers_per_example=answers_per_example,
        row_fill=row_fill,
    )


def _block_mask(example_of: torch.Tensor, branch_of: torch.Tensor) -> torch.Tensor:
    """[rows, 1, L, L] bool: query q may attend key k iff k <= q, same example, and k is prompt or q's own answer."""
    length = example_of.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_example = example_of[:, :, None] == example_of[:, None, :]
    key_visible = (branch_of[:, None, :] == PROMPT_BRANCH) | (branch_of[:, None, :] == branch_of[:, :, None])
    mask = causal & same_example & key_visible & (example_of[:, :, None] != PAD_EXAMPLE)
    # Padding queries attend to themselves only: a query with no visible key makes SDPA return NaN.
    mask |= torch.eye(length, dtype=torch.bool) & (example_of == PAD_EXAMPLE)[:, :, None]
    return mask[:, None]


def collate_pairs(pairs: Sequence, *, pad_id: int) -> PackedBatch:
    """Pack paired `TokenizedExample`s (prompt, chosen, rejected): sequences [0,E) chosen, [E,2E) rejected."""
    return pack_examples(
        [pair.prompt_ids for pair in pairs],
        [(pair.chosen_ids, pair.rejected_ids) for pair in pairs],
        pad_id=pad_id,
    )


def collate_unpaired(examples: Sequence, *, pad_id: int) -> PackedBatch:
    """Pack unpaired examples (prompt_ids, completion_ids) for KTO: [0,E) completions, [E,2E) mismatched completions.

    Example e's second answer is example (e − 1 mod E)'s completion under e's own prompt: the
    mismatched prompt/completion pairs KTO estimates its KL baseline from. It shares e's prompt
    in the row like a pair's rejected answer, so the mismatched forward costs only its answer
    tokens. With one example the "mismatch" is its own completion.
    """
    completions = [example.completion_ids for example in examples]
    shifted = completions[-1:] + completions[:-1]
    return pack_examples(
        [example.prompt_ids for example in examples],
        [(completion, mismatched) for completion, mismatched in zip(completions, shifted)],
        pad_id=pad_id,
    )
