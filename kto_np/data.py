"""Synthetic binary-feedback tasks for KTO: prompts, judged completions, batches and KL pairs.

A task maps a digit prompt such as "3142=" to one desirable completion ("1234." for "sort") and to
a few structured mistakes ("4321." descending, "3142." an unsorted copy, a digit dropped, duplicated
or swapped). A program judges any completion by the task's rule, so labels are exact and a policy
can be scored on held-out prompts.

A sequence is laid out language-model style, with no BOS token (the first prompt token is never
scored and need not be predicted):

    tokens          = prompt + completion (ending in the end token ".") + padding on the right
    completion_mask = 0 on the prompt,  1 on every completion token (end token included),  0 on padding

Shape letters: B batch, T time (prompt + completion), T0 prompt length.
"""

from __future__ import annotations

import math
import numbers
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .backend import asarray, resolve_dtype, to_numpy
from .step import Batch, make_batch
from .validation import check_bool, check_choice, check_finite_scalar, check_positive_int

__all__ = [
    "DEFAULT_MISTAKES",
    "MISTAKES",
    "TASK_NAMES",
    "Batch",
    "Example",
    "Task",
    "Tokenizer",
    "collate",
    "completion_from_tokens",
    "is_heldout_prompt",
    "iterate_batches",
    "make_examples",
    "make_prompts",
    "make_task",
    "prompt_tokens",
]

PAD_TEXT = "_"
SEPARATOR = "="
END_TEXT = "."
DIGITS = "0123456789"

TASK_NAMES = ("sort", "reverse")
# Every mistake a task knows, and the ones used when make_task is not told.
MISTAKES = {
    "sort": ("descending", "copy", "drop", "duplicate", "swap"),
    "reverse": ("copy", "drop", "duplicate", "swap"),
}
DEFAULT_MISTAKES = {
    "sort": ("descending", "copy", "drop", "duplicate"),
    "reverse": ("copy", "drop", "duplicate", "swap"),
}
MIN_DIGITS, MAX_DIGITS = 2, 12

# A prompt is held out when crc32(prompt) % HELDOUT_BUCKETS < HELDOUT_TAKEN (20% of all prompts).
HELDOUT_BUCKETS, HELDOUT_TAKEN = 10, 2
SPLITS = ("train", "heldout")
# Separate seed streams, so make_examples(seed=s) and make_prompts(seed=s) draw different numbers.
_EXAMPLES_STREAM, _PROMPTS_STREAM = 0, 1


# ----------------------------------------------------------------------------------------------
# tokenizer


@dataclass(frozen=True)
class Tokenizer:
    """Character-level tokenizer: id i is the character symbols[i]; id 0 is the pad "_".

    The default vocabulary is "_0123456789=." (V = 13): pad, the ten digits, the separator "=" that
    ends a prompt and the end token "." that ends a completion. The pad has a visible character so
    that a generated pad inside a completion shows up (and fails the judge) instead of vanishing.
    """

    symbols: str = PAD_TEXT + DIGITS + SEPARATOR + END_TEXT
    _ids: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.symbols, str):
            raise TypeError(f"symbols must be a str, got {type(self.symbols).__name__}")
        if len(set(self.symbols)) != len(self.symbols):
            repeated = sorted(c for c, k in Counter(self.symbols).items() if k > 1)
            raise ValueError(f"symbols must not repeat a character, got {repeated} more than once")
        if not self.symbols.startswith(PAD_TEXT) or END_TEXT not in self.symbols:
            raise ValueError(
                f"symbols must start with the pad {PAD_TEXT!r} and contain the end token {END_TEXT!r}, "
                f"got {self.symbols!r}"
            )
        object.__setattr__(self, "_ids", {c: i for i, c in enumerate(self.symbols)})

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def end_id(self) -> int:
        return self._ids[END_TEXT]

    def encode(self, text: str, *, name: str = "text") -> list[int]:
        """The id of every character of `text`; `name` is the argument named by errors."""
        if not isinstance(text, str):
            raise TypeError(f"{name} must be a str, got {type(text).__name__}")
        unknown = sorted(set(text) - self._ids.keys())
        if unknown:
            raise ValueError(
                f"{name} must use only the characters {self.symbols!r}, got {unknown} in {text!r}"
            )
        return [self._ids[c] for c in text]

    def decode(self, ids) -> str:
        """The characters of `ids` (a 1-D sequence of ints, NumPy or CuPy array), pads as "_"."""
        values = to_numpy(ids)
        if values.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {values.shape}")
        if values.size and values.dtype.kind not in "iu":
            raise TypeError(f"ids must hold integers, got dtype {values.dtype}")
        if values.size and (values.min() < 0 or values.max() >= self.vocab_size):
            raise ValueError(
                f"ids must be in [0, {self.vocab_size}), got values from {values.min()} to {values.max()}"
            )
        return "".join(self.symbols[i] for i in values.tolist())


