"""Prompt stage: tidy the text without changing what it says, cap it at the text encoder's length,
and point out what a good avatar prompt usually names but this one does not.

Normalisation: Unicode NFC, every kind of whitespace becomes a space, control, format (zero-width,
bidi, soft hyphen) and lone-surrogate characters are removed, runs of spaces collapse to one, and the
ends are trimmed. Nothing else is touched: no case, spelling, punctuation or NFKC changes.
docs/inputs.md lists the keyword heuristics and what each warning means.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import InputError

MAX_TOKENS = 512  # umT5's text length in Wan/LiveAvatar (including the end-of-sequence token)

_REMOVED_CATEGORIES = {"Cc", "Cf", "Cs"}  # control, format (zero-width, bidi, ...), lone surrogates

# Keyword cues for the elements a talking-avatar prompt usually names. A prompt "has" an element when
# any cue occurs as a whole word (lower case) or, for phrases, as a substring of the spaced words.
# They only produce warnings; they never change the prompt.
ELEMENT_CUES: dict[str, frozenset[str]] = {
    "who": frozenset(
        """woman women man men person people lady ladies gentleman gentlemen girl girls boy boys child
        children teenager adult someone individual teacher teachers lecturer lecturers professor
        instructor tutor presenter host anchor newsreader narrator speaker scientist researcher
        engineer doctor nurse astronaut pilot student students expert guide character avatar he she
        his her him mr mrs ms dr""".split()
    ),
    "action": frozenset(
        """speak speaks speaking spoke talk talks talking talked explain explains explaining explained
        present presents presenting presented lecture lectures lecturing lectured teach teaches
        teaching taught say says saying said tell tells telling narrate narrates narrating describe
        describes describing discuss discusses discussing address addresses addressing introduce
        introduces introducing answer answers answering read reads reading sing sings singing smile
        smiles smiling gesture gestures gesturing nod nods nodding look looks looking gaze gazes
        gazing sit sits sitting seated stand stands standing walk walks walking demonstrate
        demonstrates demonstrating point points pointing laugh laughs laughing chat chats chatting
        announce announces announcing""".split()
    ),
    "setting": frozenset(
        """in-front-of behind background backdrop setting scene room studio classroom hall auditorium
        lab laboratory office library stage kitchen garden park street city outdoors outdoor indoors
        indoor desk table wall window bookshelf bookshelves whiteboard blackboard chalkboard podium
        lectern station spacecraft spaceship cockpit home house forest beach field mountain campus
        corridor flag""".split()
    ),
    "style": frozenset(
        """realistic photorealistic photographic photograph photo cinematic documentary film filmic
        style lighting lit sunlight daylight shot close-up closeup framing focus bokeh depth-of-field
        colour color colours colors tones palette grading contrast detailed resolution 4k 8k hd
        quality animated animation cartoon anime illustration illustrated painting painted drawing
        sketch render rendered 3d realism aesthetic vintage retro broadcast portrait""".split()
    ),
}

_ELEMENT_WARNINGS = {
    "who": 'the prompt does not say who is speaking (e.g. "a woman in her forties with short hair")',
    "action": 'the prompt does not say what they are doing (e.g. "speaks to the camera, explaining ...")',
    "setting": 'the prompt does not say where they are (e.g. "in a bright classroom", "in front of a bookshelf")',
    "style": 'the prompt does not give a visual style (e.g. "realistic, soft studio lighting, medium shot")',
}


@dataclass(frozen=True)
class Prompt:
    """A normalised prompt and what was noticed on the way."""

    text: str
    tokens: int  # tokens of `text` in the encoder (an estimate when `tokens_estimated`)
    truncated: bool
    warnings: list[str] = field(default_factory=list)
    tokens_estimated: bool = False
    missing: tuple[str, ...] = ()  # elements the heuristics did not find: who, action, setting, style


def normalize_prompt(
    text: str,
    *,
    count_tokens: Callable[[str], int | None] | None = None,
    max_tokens: int = MAX_TOKENS,
    subject: str = "--prompt",
) -> Prompt:
    """Normalise `text`, cap it at `max_tokens` (cutting at a word boundary) and check its elements.

    `count_tokens` is the engine's tokenizer (counting special tokens as the encoder does); without
    one, or when it returns None, `estimate_tokens` is used. Raises InputError when nothing is left.
    """
    cleaned, removed = clean_text(text)
    if not cleaned:
        raise InputError(
            subject,
            "is empty; describe who is speaking, what they are doing, where, and in what style "
            "(see examples/prompt.txt)",
        )
    warnings: list[str] = []
    if removed:
        shown = ", ".join(f"U+{ord(c):04X}" for c in sorted(set(removed))[:3])
        warnings.append(f"removed {len(removed)} invisible or control characters ({shown})")

    counter: Callable[[str], int | None] = count_tokens or estimate_tokens
    tokens = counter(cleaned)
    estimated = tokens is None or count_tokens is None
    if tokens is None:
        counter = estimate_tokens
        tokens = estimate_tokens(cleaned)

    truncated = tokens > max_tokens
    if truncated:
        kept = _fit(cleaned, lambda s: int(counter(s) or 0) <= max_tokens)
        about = "about " if estimated else ""
        warnings.append(
            f"the prompt is {about}{tokens} tokens, over the text encoder's {max_tokens}; kept the first "
            f"{len(kept.split())} of {len(cleaned.split())} words (up to '...{kept[-30:]}'), the rest "
            f"would have been ignored"
        )
        cleaned, tokens = kept, int(counter(kept) or 0)

    missing = missing_elements(cleaned)
    if missing is None:
        warnings.append("the element checks understand English only; they were skipped for this prompt")
        missing = ()
    warnings += [_ELEMENT_WARNINGS[m] for m in missing]
    return Prompt(cleaned, tokens, truncated, warnings, estimated, missing)


def clean_text(text: str) -> tuple[str, str]:
    """(normalised text, the characters removed). Whitespace of any kind is not counted as removed."""
    kept: list[str] = []
    removed: list[str] = []
    for ch in unicodedata.normalize("NFC", text):
        if ch.isspace():
            kept.append(" ")
        elif unicodedata.category(ch) in _REMOVED_CATEGORIES:
            removed.append(ch)
        else:
            kept.append(ch)
    # Removing a character can bring a base letter and a combining mark together: compose again.
    joined = unicodedata.normalize("NFC", "".join(kept))
    return " ".join(joined.split()), "".join(removed)


def estimate_tokens(text: str) -> int:
    """A deliberately high estimate of umT5 SentencePiece tokens, for engines without a tokenizer.

    Per run of letters (with their combining marks): one token per 4 characters, at least one; wide
    characters (CJK, kana, Hangul) one each. One per digit, one per ASCII punctuation mark, two per
    other symbol (four outside the Basic Multilingual Plane: emoji). Plus one end-of-sequence token.
    For English prose that should be well above umT5's real count (most words are one umT5 token).
    """
    total = 1  # </s>
    run = 0  # letters in the current word
    for ch in text:
        cat = unicodedata.category(ch)
        if cat[0] in "LM" and unicodedata.east_asian_width(ch) not in "WF":
            run += 1
            continue
        total += -(-run // 4)
        run = 0
        if ch.isspace():
            continue
        if cat[0] == "L" or cat == "Nd" or (ch.isascii() and not ch.isalnum()):
            total += 1
        else:
            total += 4 if ord(ch) > 0xFFFF else 2
    return total + -(-run // 4)


def _fit(text: str, fits: Callable[[str], bool]) -> str:
    """The longest prefix of whole words that `fits` (by bisection; a counter is monotone in length).
    When not even the first word fits, the longest prefix of its characters."""
    words = text.split(" ")
    lo, hi = 0, len(words)  # invariant: the first lo words fit; more than hi words do not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(" ".join(words[:mid])):
            lo = mid
        else:
            hi = mid - 1
    if lo > 0:
        return " ".join(words[:lo])
    first = words[0]
    lo, hi = 0, len(first)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(first[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return first[:lo]


_WORD = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*|\d+[a-z]?")


def missing_elements(text: str) -> tuple[str, ...] | None:
    """Elements of ELEMENT_CUES with no cue in `text`, or None when the text is mostly not in a Latin
    script (the cues are English, so they would only produce noise)."""
    letters = [c for c in text if c.isalpha()]
    if letters and sum(c.isascii() for c in letters) < 0.5 * len(letters):
        return None
    words = _WORD.findall(text.lower())
    present = set(words)
    # Hyphenated cues also match when written with spaces ("in front of", "close up").
    spaced = " " + " ".join(words) + " "
    for phrase in (c for cues in ELEMENT_CUES.values() for c in cues if "-" in c):
        if f" {phrase.replace('-', ' ')} " in spaced:
            present.add(phrase)
    present |= {part for w in words if "-" in w for part in w.split("-")}
    return tuple(name for name, cues in ELEMENT_CUES.items() if not cues & present)
