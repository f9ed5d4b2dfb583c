"""Tests for kto_np.data: tokenizer, task judges, example and prompt generation, batching, KL pairs.

The judges are checked against independent rules written here with Python built-ins (sorted(),
slicing), on hand-written cases and on random ones.
"""

import math
import zlib
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kto_np.backend import to_numpy
from kto_np.data import (
    DEFAULT_MISTAKES,
    MISTAKES,
    Batch,
    Example,
    Task,
    Tokenizer,
    collate,
    completion_from_tokens,
    is_heldout_prompt,
    iterate_batches,
    make_examples,
    make_prompts,
    make_task,
    prompt_tokens,
)

VOCAB = "_0123456789=."
digit_strings = st.text(alphabet="0123456789", min_size=2, max_size=6)


def expected_sort(digits: str) -> str:
    return "".join(sorted(digits)) + "."


def expected_reverse(digits: str) -> str:
    return digits[::-1] + "."


# ----------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_vocabulary():
    tok = Tokenizer()
    assert tok.vocab_size == len(VOCAB) == 13
    assert tok.pad_id == 0 and tok.decode([tok.pad_id]) == "_"
    assert tok.decode([tok.end_id]) == "."
    assert tok.encode("0123456789=.") == list(range(1, 13))


@pytest.mark.parametrize("text", ["", "3142=1234.", "0", "99=.", "_=_"])
def test_tokenizer_round_trip_hand_cases(text):
    tok = Tokenizer()
    assert tok.decode(tok.encode(text)) == text


@given(st.text(alphabet=VOCAB, max_size=30))
def test_tokenizer_round_trip_text(text):
    tok = Tokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids, dtype=np.int64)) == text


@given(st.lists(st.integers(0, 12), max_size=30))
def test_tokenizer_round_trip_ids(ids):
    tok = Tokenizer()
    assert tok.encode(tok.decode(ids)) == ids


def test_tokenizer_bad_input():
    tok = Tokenizer()
    with pytest.raises(ValueError, match="text"):
        tok.encode("31a2=")
    with pytest.raises(TypeError, match="text"):
        tok.encode(3142)
    with pytest.raises(ValueError, match="ids"):
        tok.decode([1, 13])
    with pytest.raises(ValueError, match="ids"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="ids"):
        tok.decode(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(TypeError, match="ids"):
        tok.decode(np.array([1.5]))
    with pytest.raises(ValueError, match="symbols"):
        Tokenizer(symbols="0123.")
    with pytest.raises(ValueError, match="symbols"):
        Tokenizer(symbols="_0012.")


# ----------------------------------------------------------------------------------------------
# judges


SORT_CASES = [
    ("3142=", "1234.", 1),
    ("3142=", "4321.", 0),   # descending
    ("3142=", "3142.", 0),   # unsorted copy
    ("3142=", "1234", 0),    # no end token
    ("3142=", "123.", 0),    # dropped digit
    ("3142=", "12344.", 0),  # duplicated digit
    ("3142=", "1243.", 0),   # swapped pair
    ("3142=", "1235.", 0),   # ordered, not a permutation
    ("3142=", "1234..", 0),
    ("3142=", "", 0),
    ("3142=", ".", 0),
    ("3142=", "12_4.", 0),   # pad inside
    ("3142=", "=1234.", 0),
    ("1123=", "1123.", 1),
    ("1123=", "1233.", 0),   # ordered, wrong multiset
    ("0000=", "0000.", 1),
    ("9081=", "0189.", 1),
]

REVERSE_CASES = [
    ("3142=", "2413.", 1),
    ("3142=", "3142.", 0),
    ("3142=", "1234.", 0),
    ("3142=", "2413", 0),
    ("3142=", "241.", 0),
    ("3142=", "24133.", 0),
    ("3142=", "4213.", 0),
    ("1221=", "1221.", 1),   # palindrome: the copy is correct
    ("5550=", "0555.", 1),
]


@pytest.mark.parametrize("prompt,completion,verdict", SORT_CASES)
def test_sort_judge_hand_cases(prompt, completion, verdict):
    assert make_task("sort", 4).judge(prompt, completion) == verdict, (prompt, completion)


@pytest.mark.parametrize("prompt,completion,verdict", REVERSE_CASES)
def test_reverse_judge_hand_cases(prompt, completion, verdict):
    assert make_task("reverse", 4).judge(prompt, completion) == verdict, (prompt, completion)


@given(digits=digit_strings, data=st.data())
def test_judges_accept_exactly_the_rule(digits, data):
    """For any digit string: the judge accepts the sorted / reversed answer and, among permutations
    of the digits and arbitrary strings, exactly those equal to it."""
    prompt = digits + "="
    sort_task, reverse_task = make_task("sort", len(digits)), make_task("reverse", len(digits))
    assert sort_task.judge(prompt, expected_sort(digits)) == 1
    assert reverse_task.judge(prompt, expected_reverse(digits)) == 1
    assert sort_task.answer(prompt) == expected_sort(digits)
    assert reverse_task.answer(prompt) == expected_reverse(digits)
    permutation = "".join(data.draw(st.permutations(list(digits)))) + "."
    anything = data.draw(st.text(alphabet=VOCAB, max_size=len(digits) + 2))
    for completion in (permutation, anything, anything + "."):
        for task, expected in ((sort_task, expected_sort(digits)), (reverse_task, expected_reverse(digits))):
            verdict = task.judge(prompt, completion)
            assert verdict == int(completion == expected), (task.name, prompt, completion, verdict)


def test_judges_on_random_cases():
    rng = np.random.default_rng(0)
    accepted = Counter()
    for _ in range(2000):
        n = int(rng.integers(2, 7))
        digits = "".join(str(d) for d in rng.integers(0, 10, size=n))
        prompt = digits + "="
        body = "".join(rng.permutation(list(digits))) if rng.random() < 0.7 else \
            "".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(n - 1, n + 2))))
        completion = body + "."
        for name, expected in (("sort", expected_sort), ("reverse", expected_reverse)):
            verdict = make_task(name, n).judge(prompt, completion)
            assert verdict == int(completion == expected(digits)), (name, prompt, completion, verdict)
            accepted[name] += verdict
    assert accepted["sort"] > 50 and accepted["reverse"] > 50  # both verdicts were exercised


