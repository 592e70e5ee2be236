"""The trainer process's exit codes (docs/API.md "process contract"): the trainer returns them and the
worker classifies a run's end by them, so both import them from here (no torch import)."""

OK = 0                  # done; also after a stop signal once its checkpoint is saved
BAD_INPUT = 2           # bad config or data: stderr has `FILE:LINE: what is wrong` lines
OUT_OF_MEMORY = 3
DIVERGED = 4            # a non-finite loss or gradient norm: the step was not applied, the last checkpoint is intact
SUPERSEDED = 5          # another run started on the output dir (trainer_core/owner.py): stopped without writing more
STOPPED_UNSAVED = 130   # as a shell reports Ctrl-C: stopped, and no new checkpoint was written
