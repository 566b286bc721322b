"""Showing results: a rich table on a terminal, tab-separated when piped; protobuf as JSON.

The consoles made here go quiet when their reader is gone (see ``shoal_cli.output``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

from shoal_cli.output import is_terminal, mute, quiet_if_gone, say

__all__ = ["console", "emit_table", "message_json"]


class _Console(Console):
    """A rich console that goes quiet when its reader is gone.

    rich's own answer to a broken pipe is to point *stdout* at /dev/null and raise
    ``SystemExit``, which would end ``shoal up`` without stopping its mesh.
    """

    def on_broken_pipe(self) -> None:
        self.quiet = True
        mute(self.file)


def console(*, stderr: bool = False, width: int | None = None) -> Console:
    """A rich console on stdout (or stderr) that survives a reader going away."""
    return _Console(stderr=stderr, width=width)


_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def _int64_as_numbers(descriptor: Any, data: dict[str, Any]) -> None:
    # ``descriptor`` is a message Descriptor (the upb one at run time, hence Any).
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        kind = field.message_type
        if kind is not None and kind.GetOptions().map_entry:
            inner = kind.fields_by_name["value"]
            if inner.message_type is not None:
                for item in value.values():
                    if isinstance(item, dict):
                        _int64_as_numbers(inner.message_type, item)
            elif inner.type in _INT64:
                data[field.name] = {k: int(v) for k, v in value.items()}
        elif kind is not None:
            # Well-known types (Timestamp, Duration...) are strings in JSON: left alone.
            for item in value if field.is_repeated else [value]:
                if isinstance(item, dict):
                    _int64_as_numbers(kind, item)
        elif field.type in _INT64:
            data[field.name] = [int(v) for v in value] if field.is_repeated else int(value)


def message_json(message: Message) -> dict[str, Any]:
    """A protobuf message as JSON-ready data: field names as in the .proto, every field
    present (zeros too), and 64-bit integers as numbers.

    The proto3 JSON mapping writes 64-bit integers as strings (for JavaScript); a
    revision or a count is a number to every consumer of ours.
    """
    data = MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _int64_as_numbers(message.DESCRIPTOR, data)
    return data


def _table(
    title: str,
    columns: Sequence[tuple[str, str]],
    rows: Sequence[Mapping[str, Any]],
    widths: Sequence[int] | None,
) -> Table:
    table = Table(title=title, title_justify="left")
    for i, (_, heading) in enumerate(columns):
        table.add_column(heading, width=None if widths is None else widths[i], overflow="fold")
    for row in rows:
        table.add_row(*(str(row.get(key, "")) for key, _ in columns))
    return table


def _fit(
    columns: Sequence[tuple[str, str]],
    rows: Sequence[Mapping[str, Any]],
    keep: Collection[str],
    width: int,
) -> list[int] | None:
    """Column widths within ``width``: kept columns whole, no word split; None if impossible.

    Each column gets at least its longest word (its longest value if kept), then the
    room left grows them, one cell at a time, toward their longest value.
    """
    low, high = [], []
    for key, heading in columns:
        cells = [heading, *(str(row.get(key, "")) for row in rows)]
        longest = max(cell_len(cell) for cell in cells)
        words = max(cell_len(word) for cell in cells for word in cell.split() or [""])
        low.append(longest if key in keep else words)
        high.append(longest)
    room = width - (len(columns) + 1) - 2 * len(columns) - sum(low)  # rules and padding
    if room < 0:
        return None
    widths = list(low)
    while room > 0 and widths != high:
        for i in range(len(widths)):
            if room > 0 and widths[i] < high[i]:
                widths[i] += 1
                room -= 1
    return widths


def emit_table(
    title: str,
    columns: Sequence[tuple[str, str]],
    rows: Sequence[Mapping[str, Any]],
    *,
    keep: Collection[str] = (),
    drop_first: Sequence[str] = (),
) -> None:
    """``columns`` are (key, heading) pairs; a rich table on a terminal, else tab-separated.

    On a terminal too narrow for the table, the ``keep`` columns are never cut; the
    others fold, and the ``drop_first`` ones are left out, in that order, until what
    is left fits without splitting words (the title says which were left out).
    """
    if not is_terminal():
        # Piped: tab-separated with a header line, easy for cut/awk and stable for scripts.
        say("\t".join(heading for _, heading in columns))
        for row in rows:
            say("\t".join(str(row.get(key, "")) for key, _ in columns))
        return
    out = console()
    shown = list(columns)
    dropped: list[str] = []
    widths = _fit(shown, rows, keep, out.width)
    for key in drop_first:
        if widths is not None:
            break
        dropped += [heading.lower() for k, heading in shown if k == key]
        shown = [(k, heading) for k, heading in shown if k != key]
        widths = _fit(shown, rows, keep, out.width)
    if dropped:
        title += f" (not shown, to fit: {', '.join(dropped)})"
    with quiet_if_gone(out.file):
        out.print(_table(title, shown, rows, widths))
