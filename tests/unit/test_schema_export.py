"""Unit tests for the JSON Schema export: the committed files must match the models exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kinshasa.schemas.export import (
    MESSAGE_MODELS,
    REGENERATE_HINT,
    SCHEMA_DIR,
    VOCABULARY_FILE,
    diff_json_schemas,
    export_json_schemas,
    main,
)

REPO_SCHEMA_DIR = Path(__file__).resolve().parents[2] / "kinshasa" / "schemas" / "json"


def test_committed_schemas_match_the_models() -> None:
    assert SCHEMA_DIR == REPO_SCHEMA_DIR
    assert diff_json_schemas(REPO_SCHEMA_DIR) == [], REGENERATE_HINT


def test_export_writes_one_file_per_model(tmp_path: Path) -> None:
    written = export_json_schemas(tmp_path)
    names = {path.name for path in written}
    assert names == {"envelope.schema.json", "compensate.schema.json", "rejected.schema.json",
                     "declaration.schema.json", VOCABULARY_FILE}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert diff_json_schemas(tmp_path) == []


def test_files_are_sorted_indented_and_end_with_newline(tmp_path: Path) -> None:
    for path in export_json_schemas(tmp_path):
        text = path.read_text(encoding="utf-8")
        assert text.endswith("}\n") and not text.endswith("\n\n")
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_schemas_describe_the_models(tmp_path: Path) -> None:
    export_json_schemas(tmp_path)
    envelope = json.loads((tmp_path / "envelope.schema.json").read_text())
    assert envelope["additionalProperties"] is False
    assert set(envelope["required"]) == {"message_id", "type", "actor", "occurred_at"}
    declaration = json.loads((tmp_path / "declaration.schema.json").read_text())
    assert {"service", "version", "operations"} <= set(declaration["required"])
    assert "schema" in declaration["$defs"]["EntityDeclaration"]["properties"]


def test_vocabulary_file_lists_the_shared_words(tmp_path: Path) -> None:
    export_json_schemas(tmp_path)
    document = json.loads((tmp_path / VOCABULARY_FILE).read_text())
    assert "run.tripped" in document["run_event_types"]
    assert document["compensate_suffix"] == "compensate"
    assert set(document["messages"].values()) == set(MESSAGE_MODELS)


def test_diff_reports_stale_missing_and_extra_files(tmp_path: Path) -> None:
    copy = tmp_path / "json"
    shutil.copytree(REPO_SCHEMA_DIR, copy)
    assert diff_json_schemas(copy) == []

    stale = copy / "rejected.schema.json"
    schema = json.loads(stale.read_text())
    schema["properties"]["reason"]["maxLength"] = 999
    stale.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    (copy / "envelope.schema.json").unlink()
    (copy / "documents.shred.schema.json").write_text("{}\n")
    (copy / "notes.txt").write_text("not a schema, not ours to judge\n")

    assert diff_json_schemas(copy) == [
        "documents.shred.schema.json",
        "envelope.schema.json",
        "rejected.schema.json",
    ]


def test_diff_notices_formatting_drift(tmp_path: Path) -> None:
    export_json_schemas(tmp_path)
    path = tmp_path / "rejected.schema.json"
    path.write_text(path.read_text().rstrip("\n"))
    assert diff_json_schemas(tmp_path) == ["rejected.schema.json"]


def test_diff_of_missing_directory_lists_everything(tmp_path: Path) -> None:
    missing = diff_json_schemas(tmp_path / "absent")
    assert VOCABULARY_FILE in missing and len(missing) == len(MESSAGE_MODELS) + 1


def test_export_repairs_drift(tmp_path: Path) -> None:
    export_json_schemas(tmp_path)
    (tmp_path / "documents.shred.schema.json").write_text("{}\n")
    (tmp_path / "envelope.schema.json").write_text("{}\n")
    export_json_schemas(tmp_path)
    assert diff_json_schemas(tmp_path) == []
    assert not (tmp_path / "documents.shred.schema.json").exists()


def test_main_check_and_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check", str(tmp_path)]) == 1
    assert "python -m kinshasa.schemas.export" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 0
    assert main(["--check", str(tmp_path)]) == 0
    assert "match the models" in capsys.readouterr().out
