"""Reading a spec file: bytes checked (size, encoding, control characters) before YAML sees them,
duplicated keys refused, every error naming the file and the line."""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any

import yaml

from autotune.errors import SpecError
from autotune.spec._models import MAX_FILE_BYTES, StudySpec, parse_spec

#: Byte signatures of files that are not UTF-8 text, with what to do about them.
_SIGNATURES: list[tuple[bytes, str]] = [
    (b"\x1f\x8b", "is gzip-compressed; decompress it first (gunzip)"),
    (b"PK\x03\x04", "is a zip archive; extract the spec from it first"),
    (b"\x00\x00\xfe\xff", "is UTF-32 (big-endian byte-order mark); save it as UTF-8"),
    (b"\xff\xfe\x00\x00", "is UTF-32 (little-endian byte-order mark); save it as UTF-8"),
    (b"\xff\xfe", "is UTF-16 (little-endian byte-order mark, as PowerShell's Out-File and '>' write "
                  "it); save it as UTF-8, e.g. Out-File -Encoding utf8"),
    (b"\xfe\xff", "is UTF-16 (big-endian byte-order mark); save it as UTF-8"),
]
_UTF8_BOM = b"\xef\xbb\xbf"
#: Unicode's control characters (category Cc) other than tab, line feed and carriage return.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_CONTROL_NAMES = {"\x1b": "ESC: a terminal colour escape, e.g. text pasted from a coloured terminal",
                  "\x00": "NUL", "\x08": "backspace", "\x0c": "form feed", "\x7f": "delete"}


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicated mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicated key {key!r} (first at line {seen[key]})", key_node.start_mark
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_text_file(path: Path, what: str = "spec") -> str:
    """The UTF-8 text of a small file, or ``SpecError`` naming the problem: missing, not a regular
    file, larger than ``MAX_FILE_BYTES`` (checked before reading), not UTF-8 (gzip, UTF-16, Latin-1,
    each named), or holding a control character such as a terminal colour escape (with its line)."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise SpecError(str(path), [f"not a regular file; a {what} is a YAML file"])
        if st.st_size > MAX_FILE_BYTES:
            raise SpecError(str(path), [f"the file is {st.st_size / 2**20:.1f} MiB; a {what} may be at most "
                                        f"{MAX_FILE_BYTES // 2**20} MiB"])
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SpecError(str(path), [f"cannot read the file: {exc.strerror}"]) from None
    if len(data) > MAX_FILE_BYTES:
        raise SpecError(str(path), [f"a {what} may be at most {MAX_FILE_BYTES // 2**20} MiB"])
    for magic, problem in _SIGNATURES:
        if data.startswith(magic):
            raise SpecError(str(path), [f"not UTF-8 text: the file {problem}"])
    if b"\x00" in data:
        raise SpecError(str(path), ["not UTF-8 text: the file holds NUL bytes (UTF-16 without a byte-order "
                                    "mark, or a binary file); save it as UTF-8"])
    text = _decode(path, data.removeprefix(_UTF8_BOM))
    _refuse_controls(path, text)
    return text


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        byte = data[exc.start]
        guess = ""
        if byte >= 0xA0:
            guess = f" (in Latin-1 that byte is {bytes([byte]).decode('latin-1')!r})"
        raise SpecError(str(path), [f"not UTF-8 text: byte 0x{byte:02x} at line {line}, column {column}"
                                    f"{guess}; save the file as UTF-8"]) from None


def _refuse_controls(path: Path, text: str) -> None:
    m = _CONTROL_RE.search(text)
    if m is None:
        return
    ch, at = m.group(), m.start()
    line, column = text.count("\n", 0, at) + 1, at - (text.rfind("\n", 0, at) + 1) + 1
    name = _CONTROL_NAMES.get(ch, "a control character")
    raise SpecError(str(path), [f"line {line}, column {column}: control character U+{ord(ch):04X} "
                                f"({name}) in the text; remove it"])


def _yaml_problem(text: str, exc: yaml.YAMLError) -> str:
    """Where and what: for an unclosed quote or bracket, the line where it *opens*."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return f"YAML: {exc}"
    runaway = _runaway_quote(text, exc.problem_mark)
    if runaway is not None:
        return runaway
    problem, context = exc.problem or "invalid YAML", exc.context
    at, ctx = exc.problem_mark, exc.context_mark
    if ctx is not None and context and at is not None and (ctx.line, ctx.column) != (at.line, at.column):
        opened = f"line {ctx.line + 1}, column {ctx.column + 1}"
        if "quoted scalar" in context and "end of stream" in problem:
            return f"YAML syntax at {opened}: this quote is never closed (the file ends at line {at.line + 1})"
        return (f"YAML syntax at {opened} ({context.removeprefix('while ')}): {problem} at line "
                f"{at.line + 1}, column {at.column + 1}")
    where = f"line {at.line + 1}, column {at.column + 1}" if at else "unknown position"
    return f"YAML syntax at {where}: {problem}"


def _runaway_quote(text: str, error_at: yaml.Mark | None) -> str | None:
    """A quoted string that spans lines before a syntax error is almost always an unclosed quote
    that ran on to the next quote character: name the line where it opens."""
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if error_at is not None and token.start_mark.line > error_at.line:
                break
            if isinstance(token, yaml.ScalarToken) and token.style in ("'", '"') \
                    and token.end_mark.line > token.start_mark.line:
                start, end = token.start_mark, token.end_mark
                return (f"YAML syntax at line {start.line + 1}, column {start.column + 1}: this quote is never "
                        f"closed on its line (the string runs on to line {end.line + 1})")
    except yaml.YAMLError:
        pass
    return None


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a spec file. Raises ``SpecError`` naming the file, field path and rule.

    Creates nothing and imports nothing heavy: safe to call before anything runs.
    """
    p = Path(path)
    text = read_text_file(p)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise SpecError(str(p), [_yaml_problem(text, exc)]) from None
    return parse_spec(data, str(p))