def test_mistake_completions_and_classify():
    task = make_task("sort", 4, MISTAKES["sort"])
    assert task.mistake_completions("3142=", "descending") == ["4321."]
    assert task.mistake_completions("3142=", "copy") == ["3142."]
    assert task.mistake_completions("3142=", "drop") == ["234.", "134.", "124.", "123."]
    assert task.mistake_completions("3142=", "duplicate") == ["11234.", "12234.", "12334.", "12344."]
    assert task.mistake_completions("3142=", "swap") == ["2134.", "1324.", "1243."]
    assert make_task("reverse", 3).mistake_completions("123=", "swap") == ["231.", "312."]
    assert task.classify("3142=", "1234.") == "correct"
    assert task.classify("3142=", "4321.") == "descending"
    assert task.classify("3142=", "3142.") == "copy"
    assert task.classify("3142=", "124.") == "drop"
    assert task.classify("3142=", "9.") == "other"
    assert task.classify("1234=", "1234.") == "correct"  # a copy of a sorted prompt is correct


def test_task_bad_input():
    with pytest.raises(ValueError, match="name"):
        make_task("add")
    with pytest.raises(ValueError, match="num_digits"):
        make_task("sort", 1)
    with pytest.raises(ValueError, match="num_digits"):
        make_task("sort", 13)
    with pytest.raises(TypeError, match="num_digits"):
        make_task("sort", 4.0)
    with pytest.raises(ValueError, match="mistakes"):
        make_task("reverse", 4, ("descending",))
    with pytest.raises(ValueError, match="mistakes"):
        make_task("sort", 4, ())
    with pytest.raises(ValueError, match="mistakes"):
        make_task("sort", 4, ("copy", "copy"))
    with pytest.raises(TypeError, match="mistakes"):
        make_task("sort", 4, "copy")
    task = make_task("sort", 4)
    for bad_prompt in ("3142", "314=", "31425=", "31a2=", "3142."):
        with pytest.raises(ValueError, match="prompt"):
            task.judge(bad_prompt, "1234.")
    with pytest.raises(TypeError, match="completion"):
        task.judge("3142=", 1234)
    with pytest.raises(ValueError, match="kind"):
        task.mistake_completions("3142=", "rotate")


# ----------------------------------------------------------------------------------------------
# examples and prompts


