"""The output dir's claim (trainer_core/owner.py): the last run to start on a directory is its writer."""

from __future__ import annotations

from trainer_core import owner


def test_the_last_claim_holds_and_an_unreadable_one_stops_nobody(tmp_path, monkeypatch):
    monkeypatch.setenv(owner.RUN_LABEL_ENV, "box-a/3/1")
    first = owner.claim(tmp_path / "out")                   # creates the directory
    assert owner.holds(tmp_path / "out", first)
    monkeypatch.setenv(owner.RUN_LABEL_ENV, "box-b/3/2")
    second = owner.claim(tmp_path / "out")
    assert second != first and owner.holds(tmp_path / "out", second) and not owner.holds(tmp_path / "out", first)
    assert owner.describe(owner.read_owner(tmp_path / "out")).startswith("run box-b/3/2 on host ")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [owner.OWNER_FILE]   # no temporary file left
    # someone cleaned up by hand, or wrote something else there: not a newer run's claim
    owner.owner_path(tmp_path / "out").write_text("{not json")
    assert owner.holds(tmp_path / "out", first)
    owner.owner_path(tmp_path / "out").unlink()
    assert owner.holds(tmp_path / "out", first)
