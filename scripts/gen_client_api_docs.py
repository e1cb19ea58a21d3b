"""Write docs/client-api.md, the API reference of ``tidings.client``, from its docstrings.

Usage::

    python scripts/gen_client_api_docs.py          # (re)write docs/client-api.md
    python scripts/gen_client_api_docs.py --check  # exit 1 when the file is out of date
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import inspect
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import tidings.client as client  # noqa: E402

OUTPUT = ROOT / "docs" / "client-api.md"

SECTIONS: list[tuple[str, list[str]]] = [
    ("Client and channels", ["RealtimeClient", "RealtimeChannel", "EVENTS"]),
    (
        "Connection and transports",
        ["Connection", "Transport", "TransportSocket", "WebSocketTransport", "MemoryTransport", "MemoryPeer"],
    ),
    ("Settings", ["ClientSettings", "AlertThresholds"]),
    (
        "What callbacks receive",
        [
            "Broadcast",
            "PostgresChange",
            "PresenceEvent",
            "SystemMessage",
            "RecoveryGap",
            "SendReceipt",
            "SendStatus",
            "ConnectionState",
            "ChannelState",
            "Quality",
            "Alert",
            "MetricsSnapshot",
        ],
    ),
    (
        "Errors",
        [
            "RealtimeError",
            "ClientClosed",
            "NotConnected",
            "PushTimeout",
            "ChannelError",
            "JoinRejected",
            "PushRejected",
            "HistoryError",
        ],
    ),
    (
        "Building blocks",
        [
            "Backoff",
            "Callbacks",
            "SendQueue",
            "OutboundMessage",
            "QualityMonitor",
            "LRUSet",
            "OrderBuffer",
            "PresenceView",
            "Metrics",
            "AlertMonitor",
            "MetricsReporter",
            "HistoryClient",
            "HistoryPage",
            "check_alerts",
            "build_socket_url",
            "derive_http_base",
        ],
    ),
]


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (``x: int = 1`` then ``\"\"\"doc\"\"\"``)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    node = ast.parse(source).body[0]
    docs: dict[str, str] = {}
    if not isinstance(node, ast.ClassDef):
        return docs
    body = node.body
    for stmt, nxt in zip(body, body[1:], strict=False):
        target = stmt.target if isinstance(stmt, ast.AnnAssign) else None
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
        if (
            isinstance(target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[target.id] = " ".join(nxt.value.value.split())
    return docs


def default_text(field: dataclasses.Field[Any]) -> str:
    if field.default is not dataclasses.MISSING:
        value: Any = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
        if dataclasses.is_dataclass(value):
            return f"`{type(value).__name__}()`"
    else:
        return "required"
    if callable(value):
        return f"`{getattr(value, '__module__', '')}.{getattr(value, '__name__', repr(value))}`"
    return f"`{value!r}`"


SECTION_HEADS = ("Args:", "Returns:", "Raises:", "Attributes:", "Yields:")
ROLE = re.compile(r":(?:class|meth|func|mod|data|attr):`~?([^`]+)`")


def markdown(text: str) -> str:
    """Google-style docstring -> Markdown: sections become bold heads with bullet items."""
    text = ROLE.sub(
        lambda m: f"``{m.group(1) if m.group(0).startswith(':mod:') else m.group(1).split('.')[-1]}``", text
    )
    text = text.replace("``", "`")
    out: list[str] = []
    section = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped in SECTION_HEADS:
            section = True
            out += ["", f"**{stripped[:-1]}**", ""]
            continue
        if section:
            if not stripped:
                section = False
                out.append("")
            elif line.startswith("    ") and not line.startswith("        "):
                name, _, rest = stripped.partition(":")
                out.append(f"- `{name}`: {rest.strip()}" if rest else f"- {stripped}")
            elif out:
                out[-1] += " " + stripped
            continue
        if stripped.endswith("::"):
            out += [line[:-1], "", "```python", "\x00code"]
            continue
        out.append(line)
    # Indented blocks introduced by "::" become fenced code.
    result: list[str] = []
    in_code = False
    for line in out:
        if line == "\x00code":
            in_code = True
            continue
        if in_code:
            if line.strip() and not line.startswith("    "):
                result += ["```", ""]
                in_code = False
            else:
                if line.strip() or result[-1] != "```python":
                    result.append(line[4:] if line.startswith("    ") else line)
                continue
        result.append(line)
    if in_code:
        result.append("```")
    # No blank line just before a closing fence.
    for i in range(len(result) - 1, 0, -1):
        if result[i] == "```" and not result[i - 1].strip():
            del result[i - 1]
    return "\n".join(result).strip()


def doc(obj: Any) -> str:
    return markdown(inspect.cleandoc(inspect.getdoc(obj) or ""))


def signature(name: str, obj: Any) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return name
    # Postponed annotations print as strings: drop their quotes (defaults keep theirs).
    sig = re.sub(r"(: |-> )'([^']*)'", r"\1\2", sig)
    return f"{name}{sig}"


def render_members(cls: type) -> list[str]:
    lines: list[str] = []
    for name, member in cls.__dict__.items():
        if name.startswith("_") or name in ("validate",) and cls is not client.ClientSettings:
            continue
        if isinstance(member, property):
            text = doc(member)
            if text:
                lines += [f"- **`{name}`** (property): {text.splitlines()[0]}", ""]
        elif inspect.isfunction(member) or isinstance(member, staticmethod | classmethod):
            func = member.__func__ if isinstance(member, staticmethod | classmethod) else member
            text = doc(func)
            if not text:
                continue
            prefix = "async " if inspect.iscoroutinefunction(func) else ""
            sig = signature(name, func).replace("(self, ", "(").replace("(self)", "()")
            lines += [f"#### `{prefix}{sig}`", "", text, ""]
    return lines


def render_dataclass_table(cls: type) -> list[str]:
    docs = field_docs(cls)
    lines = ["| field | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(cls):
        text = docs.get(field.name, "").replace("``", "`").replace("|", "\\|")
        lines.append(f"| `{field.name}` | {default_text(field)} | {text} |")
    return lines + [""]


def render(name: str) -> list[str]:
    obj = getattr(client, name)
    lines: list[str] = []
    if inspect.isclass(obj):
        kind = (
            "enum"
            if issubclass(obj, enum.Enum)
            else "exception"
            if issubclass(obj, BaseException)
            else "class"
        )
        lines += [f"### {kind} `{name}`", ""]
        # A Protocol has no constructor worth showing: it is implemented, not instantiated.
        if kind == "class" and not dataclasses.is_dataclass(obj) and not getattr(obj, "_is_protocol", False):
            lines += ["```python", signature(name, obj), "```", ""]
        lines += [doc(obj), ""]
        if issubclass(obj, enum.Enum):
            lines += [", ".join(f"`{m.value}`" for m in obj), ""]
        elif dataclasses.is_dataclass(obj):
            lines += render_dataclass_table(obj)
        if kind == "class":
            lines += render_members(obj)
    elif callable(obj):
        prefix = "async " if inspect.iscoroutinefunction(obj) else ""
        lines += [
            f"### function `{name}`",
            "",
            "```python",
            f"{prefix}{signature(name, obj)}",
            "```",
            "",
            doc(obj),
            "",
        ]
    else:
        lines += [f"### `{name}`", "", f"`{obj!r}`", ""]
    return lines


def build() -> str:
    listed = {name for _, names in SECTIONS for name in names}
    missing = sorted(set(client.__all__) - listed)
    if missing:
        raise SystemExit(f"add to SECTIONS: {', '.join(missing)}")
    out = [
        "# `tidings.client` API reference",
        "",
        "<!-- Generated by scripts/gen_client_api_docs.py from the docstrings; do not edit by hand. -->",
        "",
        doc(client),
        "",
    ]
    for title, names in SECTIONS:
        out += [f"## {title}", ""]
        for name in names:
            out += render(name)
    text = "\n".join(out)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when docs/client-api.md is out of date")
    args = parser.parse_args()
    text = build()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(
                f"{OUTPUT.relative_to(ROOT)} is out of date: run scripts/gen_client_api_docs.py",
                file=sys.stderr,
            )
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
