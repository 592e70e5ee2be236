"""How the trainer answers stop signals: save at the next step once training runs, stop at once before."""

from __future__ import annotations

import signal

import pytest

from trainer_core.train import StopFlag, StopNow


def test_before_training_a_signal_stops_at_once():
    flag = StopFlag()
    with pytest.raises(StopNow, match="nothing to save"):
        flag._handle(signal.SIGINT, None)


def test_during_training_the_first_signal_asks_for_a_checkpoint_and_the_second_stops_now():
    flag = StopFlag()
    flag.training = True
    flag._handle(signal.SIGTERM, None)
    assert flag.requested
    with pytest.raises(StopNow, match="second stop signal"):
        flag._handle(signal.SIGTERM, None)
