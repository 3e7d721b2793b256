"""parse_destination reuses one full parse per block of 10,000 numbers: it must never change a result."""

from __future__ import annotations

import random

import pytest

from pbxguard.policy import numbers
from pbxguard.policy.numbers import parse_destination

FORMS = ("0{}", "+33{}", "+262{}", "+590{}", "+594{}", "+596{}")


def full_parse(text: str) -> tuple[object, ...]:
    numbers._parse_destination.cache_clear()
    result = numbers._parse_destination(text)
    return (result.e164, result.valid, result.territories, result.zones)


@pytest.mark.parametrize("first", range(1, 10))
def test_every_block_prefix_agrees_with_the_full_parse(first: int) -> None:
    rng = random.Random(first)
    checked = 0
    for block in range(0, 10000, 7):
        for form in FORMS:
            numbers._BLOCKS.clear()
            head = f"{first}{block:04d}"
            # The first number of a block fills the memo, the second is answered from it.
            for _ in range(2):
                text = form.format(f"{head}{rng.randrange(10000):04d}")
                result = parse_destination(text)
                assert (result.e164, result.valid, result.territories, result.zones) == full_parse(text), text
                assert result.raw == text
                checked += 1
    assert checked == 2 * len(FORMS) * len(range(0, 10000, 7))


def test_the_memo_is_bounded() -> None:
    numbers._BLOCKS.clear()
    for i in range(numbers._BLOCKS_MAX + 10):
        numbers._BLOCKS[str(i)] = parse_destination("0612345678")
    parse_destination("0145678901")
    assert len(numbers._BLOCKS) <= numbers._BLOCKS_MAX