@pytest.mark.parametrize("name", ["sort", "reverse"])
@pytest.mark.parametrize("num_digits", [2, 3, 5])
def test_make_examples_labels_are_the_judge(name, num_digits):
    task = make_task(name, num_digits)
    examples = make_examples(task, 300, seed=3)
    assert len(examples) == 300
    expected = expected_sort if name == "sort" else expected_reverse
    kinds = Counter()
    for prompt, completion, label in examples:
        assert len(prompt) == num_digits + 1 and prompt.endswith("=") and prompt[:-1].isdigit()
        assert label == int(completion == expected(prompt[:-1])), (prompt, completion, label)
        assert not is_heldout_prompt(prompt), prompt
        kinds[task.classify(prompt, completion)] += 1
    assert kinds["other"] == 0 and 0 < kinds["correct"] < 300, kinds
    for kind in DEFAULT_MISTAKES[name]:  # every mistake is used
        assert any(label == 0 and completion in task.mistake_completions(prompt, kind)
                   for prompt, completion, label in examples), kind


@pytest.mark.parametrize("n,fraction", [(200, 0.5), (201, 0.5), (100, 0.1), (7, 0.0), (7, 1.0), (5, 0.3)])
def test_desirable_fraction_is_exact(n, fraction):
    examples = make_examples(make_task("sort", 4), n, seed=1, desirable_fraction=fraction)
    assert sum(e.label for e in examples) == math.floor(n * fraction + 0.5)


def test_labels_are_shuffled():
    labels = [e.label for e in make_examples(make_task("sort", 4), 100, seed=2)]
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True)


def test_undesirable_examples_when_mistakes_often_coincide():
    """With only "copy" and 2 digits, many prompts ("11=", "19=") have no wrong copy; they are redrawn."""
    task = make_task("sort", 2, ("copy",))
    examples = make_examples(task, 100, seed=0, desirable_fraction=0.0)
    for prompt, completion, label in examples:
        assert label == 0 and completion == prompt[:-1] + "." and prompt[0] > prompt[1]


def test_make_examples_is_deterministic():
    task = make_task("sort", 4)
    first = make_examples(task, 50, seed=11)
    assert first == make_examples(task, 50, seed=11)
    assert first != make_examples(task, 50, seed=12)
    assert all(isinstance(e, Example) for e in first)


def test_heldout_prompts_are_disjoint_from_training_prompts():
    for num_digits in (2, 3, 4):
        task = make_task("sort", num_digits)
        train = {e.prompt for seed in range(3) for e in make_examples(task, 500, seed=seed)}
        heldout = {p for seed in range(3) for p in make_prompts(task, 300, seed=seed)}
        assert train and heldout and not train & heldout, sorted(train & heldout)[:5]
        train_split = set(make_prompts(task, 300, seed=0, split="train"))
        assert not train_split & heldout


def test_heldout_split_is_about_a_fifth():
    prompts = [f"{i:03d}=" for i in range(1000)]
    heldout = [p for p in prompts if is_heldout_prompt(p)]
    assert 150 <= len(heldout) <= 250
    assert heldout == [p for p in prompts if zlib.crc32(p.encode()) % 10 < 2]


def test_make_prompts_is_deterministic_and_well_formed():
    task = make_task("reverse", 5)
    prompts = make_prompts(task, 40, seed=4)
    assert len(prompts) == 40 and prompts == make_prompts(task, 40, seed=4)
    assert prompts != make_prompts(task, 40, seed=5)
    assert all(len(p) == 6 and p.endswith("=") and p[:-1].isdigit() for p in prompts)


def test_examples_and_prompts_bad_input():
    task = make_task("sort", 4)
    with pytest.raises(ValueError, match="n"):
        make_examples(task, 0, seed=0)
    with pytest.raises(TypeError, match="n"):
        make_examples(task, 2.5, seed=0)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="desirable_fraction"):
            make_examples(task, 10, seed=0, desirable_fraction=bad)
    with pytest.raises(ValueError, match="seed"):
        make_examples(task, 10, seed=-1)
    with pytest.raises(TypeError, match="seed"):
        make_examples(task, 10, seed=None)
    with pytest.raises(TypeError, match="task"):
        make_examples("sort", 10, seed=0)
    with pytest.raises(ValueError, match="n"):
        make_prompts(task, -3, seed=0)
    with pytest.raises(ValueError, match="split"):
        make_prompts(task, 3, seed=0, split="test")
    with pytest.raises(TypeError, match="task"):
        make_prompts("sort", 3, seed=0)


# ----------------------------------------------------------------------------------------------
# collate and KL pairs


def _decode_row(tok, row):
    return tok.decode(to_numpy(row).astype(np.int64))


