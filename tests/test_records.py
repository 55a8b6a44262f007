"""Stream records: flat field encoding, round trip through a real Redis stream, reference."""

from __future__ import annotations

import math

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from linewatch.streams.records import (
    RECORD_TYPES,
    AlarmRecord,
    StreamKeys,
    VerdictRecord,
    describe_records,
)
from linewatch.testing import read_records, sample_batch


def _missed_frame_verdict() -> VerdictRecord:
    return VerdictRecord(
        frame_id="cam1:9", camera="cam1", seq=9, part_id=None, verdict="reject",
        reason="missed_frame", fail_safe=True, score=None, model_id=None, threshold=None,
        threshold_version=None, rule="f1_max", n_defects=0, ts_acquired_ns=None,
        ts_decided_ns=123, latency_ms=None,
    )


def test_fields_are_flat_text_with_documented_encoding() -> None:
    fields = _missed_frame_verdict().to_fields()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
    assert fields["fail_safe"] == "1"
    assert fields["part_id"] == "" and fields["score"] == ""
    assert fields["seq"] == "9"


def test_round_trip_keeps_none_bools_and_bytes_input() -> None:
    record = _missed_frame_verdict()
    as_bytes = {k.encode(): v.encode() for k, v in record.to_fields().items()}
    assert VerdictRecord.from_fields(as_bytes) == record


@given(st.floats(allow_nan=False) | st.just(math.inf) | st.just(-math.inf))
def test_float_scores_round_trip_exactly(score: float) -> None:
    record = sample_batch().verdict.model_copy(update={"score": score})
    assert VerdictRecord.from_fields(record.to_fields()).score == score


def test_nan_score_round_trips_as_nan() -> None:
    record = sample_batch().verdict.model_copy(update={"score": math.nan})
    score = VerdictRecord.from_fields(record.to_fields()).score
    assert score is not None and math.isnan(score)


def test_unknown_fields_from_a_newer_writer_are_ignored() -> None:
    verdict = sample_batch().verdict
    fields = verdict.to_fields() | {"added_later": "x"}
    assert VerdictRecord.from_fields(fields) == verdict


def test_a_missing_required_field_is_an_error() -> None:
    fields = _missed_frame_verdict().to_fields()
    del fields["verdict"]
    with pytest.raises(ValueError, match="verdict"):
        VerdictRecord.from_fields(fields)


def test_records_round_trip_through_a_real_stream(
    redis_client: redis.Redis, line_name: str
) -> None:
    keys = StreamKeys(line_name)
    batch = sample_batch("cam0", 3, n_defects=2)
    alarm = AlarmRecord(kind="camera_lost", severity="critical", message="cam0 lost",
                        camera="cam0", ts_ns=5, details_json='{"retries": 3}')
    redis_client.xadd(keys.verdicts, batch.verdict.to_fields())  # type: ignore[arg-type]
    redis_client.xadd(keys.verdicts, _missed_frame_verdict().to_fields())  # type: ignore[arg-type]
    for defect in batch.defects:
        redis_client.xadd(keys.defects, defect.to_fields())  # type: ignore[arg-type]
    redis_client.xadd(keys.alarms, alarm.to_fields())  # type: ignore[arg-type]

    assert read_records(redis_client, line_name, VerdictRecord) == [
        batch.verdict, _missed_frame_verdict()
    ]
    assert tuple(read_records(redis_client, line_name, type(batch.defects[0]))) == batch.defects
    assert read_records(redis_client, line_name, AlarmRecord) == [alarm]


def test_reference_table_lists_every_field_of_every_stream() -> None:
    text = describe_records()
    for record in RECORD_TYPES:
        assert f"`linewatch:<line>:{record.stream}`" in text
        for name, info in record.model_fields.items():
            assert info.description, f"{record.__name__}.{name} has no description"
            assert f"| `{name}` |" in text
