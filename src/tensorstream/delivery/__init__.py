"""The delivery contract, in one place: flush outputs -> persist state -> commit offsets.

- :class:`DeliveryEngine`: the only code that commits offsets, used by every loop
  (tabular, distributed, video, the training-loop bridges); failures are sticky.
- :class:`RunControl`: graceful stop, bounded forced stop.
- :class:`DeadLetters`: dead letters that always fit; :class:`BadRateGuard`.
"""

from tensorstream.delivery.control import RunAborted, RunControl
from tensorstream.delivery.deadletters import BadRateGuard, DeadLetterError, DeadLetters
from tensorstream.delivery.engine import (
    CommitOutcome,
    CommitRefused,
    DeliveryEngine,
    DeliveryFailed,
    Persisted,
)

__all__ = [
    "BadRateGuard",
    "CommitOutcome",
    "CommitRefused",
    "DeadLetterError",
    "DeadLetters",
    "DeliveryEngine",
    "DeliveryFailed",
    "Persisted",
    "RunAborted",
    "RunControl",
]
