"""ilora.library: a skill library of LoRA adapters with a merged model, changed atomically.

    from ilora.library import SkillLibrary, init_library
    library = init_library("skills", base="builtin")
    library.add("pong", "runs/pong/adapter", heldout="data/pong/heldout")
    [skill.name for skill in library.skills()]   # typed Skill records
    library.merged_state()                       # folder of the merged state (an `ilora merge` output)

The folder format, the lock and the operation log are described in :mod:`ilora.library.store`;
composing the skills for a new task (PSEC-style weights fitted on its rows) in
:mod:`ilora.library.compose`. Names resolve lazily so that ``ilora --help`` stays fast.
"""

import importlib

_EXPORTS = {
    "SkillLibrary": "store",
    "Skill": "store",
    "MergeSettings": "store",
    "init_library": "store",
    "ComposeConfig": "compose",
    "compose_skills": "compose",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ilora.library' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ilora.library.{_EXPORTS[name]}"), name)
