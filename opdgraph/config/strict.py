"""Strict typing of TOML tables into attrs config classes (cattrs with exact primitive types, no extra keys).

Rules: a bool field takes only true/false ("false" is a string), an int field only integers (3.7 and true are not
ints), a float field takes floats and integers, a str field only strings, a list field only arrays (a string is not
a list of characters), a Literal field only one of its choices. Unknown keys and missing required fields are errors;
a key a config class dropped (its `REMOVED_KEYS`, key -> message) is reported with that message instead.
`structure(table, cls, path)` returns the typed object (or None) and every (dotted path, message) problem found.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn
from cattrs.errors import (
    AttributeValidationNote, ClassValidationError, ForbiddenExtraKeysError, IterableValidationError,
    IterableValidationNote,
)

from opdgraph.config.errors import did_you_mean


def describe(value) -> str:
    """How a TOML value reads in an error message: its TOML kind and the value."""
    kinds = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
             dict: "a table"}
    kind = kinds.get(type(value), type(value).__name__)
    shown = repr(value) if not isinstance(value, bool) else str(value).lower()
    if isinstance(value, (list, dict)):
        return kind
    return f"{kind} ({shown})"


def _exact(expected: type, name: str):
    def hook(value, _type):
        if type(value) is not expected:
            raise TypeError(f"expected {name}, got {describe(value)}")
        return value
    return hook


def _float(value, _type):
    if type(value) not in (int, float):
        raise TypeError(f"expected a number, got {describe(value)}")
    return float(value)


def _literal(value, literal_type):
    choices = typing.get_args(literal_type)
    if value not in choices or type(value) is not type(choices[0]):
        listed = ", ".join(repr(choice) for choice in choices)
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise ValueError(f"must be one of {listed}, got {value!r}{hint}")
    return value


def _is_sequence(type_) -> bool:
    return typing.get_origin(type_) in (list, tuple)


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(bool, _exact(bool, "true or false"))
    converter.register_structure_hook(int, _exact(int, "an integer"))
    converter.register_structure_hook(str, _exact(str, "a string"))
    converter.register_structure_hook(float, _float)
    converter.register_structure_hook_func(lambda t: typing.get_origin(t) is Literal, _literal)

    def table(value, _type):
        if not isinstance(value, dict):
            raise TypeError(f"expected a table, got {describe(value)}")
        return value
    converter.register_structure_hook_func(lambda t: t == dict[str, Any], table)

    def sequence(value, sequence_type):
        if not isinstance(value, list):
            raise TypeError(f"expected an array, got {describe(value)}")
        args = typing.get_args(sequence_type)
        is_tuple = typing.get_origin(sequence_type) is tuple
        if is_tuple and len(value) != len(args):
            raise ValueError(f"expected an array of {len(args)} items, got {len(value)}")
        items, errors = [], []
        for index, item in enumerate(value):
            item_type = args[index] if is_tuple else args[0]
            try:
                items.append(converter.structure(item, item_type))
            except Exception as error:  # collected, reported with its index
                error.__notes__ = [IterableValidationNote(f"index {index}", index, item_type)]
                errors.append(error)
        if errors:
            raise IterableValidationError(f"While structuring {sequence_type}", errors, sequence_type)
        return tuple(items) if is_tuple else items
    converter.register_structure_hook_func(_is_sequence, sequence)

    def attrs_class(config_class):
        structure_fields = make_dict_structure_fn(config_class, converter, _cattrs_forbid_extra_keys=True,
                                                  _cattrs_detailed_validation=True)

        def hook(value, _type):
            if not isinstance(value, dict):
                raise TypeError(f"expected a table, got {describe(value)}")
            return structure_fields(value, config_class)
        return hook
    converter.register_structure_hook_factory(attrs.has, attrs_class)
    return converter


CONVERTER = _make_converter()


def unknown_key_message(key: str, valid) -> str:
    return "unknown key" + (did_you_mean(key, valid) or f" (valid keys: {', '.join(valid)})")


def _flatten(error: BaseException, path: str) -> list[tuple[str, str]]:
    if isinstance(error, (ClassValidationError, IterableValidationError)):
        problems = []
        for sub_error in error.exceptions:
            sub_path = path
            for note in getattr(sub_error, "__notes__", []):
                if isinstance(note, AttributeValidationNote):
                    sub_path = f"{path}.{note.name}" if path else note.name
                elif isinstance(note, IterableValidationNote):
                    sub_path = f"{path}[{note.index}]"
            problems += _flatten(sub_error, sub_path)
        return problems
    if isinstance(error, ForbiddenExtraKeysError):
        valid = [field.name for field in attrs.fields(error.cl)]
        removed = getattr(error.cl, "REMOVED_KEYS", {})  # a key a class dropped: say what replaced it
        return [(f"{path}.{key}" if path else key, removed.get(key) or unknown_key_message(key, valid))
                for key in sorted(error.extra_fields)]
    if isinstance(error, KeyError):
        return [(path, "required field is missing")]
    return [(path, str(error))]


def structure(table, cls: type, path: str):
    """Type `table` as `cls`. Returns (object or None, [(dotted path, message), ...])."""
    if not isinstance(table, dict):
        return None, [(path, f"expected a table, got {describe(table)}")]
    try:
        return CONVERTER.structure(table, cls), []
    except (ClassValidationError, IterableValidationError, ForbiddenExtraKeysError) as error:
        return None, _flatten(error, path)


def unstructure(config) -> dict:
    """A config object back to plain TOML-able values (tuples become lists)."""
    return CONVERTER.unstructure(config)
