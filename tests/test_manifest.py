"""Manifests: what a checkpoint is, written and read back exactly, and every malformed one refused by name."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import pytest

from ckptstore import CorruptCheckpointError
from ckptstore.manifest import CheckpointInfo, FileEntry

URL = "memory://root/step_00000003"


def info() -> CheckpointInfo:
    return CheckpointInfo(
        name="step_00000003", step=3, format="safetensors",
        metrics={"loss": 0.25, "nan": math.nan, "up": math.inf, "down": -math.inf, "int": 2},
        files=(FileEntry("state-0123abcd.safetensors", 1234, 0x00C0FFEE),), monitor=("loss", "min"),
        created=datetime(2026, 12, 5, 16, 30, tzinfo=timezone.utc),
    )


def test_a_manifest_reads_back_exactly_what_was_written():
    back = CheckpointInfo.from_json(info().to_json(), url=URL)
    assert back.url == URL and back.files == info().files and back.monitor == ("loss", "min")
    assert (back.name, back.step, back.format, back.created) == ("step_00000003", 3, "safetensors", info().created)
    assert back.metrics["loss"] == 0.25 and back.metrics["int"] == 2.0 and math.isnan(back.metrics["nan"])
    assert (back.metrics["up"], back.metrics["down"]) == (math.inf, -math.inf)
    assert [back.metric(k) for k in ("loss", "nan", "up", "missing")] == [0.25, None, None, None]  # never "best"
    doc = json.loads(info().to_json())
    assert doc["files"] == [{"path": "state-0123abcd.safetensors", "size": 1234, "crc32c": "00c0ffee"}]
    assert doc["metrics"]["nan"] == "nan" and doc["manifest_version"] == 1  # strict JSON: no NaN literal


def test_a_manifest_without_a_monitor_field_is_one_written_before_it_existed():
    doc = json.loads(info().to_json())
    del doc["monitor"]
    assert CheckpointInfo.from_json(json.dumps(doc).encode(), url=URL).monitor is None


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda d: d.update(manifest_version=2), "unsupported manifest_version 2"),
        (lambda d: d.pop("name"), "KeyError('name')"),
        (lambda d: d.update(step="3"), "expected an integer, got '3'"),
        (lambda d: d.update(step=3.0), "expected an integer, got 3.0"),
        (lambda d: d["metrics"].update(loss="fast"), "metric 'fast' is not a number"),
        (lambda d: d["metrics"].update(loss=True), "metric True is not a number"),
        (lambda d: d.update(files=[]), "it lists no data file"),
        (lambda d: d["files"][0].update(size="1234"), "expected an integer, got '1234'"),
        (lambda d: d["files"][0].update(crc32c="not hex"), "invalid literal for int() with base 16"),
        (lambda d: d.update(monitor={"metric": "loss", "mode": "avg"}), "monitor must be {'metric': str, 'mode': 'min' | 'max'}"),
        (lambda d: d.update(monitor={"metric": 1, "mode": "min"}), "monitor must be"),
        (lambda d: d.update(created="yesterday"), "Invalid isoformat string: 'yesterday'"),
    ],
)
def test_a_malformed_manifest_is_refused_with_its_url_and_reason(change, reason):
    doc = json.loads(info().to_json())
    change(doc)
    with pytest.raises(CorruptCheckpointError) as err:
        CheckpointInfo.from_json(json.dumps(doc).encode(), url=URL)
    assert str(err.value).startswith(f"{URL}/manifest.json is not a valid manifest: ") and reason in str(err.value)


@pytest.mark.parametrize("data", [b"", b"{not json", b"[]", b"null", b'"a string"'])
def test_bytes_that_are_not_a_manifest_object_are_refused(data):
    with pytest.raises(CorruptCheckpointError, match="is not a valid manifest"):
        CheckpointInfo.from_json(data, url=URL)


def test_the_manifest_bytes_are_stable():
    """The on-storage format (docs/format.md): one-space-indented JSON, keys in this order, NaN as a string."""
    assert info().to_json().decode() == """{
 "manifest_version": 1,
 "name": "step_00000003",
 "step": 3,
 "format": "safetensors",
 "created": "2026-12-05T16:30:00+00:00",
 "metrics": {
  "loss": 0.25,
  "nan": "nan",
  "up": "inf",
  "down": "-inf",
  "int": 2.0
 },
 "monitor": {
  "metric": "loss",
  "mode": "min"
 },
 "files": [
  {
   "path": "state-0123abcd.safetensors",
   "size": 1234,
   "crc32c": "00c0ffee"
  }
 ]
}"""


def test_a_manifest_listing_no_data_file_is_refused_in_these_words():
    doc = json.loads(info().to_json())
    doc["files"] = []
    with pytest.raises(CorruptCheckpointError) as err:
        CheckpointInfo.from_json(json.dumps(doc).encode(), url=URL)
    assert str(err.value) == f"{URL}/manifest.json is not a valid manifest: ValueError('it lists no data file')"
