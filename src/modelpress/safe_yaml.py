"""Reading recipe YAML that may be careless or hostile: text capped at 1 MiB, a regular UTF-8 file,
and a safe loader that bounds nesting and alias expansion, every failure a quick RecipeError."""
from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer

from .errors import RecipeError

MAX_BYTES = 1 << 20   # recipe text; a recipe is a few hundred bytes
MAX_VALUES = 10_000   # YAML nodes with every alias counted as what it repeats; a recipe has a few dozen
MAX_DEPTH = 64        # YAML nesting; a recipe needs 6


def read_recipe_file(name: str) -> str:
    """The text of a recipe file: a regular file of at most 1 MiB of UTF-8."""
    try:
        st = Path(name).stat()
        if stat.S_ISDIR(st.st_mode):
            raise RecipeError(f"Recipe file {name!r} is a directory, not a file. Give the path of a YAML file.")
        if not stat.S_ISREG(st.st_mode):
            raise RecipeError(f"Recipe file {name!r} is not a regular file (a device, pipe or socket). "
                              "Give the path of a YAML file.")
        raw = b""
        if st.st_size <= MAX_BYTES:
            with open(name, "rb") as f:
                raw = f.read(MAX_BYTES + 1)  # the file may have grown since stat
    except FileNotFoundError:
        raise RecipeError(f"Recipe file {name!r} does not exist.") from None
    except OSError as e:
        raise RecipeError(f"Recipe file {name!r} cannot be read: {type(e).__name__}: {e.strerror or e}. "
                          "Check that it is a readable file.") from None
    size = max(st.st_size, len(raw))
    if size > MAX_BYTES:
        raise RecipeError(f"Recipe file {name!r} is {size:,} bytes; the cap is {MAX_BYTES:,} bytes (1 MiB). "
                          "A recipe is a few lines of YAML: check that this is the right file.")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"Recipe file {name!r} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}). "
                          "A recipe is a YAML text file: check that this is the right file.") from None


class _BoundedComposer(Composer):
    """yaml's composer, refusing documents nested deeper than MAX_DEPTH or that expand to more than
    MAX_VALUES nodes or MAX_BYTES of scalar text, an alias (*name) counting as all that its anchor
    holds (yaml shares it by reference, but a message or a copy would repeat it)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = self.anchors.get(event.anchor)  # an undefined alias is left to yaml to report
            if node is not None and id(node) not in self._anchored:
                raise RecipeError(f"The recipe's alias *{cut(event.anchor)} is inside the value its anchor names, "
                                  "so it repeats forever. Write the value out instead.")
            if node is not None:
                self._count(*self._anchored[id(node)])
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise _too_deep()
        self._depth += 1
        values, chars = self._values, self._chars
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._count(1, len(node.value) if isinstance(node, yaml.ScalarNode) else 0)
        if event.anchor is not None:
            self._anchored[id(node)] = (self._values - values, self._chars - chars)
        return node

    def _count(self, values: int, chars: int) -> None:
        self._values += values
        self._chars += chars
        if self._values > MAX_VALUES or self._chars > MAX_BYTES:
            raise RecipeError(f"The recipe has more than {MAX_VALUES:,} values or {MAX_BYTES:,} characters of "
                              "text, counting each alias (*name) as all that its anchor (&name) holds; a recipe "
                              "has a few dozen values. Use fewer aliases, or write the values out.")


_SafeLoader = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader


class _BoundedLoader(_BoundedComposer, _SafeLoader):
    """yaml.safe_load's loader on libyaml's parser where there is one (1 MiB in milliseconds, where
    pure-Python yaml takes seconds), composing in Python through _BoundedComposer."""

    def __init__(self, stream: str) -> None:
        _SafeLoader.__init__(self, stream)
        self.anchors: dict = {}
        self._depth = self._values = self._chars = 0
        self._anchored: dict[int, tuple[int, int]] = {}  # id(anchored node) -> (values, chars) it holds


def load_yaml(text: str) -> Any:
    """yaml.safe_load with the bounds of _BoundedLoader; every failure is a RecipeError."""
    try:
        loader = _BoundedLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except RecipeError:
        raise
    except yaml.YAMLError as e:
        if "maximum nesting depth" in str(e):  # libyaml >= 0.2.5's own cap, met before ours in flow style
            raise _too_deep() from None
        raise RecipeError(f"The recipe is not valid YAML: {cut(str(e), 1000)}") from None
    except RecursionError:
        raise _too_deep() from None
    except ValueError as e:  # an integer of over 4300 digits, a date like 2024-02-30, a lone surrogate
        raise RecipeError(f"The recipe has a value that cannot be read: {cut(str(e).split(';')[0])}.") from None


def _too_deep() -> RecipeError:
    return RecipeError(f"The recipe is nested too deeply: the cap is {MAX_DEPTH} levels and a recipe needs "
                       "about 6. Check the brackets and the indentation.")


def cut(text: str, limit: int = 200) -> str:
    """`text`, cut to at most `limit` characters (ending in "...")."""
    return text if len(text) <= limit else text[:limit - 3] + "..."
