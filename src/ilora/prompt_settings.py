"""The prompt a game's rows were built with, recorded beside what was made from them.

``ilora collect`` writes a :class:`PromptSettings` beside its dataset, ``ilora train`` copies the
task datasets' record into the adapter, ``ilora merge`` its inputs' record into the exported
adapter and the saved model, and ``ilora play`` takes its defaults from it. It sits outside
the subpackages because every layer reads it (data, training, merging, play) and it needs
nothing but the config helpers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ilora.config import field, from_dict, to_dict
from ilora.errors import IloraError
from ilora.fileio import atomic_write_text

PROMPT_SETTINGS_FILE = "prompt_settings.json"
# Version of the rows' text layout; bumped whenever prompts or their order change, so cached
# datasets (e.g. the experiment's data stage) are rebuilt and adapters of an older layout are
# refused by play. 2: rules/actions in ``context``.
ROW_LAYOUT = 2
# ilora.atari.games.DEFAULT_FRAME_SKIP, the emulator's default (this module imports no game code;
# tests/test_prompt_settings.py checks that the two agree).
RECORD_FRAME_SKIP = 4


@dataclasses.dataclass(frozen=True)
class PromptSettings:
    """How a game's rows were prompted, so that what trained on them is played with the same prompt."""

    games: tuple[str, ...] = field(help="the games of the rows (one for a collected dataset)")
    object_text: bool = field(help="the RAM object-state text is in the prompt")
    reasoning: bool = field(help="answers give reasoning before 'Action: NAME' (else direct)")
    frame_skip: int = field(RECORD_FRAME_SKIP, help="emulator frames between the two images")
    row_layout: int = field(ROW_LAYOUT, help="version of the rows' text layout (ROW_LAYOUT)")

    PROMPT_KEYS = ("object_text", "reasoning", "frame_skip", "row_layout")  # what must agree to share a prompt

    def differences(self, other: PromptSettings) -> list[str]:
        """``key=mine vs theirs`` for every prompt key on which the two differ (games aside)."""
        return [
            f"{k}={getattr(self, k)} vs {getattr(other, k)}" for k in self.PROMPT_KEYS if getattr(self, k) != getattr(other, k)
        ]

    def write(self, folder: str | Path) -> Path:
        """Write ``folder/prompt_settings.json`` (atomically); returns its path."""
        path = Path(folder) / PROMPT_SETTINGS_FILE
        atomic_write_text(path, json.dumps(to_dict(self), indent=1) + "\n")
        return path


def read_prompt_settings(folder: str | Path) -> PromptSettings | None:
    """The prompt settings recorded in ``folder`` (a dataset, adapter or model folder), if any.

    Raises:
        IloraError: The file exists but is not a valid record; the message names it.
    """
    path = Path(folder) / PROMPT_SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IloraError(f"{path}: not a JSON prompt-settings record ({err})") from err
    return from_dict(PromptSettings, data, str(path))


def combine_prompt_settings(named: list[tuple[str, PromptSettings | None]]) -> PromptSettings | None:
    """One record for what was built from several sources (an adapter's task datasets, a merge's
    inputs): their games together; sources without a record are skipped.

    Args:
        named: ``(where, settings)`` per source, ``where`` naming it in errors.

    Returns:
        The combined settings, or ``None`` when no source has any.

    Raises:
        IloraError: Two sources were prompted differently (the line names both and the keys).
    """
    known = [(where, s) for where, s in named if s is not None]
    if not known:
        return None
    first_where, first = known[0]
    games = list(first.games)
    for where, settings in known[1:]:
        differ = first.differences(settings)
        if differ:
            raise IloraError(f"{first_where} and {where} were prompted differently ({', '.join(differ)})")
        games += [g for g in settings.games if g not in games]
    return dataclasses.replace(first, games=tuple(games))