# ----------------------------------------------------------------------------------------------
# tasks


@dataclass(frozen=True)
class Task:
    """A digit task with a fixed number of digits, so that every prompt has the same length.

    Prompts are `num_digits` digits followed by "=", e.g. "3142=". The desirable completion is
      sort:    the digits in non-decreasing order + ".",   "3142=" -> "1234."
      reverse: the digits in reverse order + ".",          "3142=" -> "2413."
    Mistakes (each a list of candidate completions built from the prompt digits p and the correct
    answer a, both without the end token):
      descending  sorted(p) reversed (sort only)      copy       p unchanged
      drop        a without the digit at position i   duplicate  a with the digit at position i doubled
      swap        a with positions i and i+1 swapped
    A mistake that happens to equal the correct answer (descending of "1111", a copy of an already
    sorted prompt, a swap of two equal digits) is not a mistake: make_examples never labels it 0.
    """

    name: str = "sort"
    num_digits: int = 4
    mistakes: tuple = DEFAULT_MISTAKES["sort"]

    def __post_init__(self):
        check_choice("name", self.name, TASK_NAMES)
        check_positive_int("num_digits", self.num_digits, minimum=MIN_DIGITS)
        if self.num_digits > MAX_DIGITS:
            raise ValueError(f"num_digits must be <= {MAX_DIGITS}, got {self.num_digits}")
        if isinstance(self.mistakes, str) or not isinstance(self.mistakes, (tuple, list)):
            raise TypeError(f"mistakes must be a tuple of mistake names, got {self.mistakes!r}")
        if len(self.mistakes) == 0:
            raise ValueError(f"mistakes must name at least one of {MISTAKES[self.name]}, got ()")
        for kind in self.mistakes:
            if kind not in MISTAKES[self.name]:
                raise ValueError(
                    f"mistakes must be names from {MISTAKES[self.name]} for task {self.name!r}, got {kind!r}"
                )
        if len(set(self.mistakes)) != len(self.mistakes):
            raise ValueError(f"mistakes must not repeat a name, got {tuple(self.mistakes)}")
        object.__setattr__(self, "mistakes", tuple(self.mistakes))

    @property
    def prompt_length(self) -> int:
        return self.num_digits + len(SEPARATOR)

    def digits_of(self, prompt: str) -> str:
        """The digits of a well-formed prompt ("3142=" -> "3142"); anything else is a ValueError."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        digits = prompt[: -len(SEPARATOR)]
        well_formed = (
            len(prompt) == self.prompt_length
            and prompt.endswith(SEPARATOR)
            and all(c in DIGITS for c in digits)
        )
        if not well_formed:
            raise ValueError(
                f"prompt must be {self.num_digits} digits followed by {SEPARATOR!r}, got {prompt!r}"
            )
        return digits

    def answer(self, prompt: str) -> str:
        """The desirable completion of `prompt`, end token included."""
        digits = self.digits_of(prompt)
        body = "".join(sorted(digits)) if self.name == "sort" else digits[::-1]
        return body + END_TEXT

    def judge(self, prompt: str, completion: str) -> int:
        """1 if `completion` follows the task's rule for `prompt`, else 0. Any string can be judged.

        sort:    body + "." with body a permutation of the prompt digits and body[i] <= body[i+1].
        reverse: body + "." with body[i] == digits[n - 1 - i] for every i.
        """
        digits = self.digits_of(prompt)
        if not isinstance(completion, str):
            raise TypeError(f"completion must be a str, got {type(completion).__name__}")
        if not completion.endswith(END_TEXT):
            return 0
        body = completion[: -len(END_TEXT)]
        n = len(digits)
        if len(body) != n or not all(c in DIGITS for c in body):
            return 0
        if self.name == "sort":
            is_permutation = Counter(body) == Counter(digits)
            is_ordered = all(body[i] <= body[i + 1] for i in range(n - 1))
            return int(is_permutation and is_ordered)
        return int(all(body[i] == digits[n - 1 - i] for i in range(n)))

    def mistake_completions(self, prompt: str, kind: str) -> list[str]:
        """Every completion the mistake `kind` can make on `prompt` (one per position for drop,
        duplicate and swap), end token included. Some may coincide with the correct answer."""
        digits = self.digits_of(prompt)
        check_choice("kind", kind, MISTAKES[self.name])
        a = self.answer(prompt)[: -len(END_TEXT)]
        n = len(a)
        if kind == "descending":
            bodies = ["".join(sorted(digits, reverse=True))]
        elif kind == "copy":
            bodies = [digits]
        elif kind == "drop":
            bodies = [a[:i] + a[i + 1:] for i in range(n)]
        elif kind == "duplicate":
            bodies = [a[: i + 1] + a[i:] for i in range(n)]
        else:  # swap
            bodies = [a[:i] + a[i + 1] + a[i] + a[i + 2:] for i in range(n - 1)]
        return [body + END_TEXT for body in bodies]

    def classify(self, prompt: str, completion: str) -> str:
        """"correct" if the judge accepts `completion`, else the first of the task's mistakes that
        can produce it, else "other". For showing which modes a policy samples."""
        if self.judge(prompt, completion):
            return "correct"
        for kind in self.mistakes:
            if completion in self.mistake_completions(prompt, kind):
                return kind
        return "other"


def make_task(name: str = "sort", num_digits: int = 4, mistakes: Sequence[str] | None = None) -> Task:
    """The task called `name` ("sort" or "reverse") on prompts of `num_digits` digits.

    mistakes: which structured mistakes make the undesirable completions; None gives
    DEFAULT_MISTAKES[name].
    """
    check_choice("name", name, TASK_NAMES)
    return Task(name, num_digits, DEFAULT_MISTAKES[name] if mistakes is None else mistakes)


def is_heldout_prompt(prompt: str) -> bool:
    """Whether `prompt` belongs to the held-out split: crc32(prompt) % 10 < 2 (about 20%).

    The split is a fixed function of the prompt text, so training and held-out prompts are disjoint
    whatever the seeds and sizes.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return zlib.crc32(prompt.encode("utf-8")) % HELDOUT_BUCKETS < HELDOUT_TAKEN


