"""The status line's time left: the pace is that of the steps done while the clock ran, so a part that came
from a cache or shipped precomputed (done at once, before the clock) does not make the rest look quick."""

from webapp.ui.lab import time_left


def test_the_pace_counts_only_the_steps_done_while_the_clock_ran():
    # 10 of 20 steps in 10 s: 10 s for the other 10
    assert time_left(10.0, 10, 20) == "; about 10 s left"
    # the same line after 17 steps came precomputed: 3 steps in 10 s, so 10 steps left take about 33 s
    assert time_left(10.0, 20, 30, done_before=17) == "; about 33 s left"
    # long runs in minutes; nothing done since the clock started: still estimating
    assert time_left(60.0, 2, 10) == "; about 4 min left"
    assert time_left(5.0, 17, 34, done_before=17) == "; estimating the time left"
    assert time_left(5.0, 34, 34) == "" and time_left(5.0, 0, 0) == ""
