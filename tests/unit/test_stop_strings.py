"""Stop strings on streamed text: cut where one appears (even split over pieces), nothing of one ever shown, the
held-back text given back when no stop string comes."""

from __future__ import annotations

import pytest

from tpugraph.serving.stop_strings import StopStrings


def shown(stops, pieces):
    s = StopStrings(stops)
    out = [s.feed(p) for p in pieces]
    return out, s


@pytest.mark.parametrize("pieces", [["hello wor", "ld\n\nmore"], ["hello world", "\n", "\n", "more"],
                                    ["hello world\n\nmore"]])
def test_a_stop_string_is_cut_however_the_text_is_split(pieces):
    out, s = shown(["\n\n", "END"], pieces)
    assert "".join(out) == "hello world" and s.stopped
    assert s.feed("after") == "" and s.flush() == ""


def test_text_that_may_begin_a_stop_string_waits_and_comes_back_when_it_does_not():
    out, s = shown(["STOP"], ["a S", "T", "x", "yz"])
    assert out == ["a ", "", "STx", "yz"]
    assert not s.stopped
    s.feed("ST")
    assert s.flush() == "ST"


def test_the_earliest_stop_string_wins_and_empty_ones_are_ignored():
    out, s = shown(["", "cd", "b"], ["abcd"])
    assert out == ["a"] and s.stopped
    out, s = shown([], ["abc", "def"])
    assert out == ["abc", "def"] and not s.stopped
