"""The JSON Schema shipped for editors agrees with the loader on structure."""
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "agent/manifest/manifest.schema.json").read_text())
EXAMPLES = sorted((ROOT / "policies/examples").glob("*.yaml"))
# Broken manifests whose fault is structural, so the schema must catch it too.
STRUCTURAL = ["unknown-key.yaml", "unknown-top.yaml", "missing-name.yaml", "bad-name.yaml",
              "wrong-type.yaml", "bad-mode.yaml", "relative-path.yaml", "shell-operators.yaml",
              "bad-invoke.yaml", "relative-entrypoint.yaml"]


def test_schema_is_valid():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_match_schema(path):
    jsonschema.validate(yaml.safe_load(path.read_text()), SCHEMA)


@pytest.mark.parametrize("name", STRUCTURAL)
def test_structural_faults_fail_schema(name):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(yaml.safe_load((ROOT / "tests/data/bad" / name).read_text()), SCHEMA)
