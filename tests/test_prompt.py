"""Prompt stage: normalisation that keeps meaning, the token cap, and the element warnings."""

from __future__ import annotations

from pathlib import Path

import pytest

from liveavatar_core.errors import InputError
from liveavatar_core.prompt import clean_text, estimate_tokens, missing_elements, normalize_prompt

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "prompt.txt"
COMPLETE = "A teacher speaks to the camera in a classroom. Realistic style, soft lighting."


def count_words(text: str) -> int:
    """A stand-in tokenizer with an exact, easy count: one token per word plus end-of-sequence."""
    return len(text.split()) + 1


def test_sample_prompt_is_complete_and_fits():
    p = normalize_prompt(SAMPLE.read_text())
    assert p.warnings == [] and p.missing == ()
    assert not p.truncated and p.tokens_estimated and 100 < p.tokens < 512
    assert p.text == " ".join(SAMPLE.read_text().split())


def test_whitespace_and_invisible_characters():
    raw = "\ufeff  A\u00a0teacher\tspeaks\u200b to\r\nthe\u2028camera\u0007 in a class\u00adroom.\u202e "
    p = normalize_prompt(raw)
    assert p.text == "A teacher speaks to the camera in a classroom."
    assert p.warnings[0].startswith("removed 5 invisible or control characters (U+0007, U+00AD, U+200B")


def test_nfc_composes_also_across_removed_characters():
    text, removed = clean_text("Cafe\u0301 and re\u200b\u0301sume\u0301")
    assert text == "Caf\u00e9 and r\u00e9sum\u00e9" and removed == "\u200b"


def test_meaning_is_never_rewritten():
    raw = "Dr. O'Neil — “QUOTED”, 3½ mins, ﬁne print, naïve café 😀: Lecturer SPEAKS in a LAB; photo."
    assert normalize_prompt(raw).text == raw  # case, punctuation, ligatures and emoji all kept


def test_normalisation_is_idempotent():
    raw = " x\u200d\u0301 \n\n y\u00a0\u00a0z \x00"
    once = normalize_prompt(raw).text
    assert normalize_prompt(once).text == once


@pytest.mark.parametrize("raw", ["", "   \n\t ", "\u200b\u200d\ufeff", "\x00\x07"])
def test_empty_prompt_is_an_input_error(raw):
    with pytest.raises(InputError) as err:
        normalize_prompt(raw)
    assert err.value.subject == "--prompt" and err.value.problem.startswith("is empty")


@pytest.mark.parametrize(
    ("element", "prompt"),
    [
        ("who", "Speaking to the camera in a classroom. Realistic style, soft lighting."),
        ("action", "A teacher in a classroom. Realistic style, soft lighting."),
        ("setting", "A teacher speaks to the camera. Realistic style, soft lighting."),
        ("style", "A teacher speaks to the camera in a classroom."),
    ],
)
def test_each_missing_element_is_warned(element, prompt):
    assert missing_elements(COMPLETE) == ()
    p = normalize_prompt(prompt)
    assert p.missing == (element,)
    assert len(p.warnings) == 1 and p.warnings[0].startswith("the prompt does not")


def test_phrases_and_hyphenated_cues():
    assert missing_elements("A woman explains in front of it, close up.") == ()
    assert missing_elements("A woman explains in front of it, medium-shot.") == ()
    assert missing_elements("A woman explains, shot close up.") == ("setting",)


def test_non_english_prompt_skips_element_checks():
    p = normalize_prompt("一位穿着橙色宇航服的女士对着镜头讲解航天飞机，写实摄影风格。")
    assert p.missing == ()
    assert p.warnings == ["the element checks understand English only; they were skipped for this prompt"]


def test_cap_with_the_engines_tokenizer():
    raw = " ".join(f"w{i}" for i in range(30)) + " " + COMPLETE
    p = normalize_prompt(raw, count_tokens=count_words, max_tokens=10)
    assert p.truncated and not p.tokens_estimated
    assert p.text == " ".join(f"w{i}" for i in range(9)) and p.tokens == 10
    assert "is 44 tokens, over the text encoder's 10; kept the first 9 of 43 words" in p.warnings[0]


def test_cap_with_the_estimate_cuts_at_a_word_boundary():
    raw = " ".join([SAMPLE.read_text()] * 5)
    full = " ".join(raw.split())
    p = normalize_prompt(raw)
    assert p.truncated and p.tokens_estimated and "about" in p.warnings[0]
    assert p.tokens == estimate_tokens(p.text) <= 512
    assert full.startswith(p.text + " ")  # a prefix of whole words
    next_word = full[len(p.text) + 1 :].split(" ")[0]
    assert estimate_tokens(p.text + " " + next_word) > 512  # and the longest such prefix


def test_one_endless_word_is_cut_by_characters():
    p = normalize_prompt("a" * 5000)
    assert p.truncated and 0 < len(p.text) < 5000 and p.tokens <= 512


def test_a_counter_that_has_no_tokenizer_falls_back_to_the_estimate():
    p = normalize_prompt(COMPLETE, count_tokens=lambda s: None)
    assert p.tokens_estimated and p.tokens == estimate_tokens(COMPLETE)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("the", 1 + 1),
        ("photographic", 3 + 1),
        ("a, b.", 4 + 1),
        ("2024", 4 + 1),
        ("日本", 2 + 1),
        ("😀", 4 + 1),
        ("é" * 9, 3 + 1),
    ],
)
def test_estimate_follows_its_documented_rule(text, expected):
    assert estimate_tokens(text) == expected
