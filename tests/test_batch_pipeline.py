"""covidseg.inference.pipeline: results in order, file work beside the model, a stopped consumer leaves nothing
written after the last result it saw."""

from __future__ import annotations

import contextlib
import threading

import pytest

from covidseg.inference.pipeline import pipelined

WAIT = 10  # seconds: only reached when the steps do not overlap (then the test fails)


def test_results_are_the_three_steps_composed_in_input_order():
    out = list(pipelined(range(7), lambda x: x + 1, lambda x: x * 10, lambda x: f"<{x}>"))
    assert out == [f"<{(x + 1) * 10}>" for x in range(7)]
    assert list(pipelined([], str, str, str)) == []
    assert list(pipelined([3], lambda x: x, lambda x: -x, lambda x: x)) == [-3]


def test_loading_the_next_item_and_writing_the_last_run_while_the_model_runs():
    next_loaded, last_written = threading.Event(), threading.Event()
    seen = []

    def load(k):
        if k == 1:
            next_loaded.set()
        return k

    def run(k):  # the model: item 0 waits for item 1's load, item 1 for item 0's write
        waited = {0: next_loaded, 1: last_written}.get(k)
        seen.append(waited is None or waited.wait(WAIT))
        return k

    def write(k):
        if k == 0:
            last_written.set()
        return k

    assert list(pipelined(range(3), load, run, write)) == [0, 1, 2]
    assert seen == [True, True, True]


def test_a_consumer_that_stops_leaves_nothing_written_after_the_last_result_it_saw():
    written = []
    steps = pipelined(range(5), lambda k: k, lambda k: k, lambda k: written.append(k) or k)
    with contextlib.closing(steps):
        for result in steps:
            if result == 1:
                break
    assert written == [0, 1]


def test_an_error_in_a_step_is_raised_to_the_consumer():
    def load(k):
        if k == 2:
            raise ValueError("film 2 is broken")
        return k

    got = []
    with pytest.raises(ValueError, match="film 2 is broken"):
        for result in pipelined(range(4), load, lambda k: k, lambda k: k):
            got.append(result)
    assert got == [0]  # result 1 comes after run(2), which its load's error prevents