def _check_seed(seed) -> int:
    return check_positive_int("seed", seed, minimum=0)


def _draw_prompts(task: Task, n: int, rng: np.random.Generator, split: str) -> list[str]:
    """n prompts of `split`, digits uniform and independent, drawn with replacement by rejection."""
    want_heldout = split == "heldout"
    keep_rate = HELDOUT_TAKEN / HELDOUT_BUCKETS if want_heldout else 1 - HELDOUT_TAKEN / HELDOUT_BUCKETS
    prompts: list[str] = []
    while len(prompts) < n:
        chunk = int((n - len(prompts)) / keep_rate * 1.25) + 16
        rows = rng.integers(0, len(DIGITS), size=(chunk, task.num_digits))
        for row in rows:
            prompt = "".join(DIGITS[d] for d in row) + SEPARATOR
            if is_heldout_prompt(prompt) == want_heldout:
                prompts.append(prompt)
    return prompts[:n]


def make_prompts(task: Task, n: int, *, seed: int, split: str = "heldout") -> list[str]:
    """n prompts of the held-out split (default) or of the training split, for evaluation or for
    sampling on-policy completions. Digits uniform; prompts drawn with replacement.

    Held-out prompts never occur in make_examples, whatever the seeds (see is_heldout_prompt).
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a Task (see make_task), got {type(task).__name__}")
    n = check_positive_int("n", n)
    seed = _check_seed(seed)
    check_choice("split", split, SPLITS)
    rng = np.random.default_rng([seed, _PROMPTS_STREAM])
    return _draw_prompts(task, n, rng, split)


class Example(NamedTuple):
    """One unpaired feedback example: label 1 (thumbs up) or 0 (thumbs down)."""

    prompt: str
    completion: str
    label: int


def _undesirable_completion(task: Task, prompt: str, rng: np.random.Generator) -> str | None:
    """A wrong completion from a mistake chosen uniformly; the next mistake (in a random order) when
    every candidate of the chosen one equals the correct answer; None when all do."""
    for index in rng.permutation(len(task.mistakes)):
        candidates = task.mistake_completions(prompt, task.mistakes[index])
        wrong = [c for c in candidates if not task.judge(prompt, c)]
        if wrong:
            return wrong[int(rng.integers(len(wrong)))]
    return None


def make_examples(task: Task, n: int, *, seed: int, desirable_fraction: float = 0.5) -> list[Example]:
    """n training examples, exactly floor(n * desirable_fraction + 1/2) of them desirable, in a
    random order. Prompts come from the training split; undesirable completions from task.mistakes.

    Every label is the judge's verdict on the example (checked as the examples are made).
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a Task (see make_task), got {type(task).__name__}")
    n = check_positive_int("n", n)
    seed = _check_seed(seed)
    desirable_fraction = check_finite_scalar("desirable_fraction", desirable_fraction)
    if not 0.0 <= desirable_fraction <= 1.0:
        raise ValueError(f"desirable_fraction must be in [0, 1], got {desirable_fraction}")
    rng = np.random.default_rng([seed, _EXAMPLES_STREAM])
    num_desirable = math.floor(n * desirable_fraction + 0.5)
    wanted_labels = rng.permutation(np.arange(n) < num_desirable).astype(int).tolist()
    prompts = _draw_prompts(task, n, rng, "train")
    examples = []
    for prompt, wanted in zip(prompts, wanted_labels):
        if wanted:
            completion = task.answer(prompt)
        else:
            completion = _undesirable_completion(task, prompt, rng)
            while completion is None:
                prompt = _draw_prompts(task, 1, rng, "train")[0]
                completion = _undesirable_completion(task, prompt, rng)
        label = task.judge(prompt, completion)
        if label != wanted:
            raise RuntimeError(
                f"internal error: made {completion!r} for {prompt!r} as label {wanted}, judge says {label}"
            )
        examples.append(Example(prompt, completion, label))
    return examples


