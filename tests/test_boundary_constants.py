"""Constants and validators used on both sides of the ofa_model/pipelines boundary have one home, in ofa_model."""

from __future__ import annotations

import math

import pytest

from ofa_model import errors
from ofa_model.errors import InputError
from ofa_model.preprocess import SUPPORTED_FORMATS, check_box
from ofa_model.tasks import TaskInputError, _box
from pipelines.data import ingest, schema
from pipelines.data.readers import rows


def test_shared_reasons_and_image_formats_come_from_ofa_model():
    for name in ("MISSING_FIELD", "EMPTY_TEXT", "BAD_TYPE", "BAD_BOX", "UNKNOWN_LABEL", "BAD_IMAGE"):
        assert getattr(schema, name) is getattr(errors, name)
    assert schema.IMAGE_FORMATS is SUPPORTED_FORMATS
    shared = {errors.BAD_IMAGE, errors.IMAGE_TOO_LARGE, errors.EMPTY_IMAGE, errors.NOT_AN_IMAGE,
              errors.TRUNCATED_IMAGE, errors.MISSING_FIELD, errors.EMPTY_TEXT, errors.BAD_BOX, errors.UNKNOWN_LABEL,
              errors.BAD_TYPE, errors.UNKNOWN_TASK, errors.BAD_ROW, errors.WRONG_CODE_COUNT}
    assert set(ingest.REASONS) == shared | {errors.UNREADABLE_SHARD}


def test_every_reason_code_lives_in_ofa_model_errors():
    codes = {name: value for name, value in vars(errors).items() if name.isupper() and isinstance(value, str)}
    assert set(schema.BAD_REASONS) <= set(codes.values()) and set(ingest.REASONS) <= set(codes.values())
    for name, value in vars(schema).items():  # schema names a code only by importing it
        if name.isupper() and value in codes.values():
            assert value is codes[name], name
    assert len(set(codes.values())) == len(codes)  # no code spelt twice


GOOD = [([1, 2, 3.5, 4], (1.0, 2.0, 3.5, 4.0)), (("0", "0", "1e1", "2"), (0.0, 0.0, 10.0, 2.0))]
BAD = [[1, 2, 1, 4], [1, 2, 3, 2], [0, 0, math.nan, 1], [0, 0, math.inf, 1], [0, 0, 1], [True, 0, 1, 1],
       [0, 0, "x", 1], "0,0,1,1", None, 5, [[0, 0], [1, 1]]]


def test_one_box_check_for_tasks_and_readers():
    for value, box in GOOD:
        assert check_box(value) == box
        assert rows.check_box(value, "box") == list(box)
        assert _box(value, "grounding", "box").tolist() == list(box)
    for value in BAD:
        with pytest.raises(InputError) as err:
            check_box(value, "field 'box'")
        assert err.value.reason == errors.BAD_BOX and "field 'box'" in str(err.value)
        with pytest.raises(rows.BadInput) as bad:
            rows.check_box(value, "box")
        assert bad.value.reason == errors.BAD_BOX
        with pytest.raises(TaskInputError) as task_err:
            _box(value, "grounding", "box")
        assert task_err.value.reason == errors.BAD_BOX and "task grounding" in str(task_err.value)
