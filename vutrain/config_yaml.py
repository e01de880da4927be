"""YAML as run files and overrides read it: numbers by YAML 1.2's rules, not PyYAML's YAML 1.1.

PyYAML resolves plain scalars by YAML 1.1: ``seed: 010`` was the octal 8 and ``1:30`` the
sexagesimal 90 (``max_steps=1:30`` trained 90 steps without a word). YAML 1.2, which every other
tool a user checks a config with follows, reads ``010`` as ten and ``1:30`` as text. Here a
leading-zero or colon-separated number stays text, and the config's own coercion reads it (``010``
as 10) or refuses it in one line (``1:30``).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.1's forms minus the octal "0..." and the sexagesimal "1:30" (PyYAML's constructor reads
# what is left as YAML 1.2 does). An underscore only between two digits, as Python's int() and
# float() have it: YAML 1.1 took any run of them anywhere (`1_` was 1, `1_.5` 1.5), while the same
# text that missed YAML's pattern (quoted, or a leading zero) was refused.
_INT = re.compile(
    r"^(?:[-+]?0b_?[01](?:_?[01])*|[-+]?0x_?[0-9a-fA-F](?:_?[0-9a-fA-F])*|[-+]?(?:0|[1-9](?:_?[0-9])*))$"
)
_DIGITS = r"[0-9](?:_?[0-9])*"
_FLOAT = re.compile(
    rf"""^(?:[-+]?{_DIGITS}\.(?:{_DIGITS})?(?:[eE][-+][0-9]+)?
    |\.{_DIGITS}(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class RunFileLoader(yaml.SafeLoader):
    """SafeLoader whose implicit int and float follow YAML 1.2 (above)."""


RunFileLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RunFileLoader.add_implicit_resolver(_INT_TAG, _INT, list("-+0123456789"))
RunFileLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))


def load(stream: Any) -> Any:
    """``yaml.safe_load`` with YAML 1.2 numbers (text or an open file)."""
    return yaml.load(stream, Loader=RunFileLoader)  # a SafeLoader subclass: as safe as safe_load
