"""Exports the message contracts as JSON Schema files so non-Python clients and reviewers see the wire."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from kinshasa.schemas.declaration import ServiceDeclaration
from kinshasa.schemas.envelope import (
    COMPENSATE,
    CompensatePayload,
    Envelope,
    EventSuffix,
    RejectedPayload,
    RunEventKind,
)

SCHEMA_DIR = Path(__file__).resolve().parent / "json"
VOCABULARY_FILE = "vocabulary.json"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
REGENERATE_HINT = "run `python -m kinshasa.schemas.export` and commit kinshasa/schemas/json/"

# Operation payloads are not here: each service declares its own on kinshasa.catalogue.
MESSAGE_MODELS: dict[str, type[BaseModel]] = {
    "envelope.schema.json": Envelope,
    "compensate.schema.json": CompensatePayload,
    "rejected.schema.json": RejectedPayload,
    "declaration.schema.json": ServiceDeclaration,
}


def _dump(document: Any) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return {"$schema": JSON_SCHEMA_DIALECT, **model.model_json_schema(by_alias=True)}


def _vocabulary() -> dict[str, Any]:
    """The message-type words every service and component shares."""
    return {
        "compensate_suffix": COMPENSATE,
        "event_suffixes": [suffix.value for suffix in EventSuffix],
        "messages": {model.__name__: name for name, model in MESSAGE_MODELS.items()},
        "run_event_types": [kind.type for kind in RunEventKind],
    }


def render_json_schemas() -> dict[str, str]:
    """Every exported file's name and exact text, without touching the disk."""
    files = {name: _dump(_schema(model)) for name, model in MESSAGE_MODELS.items()}
    files[VOCABULARY_FILE] = _dump(_vocabulary())
    return files


def export_json_schemas(target_dir: Path) -> list[Path]:
    """Write every schema file into target_dir, delete JSON files no model produces; return the files."""
    target_dir.mkdir(parents=True, exist_ok=True)
    expected = render_json_schemas()
    written: list[Path] = []
    for name, text in sorted(expected.items()):
        path = target_dir / name
        # Skipping unchanged files keeps mtimes stable for build tools watching the directory.
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        written.append(path)
    for path in target_dir.glob("*.json"):
        if path.name not in expected:
            path.unlink()
    return written


def diff_json_schemas(target_dir: Path) -> list[str]:
    """Names of files in target_dir that are missing, stale or extra compared with the models (sorted)."""
    expected = render_json_schemas()
    present = {path.name: path for path in target_dir.glob("*.json")} if target_dir.is_dir() else {}
    differing = set(present) - set(expected)
    for name, text in expected.items():
        path = present.get(name)
        if path is None or path.read_text(encoding="utf-8") != text:
            differing.add(name)
    return sorted(differing)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kinshasa.schemas.export [--check] [DIR]`: regenerate, or with --check only report drift."""
    parser = argparse.ArgumentParser(prog="python -m kinshasa.schemas.export", description=__doc__)
    parser.add_argument("target", nargs="?", type=Path, default=SCHEMA_DIR, help="output directory")
    parser.add_argument("--check", action="store_true", help="exit 1 if the files differ from the models")
    args = parser.parse_args(argv)
    if args.check:
        drift = diff_json_schemas(args.target)
        if drift:
            print(f"schema files out of date in {args.target}: {', '.join(drift)}; {REGENERATE_HINT}",
                  file=sys.stderr)
            return 1
        print(f"schema files in {args.target} match the models")
        return 0
    written = export_json_schemas(args.target)
    print(f"wrote {len(written)} schema files to {args.target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
