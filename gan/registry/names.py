"""Names as MLflow searches for them: quoted for a filter string, and refused before any
work when MLflow could not find them again."""

from __future__ import annotations


def filter_value(text: str) -> str:
    """``text`` quoted for an MLflow filter string. MLflow takes either quote and has no
    escapes, so a name may hold one kind of quote, not both."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise ValueError(f"name {text!r} holds both ' and \": MLflow cannot search for it; drop one kind of quote")


def check_names(*names: str | None) -> None:
    """Before any work: every given name is one MLflow can search for."""
    for name in filter(None, names):
        filter_value(name)
