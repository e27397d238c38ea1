"""Table schemas (schemas/*.json, packaged as pipeline.schemas) as data, checked on read."""

from __future__ import annotations

import json
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
    return json.loads(text)


def check_columns(schema: pl.Schema, name: str, where: str) -> list[str]:
    """Check column presence and types; return the known columns present."""
    spec = load_schema(name)["columns"]
    for col, rule in spec.items():
        if col not in schema:
            if rule.get("required"):
                raise SchemaError(f"{where}: required column {col!r} is missing ({name} schema)")
            continue
        dtype = schema[col]
        if dtype == pl.Null:
            continue
        if not any(_FAMILIES[f](dtype) for f in rule["types"]):
            raise SchemaError(
                f"{where}: column {col!r} has type {dtype}, expected {' or '.join(rule['types'])}"
            )
    return [c for c in spec if c in schema]


def check_output(schema: pl.Schema, name: str, where: str) -> None:
    """An output we write has exactly its schema's columns, in order, of the right types."""
    expected = list(load_schema(name)["columns"])
    if list(schema) != expected:
        raise SchemaError(f"{where}: columns {list(schema)} differ from {name} schema {expected}")
    check_columns(schema, name, where)


def check_rows(frame: pl.LazyFrame, name: str, where: str) -> None:
    """Check non-null and unique rules (one aggregate pass over the needed columns)."""
    spec = load_schema(name)["columns"]
    exprs = []
    for col, rule in spec.items():
        if rule.get("nullable", True) is False:
            exprs.append(pl.col(col).null_count().alias(f"{col}:nulls"))
        if rule.get("unique"):
            exprs.append((pl.len() - pl.col(col).n_unique()).alias(f"{col}:duplicates"))
    if not exprs:
        return
    result = frame.select(exprs).collect().row(0, named=True)
    for label, value in result.items():
        if value:
            col, what = label.split(":")
            raise SchemaError(f"{where}: column {col!r} has {value} {what} ({name} schema)")
