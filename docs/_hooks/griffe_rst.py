"""Griffe extension: the reStructuredText bits of dkl's docstrings, rewritten as Markdown.

dkl's docstrings are Google-style with a few Sphinx roles (``:func:`kl_loss```), ``.. math::``
blocks and ``::`` literal blocks, so that ``help()`` reads well. Here they become an optional
cross-reference (a link when the target is in the API reference, plain code otherwise),
``$...$`` / ``$$...$$`` for MathJax and ordinary indented code blocks.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`(?P<tilde>~?)(?P<target>[^`]+)`")
MATH_ROLE = re.compile(r":math:`(?P<tex>[^`]+)`")
MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n")
LITERAL = re.compile(r"(?<=\S)::$", flags=re.MULTILINE)
BORDER = re.compile(r"^[ \t]*=+(?:[ \t]+=+)+[ \t]*$")
SECTION = re.compile(r"^(?P<indent>[ \t]*)(?P<title>[A-Z][A-Za-z ]*):[ \t]*$")
SHARED_ARG = re.compile(r"^(?P<indent>[ \t]+)(?P<names>\w+(?:, \w+)+):(?P<text>.*)$")


def _resolve(obj: griffe.Object, target: str) -> str:
    """The full path ``target`` names as seen from ``obj`` (best effort)."""
    if target.startswith("dkl."):
        return target
    head, _, rest = target.partition(".")
    scopes = [obj] + [p for p in _parents(obj)]
    for scope in scopes:
        if head in scope.members:
            path = f"{scope.members[head].path}"
            return f"{path}.{rest}" if rest else path
    for scope in scopes:
        try:
            path = scope.resolve(head)
        except griffe.NameResolutionError:
            continue
        return f"{path}.{rest}" if rest else path
    return target


def _parents(obj: griffe.Object):
    while obj.parent is not None:
        obj = obj.parent
        yield obj


def _math_blocks(text: str) -> str:
    """``.. math::`` + an indented body -> ``$$ body $$`` at the directive's indentation."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = MATH_BLOCK.match(lines[i] + "\n")
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent = m["indent"]
        body: list[str] = []
        i += 1
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(indent + " ")):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            i -= 1
            body.pop()
        tex = "\n".join(line.strip() for line in body if line.strip())
        out += [f"{indent}$$", *(f"{indent}{t}" for t in tex.split("\n")), f"{indent}$$"]
    return "\n".join(out)


def _cells(line: str, starts: list[int]) -> list[str]:
    """The columns of a simple-table row, cut at the border's column starts."""
    cols = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
    return [c.replace("|", "\\|") or " " for c in cols]


def _simple_tables(text: str) -> str:
    """reST simple tables (``=====  =====`` borders around a header and rows) -> Markdown tables."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not (BORDER.match(lines[i]) and i + 2 < len(lines) and BORDER.match(lines[i + 2])):
            out.append(lines[i])
            i += 1
            continue
        border = lines[i]
        starts = [m.start() for m in re.finditer(r"=+", border)]
        indent = border[: starts[0]]

        header = _cells(lines[i + 1], starts)
        rows = []
        i += 3
        while i < len(lines) and not BORDER.match(lines[i]):
            if lines[i].strip():
                row = _cells(lines[i], starts)
                if rows and row[0] == " ":  # a continuation line: empty first column
                    rows[-1] = [f"{a} {b}".strip() or " " for a, b in zip(rows[-1], row)]
                else:
                    rows.append(row)
            i += 1
        i += 1  # the closing border
        out += [f"{indent}| " + " | ".join(header) + " |", f"{indent}|" + "---|" * len(header)]
        out += [f"{indent}| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _shared_args(text: str) -> str:
    """``alpha, beta: ...`` in an ``Args:`` section -> one entry per name (Google style has one)."""
    out: list[str] = []
    in_args = False
    for line in text.split("\n"):
        section = SECTION.match(line)
        if section:
            in_args = section["title"] in ("Args", "Arguments", "Parameters")
        shared = SHARED_ARG.match(line) if in_args else None
        if shared:
            first, *others = shared["names"].split(", ")
            out += [f"{shared['indent']}{name}: As `{first}`." for name in others]
            line = f"{shared['indent']}{first}:{shared['text']}"
        out.append(line)
    return "\n".join(out)


def _doctests(text: str) -> str:
    """``Example:`` is read as ``Examples:``; ``>>>`` runs outside that section become fenced
    ``pycon`` blocks (else ``x[i][:5]`` would read as a Markdown link)."""
    out: list[str] = []
    lines = text.split("\n")
    section_indent: int | None = None  # indentation of the current Examples: title
    i = 0
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        if line.strip() and section_indent is not None and indent <= section_indent:
            section_indent = None
        title = SECTION.match(line)
        if title and title["title"] in ("Example", "Examples"):
            out.append(f"{title['indent']}Examples:")
            section_indent = len(title["indent"])
            i += 1
            continue
        if section_indent is None and line.lstrip().startswith(">>>"):
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            pad = " " * indent
            out += [f"{pad}```pycon", *block, f"{pad}```"]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def rst_to_markdown(text: str, obj: griffe.Object | None = None) -> str:
    """One docstring's text, with the roles, maths and literal blocks rewritten."""
    text = _doctests(text)
    text = _simple_tables(text)
    text = _shared_args(text)
    text = _math_blocks(text)
    text = MATH_ROLE.sub(lambda m: f"${m['tex']}$", text)

    def role(m: re.Match) -> str:
        target = m["target"].strip().rstrip("()")
        shown = target.rsplit(".", 1)[-1] if m["tilde"] else target
        path = _resolve(obj, target) if obj is not None else target
        return f'<autoref identifier="{path}" optional><code>{shown}</code></autoref>'

    text = ROLE.sub(role, text)
    text = re.sub(r"^[ \t]*::[ \t]*$", "", text, flags=re.MULTILINE)  # a bare "::" line
    return LITERAL.sub(":", text)


def _public_bases(cls: griffe.Class, depth: int = 0) -> list:
    """``cls``'s bases with each private one (``_Loss``) replaced by its own public bases, so the
    reference never names a class it does not document."""
    out = []
    for base in cls.bases:
        name = str(base).rsplit(".", 1)[-1]
        if not name.startswith("_"):
            out.append(base)
            continue
        try:
            target = cls.modules_collection[
                base.canonical_path if hasattr(base, "canonical_path") else str(base)
            ]
        except (KeyError, AttributeError):
            target = cls.parent.members.get(name) if cls.parent is not None else None
        if isinstance(target, griffe.Class) and depth < 5:
            out += [b for b in _public_bases(target, depth + 1) if b not in out]
    return out


class RstToMarkdown(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        todo: list[griffe.Object] = [pkg]
        while todo:
            obj = todo.pop()
            if obj.docstring is not None:
                obj.docstring.value = rst_to_markdown(obj.docstring.value, obj)
            if isinstance(obj, griffe.Class) and not obj.is_alias:
                obj.bases = _public_bases(obj)
            todo += [m for m in obj.members.values() if not m.is_alias]
