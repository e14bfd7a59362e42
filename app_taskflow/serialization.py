"""Encoding of task arguments as JSON and decoding them with the function's type hints."""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter
from pydantic_core import PydanticSerializationError

from app_taskflow.errors import TaskArgumentError, TaskDefinitionError

_ANY_ADAPTER: TypeAdapter[Any] = TypeAdapter(Any)

MAX_ARGUMENT_BYTES = 1_048_576
"""Size limit of one task's arguments as JSON text: a store row is no place for bulk data."""


class ArgumentCodec:
    """Turns a task's arguments into JSON values and back, keeping their types.

    Each parameter is encoded and decoded by a pydantic ``TypeAdapter`` built from its type
    hint, so a ``datetime``, ``UUID``, ``Decimal``, tuple or pydantic model comes back as it
    was given. ``encode`` decodes the result once more and rejects a value that does not
    come back equal, so a task never starts with arguments other than those it was given.
    """

    def __init__(self, func: Callable[..., Any], *, task_name: str) -> None:
        self._task_name = task_name
        try:
            self._signature = inspect.signature(func, eval_str=True)
        except (NameError, TypeError):
            self._signature = inspect.signature(func)
        try:
            hints = typing.get_type_hints(func, include_extras=True)
        except (NameError, TypeError) as error:
            raise TaskDefinitionError(
                f"Cannot read the type hints of task {task_name!r}: {error}. Make every "
                "annotation importable at module level."
            ) from error
        hints.pop("return", None)
        self._adapters: dict[str, TypeAdapter[Any]] = {
            name: TypeAdapter(hint) for name, hint in hints.items()
        }
        self._positional: list[str] = []
        self._var_positional: str | None = None
        self._var_keyword: str | None = None
        for parameter in self._signature.parameters.values():
            if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
                self._positional.append(parameter.name)
            elif parameter.kind is parameter.VAR_POSITIONAL:
                self._var_positional = parameter.name
            elif parameter.kind is parameter.VAR_KEYWORD:
                self._var_keyword = parameter.name

    def encode(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """Return JSON values for ``args`` and ``kwargs``.

        Raises:
            TaskArgumentError: the arguments do not match the signature, or one of them
                cannot be encoded or does not come back equal after decoding.
        """
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TaskArgumentError(
                f"Invalid arguments for task {self._task_name!r}{self._signature}: {error}."
            ) from error
        positional, named = self._canonical(bound)

        size = 0
        encoded_args: list[Any] = []
        for index, value in enumerate(positional):
            encoded, length = self._encode_one(self._positional_name(index), value)
            encoded_args.append(encoded)
            size += length
        encoded_kwargs: dict[str, Any] = {}
        for name, value in named.items():
            encoded_kwargs[name], length = self._encode_one(self._keyword_name(name), value)
            size += length

        if size > MAX_ARGUMENT_BYTES:
            raise TaskArgumentError(
                f"The arguments of task {self._task_name!r} take {size:,} bytes as JSON, more "
                f"than the {MAX_ARGUMENT_BYTES:,} a task may carry. Store large data elsewhere "
                "(a file, a database row) and pass its id or path."
            )
        return encoded_args, encoded_kwargs

    def _canonical(self, bound: inspect.BoundArguments) -> tuple[list[Any], dict[str, Any]]:
        """Return one spelling per call: every argument by name where the signature allows.

        ``send("a")`` and ``send(address="a")`` both become ``kwargs={"address": "a"}``, so
        records name their arguments and idempotency keys compare calls, not spellings.
        """
        parameters = self._signature.parameters
        extra_positional = (
            bound.arguments.get(self._var_positional, ()) if self._var_positional else ()
        )
        positional: list[Any] = []
        named: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                positional.extend(value)
            elif kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            elif kind is inspect.Parameter.POSITIONAL_ONLY or (
                # Parameters before *args must stay positional when *args contains values.
                kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and extra_positional
            ):
                positional.append(value)
            else:
                named[name] = value
        return positional, named

    def decode(
        self, args: list[Any], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Return the Python values of stored arguments, typed by the function's hints."""
        decoded_args = tuple(
            self._adapter(self._positional_name(index)).validate_python(value)
            for index, value in enumerate(args)
        )
        decoded_kwargs = {
            name: self._adapter(self._keyword_name(name)).validate_python(value)
            for name, value in kwargs.items()
        }
        return decoded_args, decoded_kwargs

    def _positional_name(self, index: int) -> str:
        if index < len(self._positional):
            return self._positional[index]
        return self._var_positional or f"#{index}"

    def _keyword_name(self, name: str) -> str:
        if name in self._signature.parameters:
            return name
        return self._var_keyword or name

    def _adapter(self, parameter: str) -> TypeAdapter[Any]:
        return self._adapters.get(parameter, _ANY_ADAPTER)

    def _encode_one(self, parameter: str, value: Any) -> tuple[Any, int]:
        """Return the JSON value of one argument and the length of its JSON text."""
        adapter = self._adapter(parameter)
        try:
            # A value that does not match the hint only makes pydantic warn here. The decode
            # below rejects it with a message that names the argument, so no warning is shown.
            text = adapter.dump_json(value, warnings=False)
            # Decoding the JSON text, not a Python value, is the trip the stores make, so
            # values JSON cannot hold (infinity, lone surrogates) are caught here.
            decoded = adapter.validate_json(text)
        except (PydanticSerializationError, ValueError, TypeError) as error:
            raise TaskArgumentError(
                f"Argument {parameter!r} of task {self._task_name!r} cannot be stored as "
                f"JSON: {type(value).__name__} value {_short(value)} ({_first_line(error)}). "
                + (
                    "Pass a JSON-compatible value or a pydantic model, and annotate the parameter."
                    if adapter is _ANY_ADAPTER
                    else "Pass a value of the annotated type."
                )
            ) from error

        untyped = adapter is _ANY_ADAPTER
        # Without a hint, a str enum member equals its plain string but loses its type, so
        # the type is compared too. With a hint, lax coercion such as int to float is fine.
        if decoded != value or (untyped and type(decoded) is not type(value)):
            hint = (
                "annotate the parameter with its type"
                if untyped
                else ("pass a value of the annotated type")
            )
            raise TaskArgumentError(
                f"Argument {parameter!r} of task {self._task_name!r} would not survive the "
                f"store: {type(value).__name__} value {_short(value)} comes back as "
                f"{type(decoded).__name__} {_short(decoded)}; {hint}."
            )
        return json.loads(text), len(text)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
