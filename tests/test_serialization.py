"""Tests of app_taskflow.serialization: task arguments through JSON text and back."""

from __future__ import annotations

import enum
import inspect
import json
import re
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel

from app_taskflow.errors import TaskArgumentError
from app_taskflow.serialization import ArgumentCodec


class Color(enum.StrEnum):
    RED = "red"
    GREEN = "green"


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Address(BaseModel):
    street: str
    city: str


class User(BaseModel):
    name: str
    joined: datetime
    addresses: list[Address]


def round_trip(func: Any, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Encode a call of ``func``, pass it through JSON text, and return the decoded call.

    The call comes back bound to the signature (``BoundArguments.args`` and ``.kwargs``),
    so a test reads values in parameter order whatever spelling the codec stores.
    """
    codec = ArgumentCodec(func, task_name="tests.task")
    encoded_args, encoded_kwargs = codec.encode(args, kwargs)
    text = json.dumps({"args": encoded_args, "kwargs": encoded_kwargs})
    stored = json.loads(text)
    decoded_args, decoded_kwargs = codec.decode(stored["args"], stored["kwargs"])
    bound = inspect.signature(func).bind(*decoded_args, **decoded_kwargs)
    return bound.args, bound.kwargs


def take_datetime(when: datetime) -> None: ...


def take_uuid(task_id: uuid.UUID) -> None: ...


def take_decimal(amount: Decimal) -> None: ...


def take_pair(pair: tuple[int, str]) -> None: ...


def take_user(user: User) -> None: ...


def take_enums(color: Color, priority: Priority) -> None: ...


def take_anything(value: Any) -> None: ...


def take_nested(batches: list[dict[str, list[datetime]]]) -> None: ...


def take_variadic(*dates: date, **delays: timedelta) -> None: ...


def take_untyped(value, *rest, **options) -> None: ...  # type: ignore[no-untyped-def]


def take_any(value: Any) -> None: ...


def take_float(ratio: float) -> None: ...


WHEN = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2)))


def test_codec_datetime_round_trip() -> None:
    args, _ = round_trip(take_datetime, WHEN)

    assert args == (WHEN,)
    assert args[0].utcoffset() == timedelta(hours=2)


def test_codec_naive_datetime_round_trip() -> None:
    naive = datetime(2030, 1, 2, 3, 4, 5)

    args, _ = round_trip(take_datetime, when=naive)

    assert args == (naive,)
    assert args[0].tzinfo is None


def test_codec_uuid_round_trip() -> None:
    value = uuid.uuid4()

    args, _ = round_trip(take_uuid, value)

    assert args == (value,)
    assert type(args[0]) is uuid.UUID


def test_codec_decimal_round_trip() -> None:
    args, _ = round_trip(take_decimal, Decimal("10.50"))

    assert type(args[0]) is Decimal
    assert str(args[0]) == "10.50"


def test_codec_tuple_round_trip() -> None:
    args, _ = round_trip(take_pair, (3, "three"))

    assert args == ((3, "three"),)
    assert type(args[0]) is tuple


def test_codec_pydantic_model_round_trip() -> None:
    user = User(name="Ada", joined=WHEN, addresses=[Address(street="1 Main St", city="Paris")])

    args, _ = round_trip(take_user, user=user)

    assert args == (user,)
    assert type(args[0].addresses[0]) is Address


def test_codec_enum_round_trip() -> None:
    args, _ = round_trip(take_enums, Color.GREEN, priority=Priority.HIGH)

    assert args[0] is Color.GREEN
    assert args[1] is Priority.HIGH


def test_codec_nested_round_trip() -> None:
    batches = [{"morning": [WHEN, WHEN + timedelta(hours=1)]}, {"evening": []}]

    args, _ = round_trip(take_nested, batches)

    assert args == (batches,)
    assert type(args[0][0]["morning"][1]) is datetime


def test_codec_variadic_round_trip() -> None:
    dates = (date(2030, 1, 1), date(2030, 2, 1))
    delays = {"first": timedelta(seconds=5), "second": timedelta(minutes=2)}

    args, kwargs = round_trip(take_variadic, *dates, **delays)

    assert args == dates
    assert kwargs == delays


def test_codec_untyped_json_round_trip() -> None:
    value = {"to": ["a@example.com"], "count": 2, "ratio": 0.5, "urgent": True, "note": None}

    args, kwargs = round_trip(take_untyped, value, "extra", 3, option=[1, 2])

    assert args == (value, "extra", 3)
    assert kwargs == {"option": [1, 2]}


def test_codec_int_for_float_hint() -> None:
    args, _ = round_trip(take_float, 2)

    assert args == (2.0,)


def test_codec_rejects_unannotated_datetime() -> None:
    expected = "Argument 'value' of task 'tests.task' would not survive the store: datetime value "
    with pytest.raises(TaskArgumentError, match=re.escape(expected)) as caught:
        round_trip(take_untyped, WHEN)

    assert "annotate the parameter with its type" in str(caught.value)


def test_codec_rejects_unannotated_enum() -> None:
    with pytest.raises(TaskArgumentError, match="comes back as str 'red'"):
        round_trip(take_untyped, Color.RED)


def test_codec_rejects_object() -> None:
    expected = "Argument 'value' of task 'tests.task' cannot be stored as JSON: object value"
    with pytest.raises(TaskArgumentError, match=re.escape(expected)):
        round_trip(take_any, value=object())


def test_codec_rejects_set_under_any() -> None:
    expected = "Argument 'value' of task 'tests.task' would not survive the store: set value"
    with pytest.raises(TaskArgumentError, match=re.escape(expected)):
        round_trip(take_any, {1, 2})


def test_codec_error_names_var_positional() -> None:
    with pytest.raises(TaskArgumentError, match=re.escape("Argument 'rest' of task")):
        round_trip(take_untyped, 1, WHEN)


def test_codec_rejects_wrong_type() -> None:
    with pytest.raises(TaskArgumentError, match=re.escape("Argument 'pair' of task 'tests.task'")):
        round_trip(take_pair, ("three", 3))


def test_codec_rejects_wrong_keyword_type() -> None:
    with pytest.raises(
        TaskArgumentError, match=re.escape("Argument 'delays' of task 'tests.task'")
    ):
        round_trip(take_variadic, first="five seconds")


@pytest.mark.parametrize(
    ("args", "kwargs", "reason"),
    [
        ((), {}, "missing a required argument: 'when'"),
        ((WHEN, WHEN), {}, "too many positional arguments"),
        ((), {"when": WHEN, "where": "Paris"}, "got an unexpected keyword argument 'where'"),
    ],
    ids=["too-few", "too-many", "unknown-keyword"],
)
def test_codec_rejects_signature_mismatch(
    args: tuple[Any, ...], kwargs: dict[str, Any], reason: str
) -> None:
    codec = ArgumentCodec(take_datetime, task_name="tests.task")

    with pytest.raises(
        TaskArgumentError, match=r"^Invalid arguments for task 'tests.task'\(when"
    ) as caught:
        codec.encode(args, kwargs)

    assert str(caught.value).endswith(f": {reason}.")


def test_codec_truncates_long_values() -> None:
    with pytest.raises(TaskArgumentError) as caught:
        round_trip(take_any, set(range(1000)))

    assert len(str(caught.value)) < 400


def test_codec_decode_aware_utc() -> None:
    codec = ArgumentCodec(take_datetime, task_name="tests.task")

    args, _ = codec.decode(["2030-01-02T03:04:05Z"], {})

    assert args == (datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),)


def test_codec_keyword_spelling_is_canonical() -> None:
    codec = ArgumentCodec(take_enums, task_name="tests.take_enums")

    positional = codec.encode((Color.GREEN, Priority.HIGH), {})
    by_keyword = codec.encode((), {"color": Color.GREEN, "priority": Priority.HIGH})

    assert positional == by_keyword


def test_codec_rejects_lone_surrogate() -> None:
    codec = ArgumentCodec(take_anything, task_name="tests.take_anything")

    with pytest.raises(TaskArgumentError, match=r"'value' of task 'tests\.take_anything'"):
        codec.encode(("bad \udcff name",), {})


def test_codec_rejects_infinity() -> None:
    codec = ArgumentCodec(take_anything, task_name="tests.take_anything")

    with pytest.raises(TaskArgumentError, match="would not survive the store"):
        codec.encode((float("inf"),), {})


def test_codec_rejects_oversized_arguments() -> None:
    codec = ArgumentCodec(take_anything, task_name="tests.take_anything")

    with pytest.raises(TaskArgumentError, match="more than the 1,048,576"):
        codec.encode(("x" * 1_100_000,), {})
