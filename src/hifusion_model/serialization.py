"""JSON round trip for the configuration dataclasses that travel inside checkpoints."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T", bound="JsonDataclass")


class JsonDataclass:
    """Mixin for dataclasses: ``to_dict``/``from_dict``/``to_json``/``from_json``/``replace``.

    Tuples become lists in JSON and are rebuilt by the dataclass's own ``__post_init__``;
    unknown keys are refused so that a typo in a hand-written file is not silently ignored.
    ``_what`` names the thing in error messages ("model configuration", "training recipe").
    ``_retired`` maps removed fields to their "off" value: old files that hold them off still
    load (checkpoint cards record every field), ones that turned them on are refused, since the
    run they describe can no longer be repeated.
    """

    _what = "configuration"
    _required: tuple[str, ...] = ()
    _retired: dict[str, Any] = {}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        used = {k: d[k] for k in cls._retired if k in d and d[k] != cls._retired[k]}
        if used:
            raise ConfigError(
                f"{cls._what} sets {', '.join(f'{k}={v!r}' for k, v in used.items())}: "
                "removed from napari-hifusion (it measured no gain); drop the key to run "
                "without it")
        d = {k: v for k, v in d.items() if k not in cls._retired}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown {cls._what} keys: {sorted(unknown)}")
        missing = [k for k in cls._required if k not in d]
        if missing:
            raise ConfigError(f"{cls._what} has no {', '.join(repr(k) for k in missing)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cls._what} is not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{cls._what} JSON must be an object")
        return cls.from_dict(d)

    def replace(self: T, **changes: Any) -> T:
        """A validated copy with ``changes``; unknown keys raise :class:`ConfigError`."""
        return type(self).from_dict({**self.to_dict(), **changes})
