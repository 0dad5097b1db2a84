"""docs/config.md names every field of `base_config()` and no field it lacks.

The table is the config's reference; this keeps it from drifting when fields
are added, renamed or removed. Cell convention (stated in docs/config.md):
`a.b.c, d, e.f` names a.b.c, a.b.d and a.b.e.f; later names are relative to
the group of the first.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import ml_collections
import pytest

from bpgo_jax.configs.common import base_config

CONFIG_MD = Path(__file__).resolve().parents[1] / "docs" / "config.md"
_SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")


def leaf_fields(c: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
    """Dotted paths of the config's fields; an empty map (e.g. `rewards`) is one field."""
    for key, value in c.items():
        path = prefix + key
        if isinstance(value, ml_collections.ConfigDict) and len(value):
            yield from leaf_fields(value, path + ".")
        else:
            yield path


def expand_cell(cell: str) -> list[str]:
    """`train.lr, b1, b2` -> train.lr, train.b1, train.b2 (later names join the first's group)."""
    first, *rest = [name.strip() for name in cell.split(",")]
    group = first.rpartition(".")[0]
    return [first] + [f"{group}.{name}" if group else name for name in rest]


def table_fields(text: str) -> list[tuple[int, str]]:
    """(line number, field) for every name in the first column of the file's tables."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.startswith("|") or _SEPARATOR.match(line):
            continue
        if i + 1 < len(lines) and _SEPARATOR.match(lines[i + 1]):
            continue  # a header row
        first_cell = line.split("|")[1]
        names = re.findall(r"`([^`]+)`", first_cell)
        if len(names) != 1:
            raise ValueError(f"config.md:{i + 1}: the first cell needs one `...` span: {line!r}")
        out.extend((i + 1, name) for name in expand_cell(names[0]))
    return out


def test_expand_cell_convention():
    assert expand_cell("train.lr, b1, b2") == ["train.lr", "train.b1", "train.b2"]
    assert expand_cell("log.tensorboard, wandb.mode") == ["log.tensorboard", "log.wandb.mode"]
    assert expand_cell("advantage.tracker.buffer_size, min_count") == [
        "advantage.tracker.buffer_size",
        "advantage.tracker.min_count",
    ]
    assert expand_cell("seed") == ["seed"]


def test_table_parser_rejects_a_row_without_a_field():
    text = "| field | meaning |\n|---|---|\n| `seed` | ok |\n| seed | no backticks |\n"
    with pytest.raises(ValueError, match="config.md:4"):
        table_fields(text)


def test_leaf_fields_keep_empty_maps_whole():
    fields = set(leaf_fields(base_config()))
    assert {"rewards", "eval.rewards", "eval.extra_prompts", "model.scheduler"} <= fields
    assert "train.lr" in fields and "model.lora.rank" in fields
    assert "model.lora" not in fields and "model" not in fields


def test_config_md_names_every_field():
    documented = {name for _, name in table_fields(CONFIG_MD.read_text())}
    missing = sorted(set(leaf_fields(base_config())) - documented)
    assert not missing, f"fields of base_config() missing from docs/config.md: {missing}"


def test_config_md_names_only_real_fields():
    fields = set(leaf_fields(base_config()))
    rows = table_fields(CONFIG_MD.read_text())
    unknown = [f"line {n}: {name}" for n, name in rows if name not in fields]
    assert not unknown, f"docs/config.md names fields base_config() lacks: {unknown}"


def test_config_md_names_each_field_once():
    names = [name for _, name in table_fields(CONFIG_MD.read_text())]
    repeated = sorted({name for name in names if names.count(name) > 1})
    assert not repeated, f"docs/config.md names these fields more than once: {repeated}"