# ----------------------------------------------------------------------------------------------
# batches


def _check_examples(examples) -> list[tuple[str, str, int]]:
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
        raise TypeError(
            f"examples must be a list of (prompt, completion, label), got {type(examples).__name__}"
        )
    if len(examples) == 0:
        raise ValueError("examples must not be empty, got 0 examples")
    checked = []
    for i, example in enumerate(examples):
        if not isinstance(example, (tuple, list)) or len(example) != 3:
            raise TypeError(f"examples[{i}] must be a (prompt, completion, label) triple, got {example!r}")
        prompt, completion, label = example
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise TypeError(f"examples[{i}] must hold a str prompt and completion, got {example!r}")
        if not prompt or not completion:
            raise ValueError(f"examples[{i}] must have a non-empty prompt and completion, got {example!r}")
        if not isinstance(label, (numbers.Integral, np.integer, np.bool_)) or label not in (0, 1):
            raise ValueError(f"examples[{i}] must have label 0 or 1 (or a bool), got {label!r}")
        checked.append((prompt, completion, int(label)))
    return checked


def collate(examples, tokenizer: Tokenizer, *, dtype="float32", max_len: int | None = None) -> Batch:
    """Tokenize, right-pad and mask a list of (prompt, completion, label); build the KL rows.

    T is the longest matched row (or max_len), T' the longest KL row (or max_len). KL row i is
    prompt i + completion (i - 1) mod B (step.make_batch, step.KL_ROTATION), as TRL's KTOTrainer
    builds its KL dataset (completions [c_{B-1}, c_0, ..., c_{B-2}]). With B = 1 the KL row is the
    example itself: a batch of one has no mismatched pair, and a KTO step with KL pairs refuses it
    (TRL refuses a per-device batch of one for the same reason).
    """
    rows = _check_examples(examples)
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be a Tokenizer, got {type(tokenizer).__name__}")
    resolve_dtype(dtype)
    if max_len is not None:
        max_len = check_positive_int("max_len", max_len)
    prompts = tuple(p for p, _, _ in rows)
    completions = tuple(c for _, c, _ in rows)
    prompt_ids = [tokenizer.encode(p, name=f"examples[{i}] prompt") for i, p in enumerate(prompts)]
    completion_ids = [tokenizer.encode(c, name=f"examples[{i}] completion")
                      for i, c in enumerate(completions)]
    return make_batch(prompt_ids, completion_ids, [label for _, _, label in rows], pad_id=tokenizer.pad_id,
                      dtype=dtype, max_len=max_len, prompts=prompts, completions=completions)


