"""General vision-language data: procedural scene and Atari-frame questions with a
held-out split, a LLaVA JSON loader, and exact-match scoring.

Every row follows one contract: ``{"images": [PIL RGB, ...], "prompt": str, "answer": str,
"task": str, "source": str}`` (see ``ilora.general.data``).
"""

from ilora.general.atari_frames import DEFAULT_GAMES
from ilora.general.benchmark import normalize_answer, score_general, wilson_interval
from ilora.general.data import (
    ALL_FAMILIES,
    SCENE_ONLY,
    GeneralDataConfig,
    generate_examples,
    generate_general,
    generate_general_rows,
    general_vocabulary,
    rows_to_dataset,
    split_words,
)
from ilora.general.llava_json import load_llava_json
from ilora.general.splits import TEST_FRACTION

__all__ = [
    "ALL_FAMILIES",
    "DEFAULT_GAMES",
    "SCENE_ONLY",
    "TEST_FRACTION",
    "GeneralDataConfig",
    "generate_examples",
    "generate_general",
    "generate_general_rows",
    "general_vocabulary",
    "load_llava_json",
    "normalize_answer",
    "rows_to_dataset",
    "score_general",
    "split_words",
    "wilson_interval",
]
