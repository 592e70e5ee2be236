"""Put on PYTHONPATH by the clock-skew test: every Python process of the worker (agent, torchrun, ranks)
sees time.time() shifted by PARATRAIN_TEST_CLOCK_SKEW_S seconds (log timestamps, file times it computes,
torchrun's rendezvous deadlines). datetime is left alone: a subclass of it breaks pickling in torchrun."""

import os
import time as _time

_skew = float(os.environ.get("PARATRAIN_TEST_CLOCK_SKEW_S", "0") or 0)
if _skew:
    _real_time = _time.time
    _time.time = lambda: _real_time() + _skew
