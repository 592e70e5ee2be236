"""How the trainer answers stop signals (save at the next step once training runs, stop at once before),
and which checkpoints it resumes."""

from __future__ import annotations

import signal

import pytest

from trainer_core.train import StopFlag, StopNow


def test_before_training_a_signal_stops_at_once():
    flag = StopFlag()
    with pytest.raises(StopNow, match="nothing to save"):
        flag._handle(signal.SIGINT, None)
    flag._handle(signal.SIGINT, None)   # its repeat does not interrupt the way out (a traceback, exit 1)


def test_during_training_the_first_signal_asks_for_a_checkpoint_and_the_second_stops_now(monkeypatch):
    import trainer_core.train

    now = [100.0]
    monkeypatch.setattr(trainer_core.train.time, "monotonic", lambda: now[0])
    flag = StopFlag()
    flag.training = True
    flag._handle(signal.SIGTERM, None)
    assert flag.requested
    # the same stop delivered again (torchrun forwards each parent-death SIGTERM it gets): still a checkpoint
    now[0] += 0.03
    flag._handle(signal.SIGTERM, None)
    now[0] += StopFlag.SAME_STOP_S
    with pytest.raises(StopNow, match="second stop signal"):
        flag._handle(signal.SIGTERM, None)
    now[0] += 5
    flag._handle(signal.SIGTERM, None)   # exiting already: a third one changes nothing


def test_a_checkpoint_of_other_settings_is_refused_naming_them_and_new_fields_do_not_count():
    from pathlib import Path

    from trainer_core.data import DataError
    from trainer_core.train import check_resume_identity

    saved = {"lora_rank": 8, "learning_rate": 0.01, "data_sha256": "aa"}
    check_resume_identity(Path("ck"), saved, {**saved, "field_added_later": 1})
    check_resume_identity(Path("ck"), None, saved)              # written before checkpoints recorded it
    with pytest.raises(DataError) as e:
        check_resume_identity(Path("ck"), saved, {**saved, "lora_rank": 4, "data_sha256": "bb"})
    assert "ck: saved by a run with other settings (lora_rank 8 -> 4; the training data file has changed since)" in e.value.lines[0]