def iterate_batches(examples: Sequence, batch_size: int, *, seed: int, epoch: int = 0,
                    drop_last: bool = False) -> list[list]:
    """The examples of one epoch in a shuffled order, cut into batches of `batch_size`.

    The order is a permutation drawn from numpy.random.default_rng([seed, epoch]), so a run resumed
    at epoch e reproduces the order exactly, and each epoch has its own order. The last batch is
    smaller when batch_size does not divide len(examples) (dropped with drop_last=True); a last batch
    of 1 gets a self-paired KL row in collate.
    Returns a list, so len() is the number of steps in the epoch.
    """
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
        raise TypeError(f"examples must be a list of examples, got {type(examples).__name__}")
    if len(examples) == 0:
        raise ValueError("examples must not be empty, got 0 examples")
    batch_size = check_positive_int("batch_size", batch_size)
    seed = _check_seed(seed)
    if isinstance(epoch, bool) or not isinstance(epoch, (numbers.Integral, np.integer)):
        raise TypeError(f"epoch must be an integer, got {type(epoch).__name__} {epoch!r}")
    if int(epoch) < 0:
        raise ValueError(f"epoch must be >= 0, got {int(epoch)}")
    check_bool("drop_last", drop_last)
    if drop_last and batch_size > len(examples):
        raise ValueError(
            f"batch_size must be <= len(examples) ({len(examples)}) with drop_last=True, got {batch_size}"
        )
    order = np.random.default_rng([seed, int(epoch)]).permutation(len(examples))
    stop = len(examples) - len(examples) % batch_size if drop_last else len(examples)
    return [[examples[i] for i in order[start: start + batch_size]] for start in range(0, stop, batch_size)]


# ----------------------------------------------------------------------------------------------
# generation


def prompt_tokens(prompts: Sequence[str], tokenizer: Tokenizer):
    """Prompt ids [B, T0] int64 for generation. All prompts must have the same length (true for the
    prompts of one Task), so there is no padding and generation needs no attention mask."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts must not be empty, got 0 prompts")
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be a Tokenizer, got {type(tokenizer).__name__}")
    rows = [tokenizer.encode(p, name=f"prompts[{i}]") for i, p in enumerate(prompts)]
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1 or lengths[0] == 0:
        raise ValueError(f"prompts must all have the same non-zero length, got lengths {lengths}")
    return asarray(np.array(rows, dtype=np.int64))


def completion_from_tokens(ids, tokenizer: Tokenizer | None = None) -> str:
    """The completion text of generated ids [T1] (the tokens after the prompt): everything up to and
    including the first end token; all of it when there is none (the judge then rejects it).
    Pads inside are kept as "_", so they too make the completion wrong."""
    tokenizer = Tokenizer() if tokenizer is None else tokenizer
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be a Tokenizer, got {type(tokenizer).__name__}")
    text = tokenizer.decode(ids)
    end = text.find(END_TEXT)
    return text if end < 0 else text[: end + 1]