def _check_rows(tok, tokens, mask, prompts, completions, dtype):
    tokens, mask = to_numpy(tokens), to_numpy(mask)
    assert tokens.dtype == np.int64 and mask.dtype == np.dtype(dtype)
    assert tokens.shape == mask.shape
    for b, (prompt, completion) in enumerate(zip(prompts, completions)):
        n_p, n_c = len(prompt), len(completion)
        assert _decode_row(tok, tokens[b, :n_p]) == prompt
        assert _decode_row(tok, tokens[b, n_p:n_p + n_c]) == completion
        assert np.all(tokens[b, n_p + n_c:] == tok.pad_id), f"row {b} padding: {tokens[b]}"
        expected_mask = np.zeros(tokens.shape[1])
        expected_mask[n_p:n_p + n_c] = 1.0
        np.testing.assert_array_equal(mask[b], expected_mask, err_msg=f"completion_mask row {b}")
        assert _decode_row(tok, tokens[b][mask[b] == 1]) == completion
        assert tokens[b][mask[b] == 1][-1] == tok.end_id or not completion.endswith(".")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_collate_shapes_padding_and_masks(dtype):
    tok = Tokenizer()
    examples = [Example("3142=", "1234.", 1), Example("3142=", "12344.", 0),
                Example("0000=", "000.", 0), ("9081=", "0189.", True)]
    batch = collate(examples, tok, dtype=dtype)
    assert isinstance(batch, Batch)
    prompts = ["3142=", "3142=", "0000=", "9081="]
    completions = ["1234.", "12344.", "000.", "0189."]
    assert batch.prompts == tuple(prompts) and batch.completions == tuple(completions)
    assert to_numpy(batch.tokens).shape == (4, 11)
    np.testing.assert_array_equal(to_numpy(batch.labels), [1, 0, 0, 1])
    assert to_numpy(batch.labels).dtype == np.int64
    _check_rows(tok, batch.tokens, batch.completion_mask, prompts, completions, dtype)
    # KL row i: prompt i with the completion of example (i - 1) mod B (TRL's [c[-1]] + c[:-1]).
    kl_completions = ["0189.", "1234.", "12344.", "000."]
    assert batch.kl_completions == tuple(kl_completions)
    assert to_numpy(batch.kl_tokens).shape == (4, 11)
    _check_rows(tok, batch.kl_tokens, batch.kl_completion_mask, prompts, kl_completions, dtype)


def test_collate_kl_rows_use_another_example(rng):
    tok = Tokenizer()
    examples = make_examples(make_task("reverse", 3), 64, seed=5)
    for batch_size in (2, 3, 7, 16):
        batch_examples = [examples[i] for i in rng.choice(64, size=batch_size, replace=False)]
        batch = collate(batch_examples, tok)
        kl_tokens, kl_mask = to_numpy(batch.kl_tokens), to_numpy(batch.kl_completion_mask)
        for i in range(batch_size):
            source = (i - 1) % batch_size
            assert source != i
            prompt = batch_examples[i].prompt
            completion = batch_examples[source].completion
            assert _decode_row(tok, kl_tokens[i][kl_mask[i] == 0]).rstrip("_") == prompt
            assert _decode_row(tok, kl_tokens[i][kl_mask[i] == 1]) == completion
        # every completion appears exactly once among the KL rows
        assert Counter(batch.kl_completions) == Counter(batch.completions)


def test_collate_batch_of_one_pairs_the_example_with_itself():
    batch = collate([Example("3142=", "4321.", 0)], Tokenizer())
    np.testing.assert_array_equal(to_numpy(batch.kl_tokens), to_numpy(batch.tokens))
    np.testing.assert_array_equal(to_numpy(batch.kl_completion_mask), to_numpy(batch.completion_mask))


def test_collate_max_len():
    tok = Tokenizer()
    examples = [Example("3142=", "1234.", 1), Example("3142=", "12344.", 0)]
    batch = collate(examples, tok, max_len=16)
    assert to_numpy(batch.tokens).shape == (2, 16) and to_numpy(batch.kl_tokens).shape == (2, 16)
    _check_rows(tok, batch.tokens, batch.completion_mask, ["3142="] * 2, ["1234.", "12344."], "float32")
    collate(examples, tok, max_len=11)
    with pytest.raises(ValueError, match="max_len"):
        collate(examples, tok, max_len=10)
    with pytest.raises(ValueError, match="max_len"):
        collate(examples, tok, max_len=0)


