"""The merge methods by name: every method file of ``ilora.merge`` imported, then looked up.

A method file defines a :class:`~ilora.merge.method.MergeMethod` dataclass and names it with
``@register``; importing it here is what makes its names available.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ilora.config import from_dict
from ilora.errors import IloraError
from ilora.merge import (  # noqa: F401  (imported for their @register)
    baselines,
    core_space,
    factored_sum,
    ilora,
    knots,
    magmax,
    opcm,
    pcb,
    peft_types,
    regmean,
    regmean_lowrank,
    tsv,
)
from ilora.merge.method import REGISTERED, MergeMethod


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(REGISTERED)


def method_class(name: str) -> type[MergeMethod]:
    """The class behind a registered method name (its ClassVars say what the method needs)."""
    if name not in REGISTERED:
        raise IloraError(f"--method {name!r}: unknown merge method; known: {', '.join(sorted(REGISTERED))}")
    return REGISTERED[name][0]


def user_options(name: str) -> list[dataclasses.Field]:
    """The fields of method ``name`` a user may set: its class's, less those its preset fixes."""
    cls = method_class(name)
    preset = REGISTERED[name][1]
    return [f for f in dataclasses.fields(cls) if f.name not in preset]


def get_method(name: str, **options: Any) -> MergeMethod:
    """Instantiate a registered method with user options, each converted to its field's type.

    Raises:
        IloraError: unknown method or option, or a value that is not of the option's type
            (``svd_tol="1e-7"`` is a float, ``seed="x"`` is refused).
    """
    allowed = {f.name for f in user_options(name)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise IloraError(f"--method {name}: unknown option(s) {unknown}; it takes {sorted(allowed) or 'none'}")
    cls, preset = REGISTERED[name]
    method = from_dict(cls, {**preset, **options}, f"--method {name}")
    method.name = name
    return method
