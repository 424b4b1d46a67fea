"""Content-addressed train/test split shared by every general-data family.

A row's split is a pure function of a *content key* (what the row asks about, not where
in a random stream it came from), so the held-out split can never overlap training,
whatever seeds or sizes the two were generated with.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np

from ilora.errors import IloraError

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")

# Fixed, not a parameter: disjointness only holds if train and test use the same rule.
TEST_FRACTION = 0.2


def content_key(payload: object) -> str:
    """A stable hex digest of ``repr(payload)`` (built-in ``hash`` is salted per process).

    Args:
        payload: nested tuples of str / int / bool describing a row's content.

    Returns:
        A 32-character hex string.
    """
    return hashlib.blake2b(repr(payload).encode(), digest_size=16).hexdigest()


def split_of(key: str) -> Split:
    """The split a content key belongs to: ``"test"`` for a ``TEST_FRACTION`` share of keys."""
    bucket = int(key[:16], 16) / 2**64
    return "test" if bucket < TEST_FRACTION else "train"


def check_split(split: str) -> Split:
    """Validate a user-given split name."""
    if split not in SPLITS:
        raise IloraError(f"split={split!r}: expected one of {list(SPLITS)}")
    return split  # type: ignore[return-value]


def family_rng(seed: int, *names: str) -> np.random.Generator:
    """An independent random stream per (seed, names): adding a family never changes another's rows."""
    salt = [int(content_key(name)[:8], 16) for name in names]
    return np.random.default_rng([seed, *salt])