def test_collate_bad_input():
    tok = Tokenizer()
    good = Example("3142=", "1234.", 1)
    with pytest.raises(ValueError, match="examples"):
        collate([], tok)
    with pytest.raises(ValueError, match=r"examples\[1\] prompt"):
        collate([good, Example("31a2=", "1234.", 1)], tok)
    with pytest.raises(ValueError, match=r"examples\[0\] completion"):
        collate([Example("3142=", "12 34.", 1)], tok)
    with pytest.raises(ValueError, match=r"examples\[0\]"):
        collate([Example("3142=", "1234.", 2)], tok)
    with pytest.raises(ValueError, match=r"examples\[0\]"):
        collate([Example("", "1234.", 1)], tok)
    with pytest.raises(ValueError, match=r"examples\[0\]"):
        collate([Example("3142=", "", 1)], tok)
    with pytest.raises(TypeError, match=r"examples\[0\]"):
        collate([("3142=", "1234.")], tok)
    with pytest.raises(TypeError, match="examples"):
        collate("3142=1234.", tok)
    with pytest.raises(TypeError, match="tokenizer"):
        collate([good], None)
    with pytest.raises(ValueError, match="dtype"):
        collate([good], tok, dtype="float16")


# ----------------------------------------------------------------------------------------------
# batch order


def test_iterate_batches_covers_every_example_once():
    examples = make_examples(make_task("sort", 3), 50, seed=0)
    batches = iterate_batches(examples, 16, seed=0)
    assert [len(b) for b in batches] == [16, 16, 16, 2]
    seen = [e for b in batches for e in b]
    assert sorted(seen) == sorted(examples) and seen != examples
    dropped = iterate_batches(examples, 16, seed=0, drop_last=True)
    assert [len(b) for b in dropped] == [16, 16, 16] and dropped == batches[:3]


def test_iterate_batches_is_deterministic_per_seed_and_epoch():
    examples = list(range(40))
    order = lambda **kw: [i for b in iterate_batches(examples, 8, **kw) for i in b]  # noqa: E731
    assert order(seed=3, epoch=2) == order(seed=3, epoch=2)
    assert order(seed=3, epoch=2) == list(np.random.default_rng([3, 2]).permutation(40))
    assert order(seed=3, epoch=2) != order(seed=3, epoch=1)
    assert order(seed=3, epoch=0) != order(seed=4, epoch=0)


def test_iterate_batches_bad_input():
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches([1, 2, 3], 0, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches([1, 2, 3], 4, seed=0, drop_last=True)
    with pytest.raises(ValueError, match="examples"):
        iterate_batches([], 2, seed=0)
    with pytest.raises(ValueError, match="epoch"):
        iterate_batches([1, 2], 2, seed=0, epoch=-1)
    with pytest.raises(ValueError, match="seed"):
        iterate_batches([1, 2], 2, seed=-5)


# ----------------------------------------------------------------------------------------------
# generation helpers


def test_prompt_tokens():
    tok = Tokenizer()
    task = make_task("sort", 5)
    prompts = make_prompts(task, 6, seed=0)
    ids = to_numpy(prompt_tokens(prompts, tok))
    assert ids.shape == (6, task.prompt_length) and ids.dtype == np.int64
    assert [tok.decode(row) for row in ids] == prompts
    with pytest.raises(ValueError, match="prompts"):
        prompt_tokens(["3142=", "31425="], tok)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        prompt_tokens(["3142=", "31x2="], tok)
    with pytest.raises(ValueError, match="prompts"):
        prompt_tokens([], tok)
    with pytest.raises(TypeError, match="prompts"):
        prompt_tokens("3142=", tok)


def test_completion_from_tokens():
    tok = Tokenizer()
    assert completion_from_tokens(tok.encode("1234.5=_."), tok) == "1234."
    assert completion_from_tokens(np.array(tok.encode("12.")), tok) == "12."
    assert completion_from_tokens(tok.encode("1234"), tok) == "1234"
    assert completion_from_tokens(tok.encode("12_4.99")) == "12_4."
    assert completion_from_tokens([], tok) == ""
    assert make_task("sort", 4).judge("3142=", completion_from_tokens(tok.encode("12_4."), tok)) == 0
    with pytest.raises(TypeError, match="tokenizer"):
        completion_from_tokens([1, 2], "tokenizer")


def test_task_defaults_match_make_task():
    assert Task() == make_task("sort", 4)
    assert make_task("reverse").mistakes == DEFAULT_MISTAKES["reverse"]
