"""Prompt sets for text-to-image training and evaluation; a prompt's index is its condition id.

Files:
- `.txt`: one prompt a line (blank lines skipped, surrounding whitespace stripped).
- `.jsonl`: one JSON object a line, `{"prompt": "...", "label": 7}`; `label` (an int, e.g. the digit
  or class a prompt asks for, used for prompt accuracy) is optional but then absent on every line.

The embedded default prompts for digits (`digit_prompts`): templated captions such as
"a handwritten seven" or "a thick 3", each carrying the digit it asks for. Train and eval use
disjoint templates, so evaluation measures prompts phrased in ways the policy was not trained on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_STYLES = ("handwritten", "thick", "thin", "bold", "small", "large", "slanted", "neat")
# "{digit}" is the digit as a word ("seven") or a numeral ("7"), both used
DIGIT_TEMPLATES = {
    "train": ("a {style} {digit}", "the digit {digit}, {style}", "a {style} number {digit}"),
    "eval": ("an image of a {style} {digit}",),
}


@dataclass(frozen=True)
class PromptSet:
    prompts: tuple[str, ...]
    labels: tuple[int, ...] | None = None  # what each prompt asks for (a digit, a class id), if known

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("a prompt set needs at least one prompt")
        empty = [i for i, p in enumerate(self.prompts) if not isinstance(p, str) or not p.strip()]
        if empty:
            raise ValueError(f"prompts must be non-empty strings; prompt {empty[0]} is {self.prompts[empty[0]]!r}")
        if self.labels is not None:
            if len(self.labels) != len(self.prompts):
                raise ValueError(f"{len(self.labels)} labels for {len(self.prompts)} prompts")
            bad = [x for x in self.labels if not isinstance(x, int) or isinstance(x, bool)]
            if bad:
                raise ValueError(f"labels must be integers, got {bad[0]!r}")

    def __len__(self) -> int:
        return len(self.prompts)

    def label_tensor(self) -> torch.Tensor:
        """labels [P] long: condition id -> what that prompt asks for."""
        if self.labels is None:
            raise ValueError("this prompt set carries no labels")
        return torch.tensor(self.labels, dtype=torch.long)


def load_prompts(path: str | Path) -> PromptSet:
    """A prompt set from a `.txt` (one prompt a line) or `.jsonl` file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".txt":
        return PromptSet(tuple(line.strip() for line in lines if line.strip()))
    if path.suffix != ".jsonl":
        raise ValueError(f"prompt file {path} must be .txt (one prompt a line) or .jsonl")
    prompts, labels, numbers = [], [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        numbers.append(number)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f'{path}:{number}: expected an object with a string "prompt", got {line.strip()[:80]}')
        prompts.append(record["prompt"])
        label = record.get("label")
        if label is not None and (not isinstance(label, int) or isinstance(label, bool)):
            raise ValueError(f'{path}:{number}: "label" must be an integer, got {label!r}')
        labels.append(label)
    given = [x is not None for x in labels]
    if any(given) and not all(given):
        first = next(i for i, g in enumerate(given) if g != given[0])
        raise ValueError(f'{path}:{numbers[first]}: "label" must be given on every line or on none')
    return PromptSet(tuple(prompts), tuple(labels) if given and all(given) else None)


def save_prompts(path: str | Path, prompt_set: PromptSet) -> None:
    """Write a prompt set as `.jsonl` (labels included when known)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, prompt in enumerate(prompt_set.prompts):
            record = {"prompt": prompt}
            if prompt_set.labels is not None:
                record["label"] = prompt_set.labels[i]
            f.write(json.dumps(record) + "\n")


def digit_prompts(split: str, styles: Sequence[str] = DIGIT_STYLES) -> PromptSet:
    """The embedded default's prompts for `split` ("train" or "eval"), each labelled with its digit.

    Every template x style x digit, with the digit once as a word and once as a numeral: 480 train and
    160 eval prompts with the default styles.
    """
    if split not in DIGIT_TEMPLATES:
        raise ValueError(f"split must be one of {', '.join(DIGIT_TEMPLATES)}, got {split!r}")
    prompts, labels = [], []
    for template in DIGIT_TEMPLATES[split]:
        for style in styles:
            for digit, word in enumerate(DIGIT_WORDS):
                for form in (word, str(digit)):
                    prompts.append(template.format(style=style, digit=form))
                    labels.append(digit)
    return PromptSet(tuple(prompts), tuple(labels))
