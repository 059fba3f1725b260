"""Content keys: stable for identical content, different when anything that shapes output changes."""

from liveavatar_core.keys import content_key, segment_key

BASE = dict(
    audio_sha="a" * 64,
    portrait_sha="b" * 64,
    prompt="a teacher explaining",
    engine="preview",
    engine_version="1",
    weights="none",
    config={"height": 704, "width": 384, "steps": 4},
    seed=0,
    handoff_sha=None,
)


def test_segment_key_is_stable_and_order_independent():
    assert segment_key(**BASE) == segment_key(**{**BASE, "config": {"steps": 4, "width": 384, "height": 704}})


def test_every_field_changes_the_segment_key():
    changes = dict(
        audio_sha="c" * 64,
        portrait_sha="d" * 64,
        prompt="a teacher explaining.",
        engine="liveavatar",
        engine_version="2",
        weights="random",
        config={"height": 704, "width": 384, "steps": 3},
        seed=1,
        handoff_sha="e" * 64,
    )
    keys = {segment_key(**{**BASE, name: value}) for name, value in changes.items()}
    assert len(keys) == len(changes) and segment_key(**BASE) not in keys


def test_content_key_separates_kinds():
    assert content_key("a", x=1) != content_key("b", x=1)
