"""Table schemas (schemas/*.json, packaged as pipeline.schemas) as data, checked on read."""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

import polars as pl

from pipeline.errors import SchemaError

_FAMILIES = {
    "string": lambda t: t in (pl.String, pl.Categorical) or isinstance(t, pl.Enum),
    "integer": lambda t: t.is_integer(),
    "boolean": lambda t: t == pl.Boolean,
}


@cache
def load_schema(name: str) -> dict[str, Any]:
    text = resources.files("pipeline.schemas").joinpath(f"{name}.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def check_columns(schema: pl.Schema, name: str, where: str,
                  shown: Mapping[str, str] | None = None) -> list[str]:
    """Check column presence and types; return the known columns present.

    `shown` maps a column to the name the user knows it by (a renamed snapshot column),
    so errors name both.
    """
    spec = load_schema(name)["columns"]
    for col, rule in spec.items():
        if col not in schema:
            if rule.get("required"):
                raise SchemaError(f"{where}: required column {_label(col, shown)} is missing "
                                  f"({name} schema)")
            continue
        check_type(schema[col], rule["types"], where, _label(col, shown))
    return [c for c in spec if c in schema]


def check_output(schema: pl.Schema, name: str, where: str) -> None:
    """An output we write has exactly its schema's columns, in order, of the right types."""
    expected = list(load_schema(name)["columns"])
    if list(schema) != expected:
        raise SchemaError(f"{where}: columns {list(schema)} differ from {name} schema {expected}")
    check_columns(schema, name, where)


def check_type(dtype: pl.DataType, types: list[str], where: str, label: str) -> None:
    """One column's type against its allowed families (an all-null column passes)."""
    if dtype != pl.Null and not any(_FAMILIES[f](dtype) for f in types):
        raise SchemaError(f"{where}: column {label} has type {dtype}, expected "
                          f"{' or '.join(types)}")


def _label(col: str, shown: Mapping[str, str] | None) -> str:
    other = (shown or {}).get(col, col)
    return repr(col) if other == col else f"{other!r} ({col})"


def check_rows(frame: pl.LazyFrame, name: str, where: str,
               shown: Mapping[str, str] | None = None, unique: bool = True) -> None:
    """Check non-null and unique rules (one aggregate pass over the needed columns).
    `unique=False`: the caller checks uniqueness itself (`n_unique` holds every value of
    the column in memory at once: 3.6 GB for 50M profile IDs)."""
    spec = load_schema(name)["columns"]
    exprs = []
    for col, rule in spec.items():
        if rule.get("nullable", True) is False:
            exprs.append(pl.col(col).null_count().alias(f"{col}:nulls"))
        if rule.get("unique") and unique:
            exprs.append((pl.len() - pl.col(col).n_unique()).alias(f"{col}:duplicates"))
    if not exprs:
        return
    result = frame.select(exprs).collect().row(0, named=True)
    for label, value in result.items():
        if value:
            col, what = label.split(":")
            raise rows_error(name, col, value, what, where, shown)


def rows_error(name: str, col: str, count: int, what: str, where: str,
               shown: Mapping[str, str] | None = None) -> SchemaError:
    """`<where>: column <col> has <count> <nulls|duplicates> (<name> schema)`."""
    return SchemaError(f"{where}: column {_label(col, shown)} has {count} {what} "
                       f"({name} schema)")
