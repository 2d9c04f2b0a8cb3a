"""Arrays on the wire: packed into one array per dtype, unpacked exactly, or refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from medmeta_common.config import ImageConfig, ModelConfig
from medmeta_common.models.factory import build_encoder, trainable_arrays
from medmeta_common.wire import PACKED_INDEX, arrays_to_numpy, numpy_to_arrays


def test_the_film_update_is_a_handful_of_flower_objects_and_round_trips() -> None:
    encoder = build_encoder(ModelConfig(backbone="efficientnet_lite0", weights="imagenet",
                                        pool=(5,)), ImageConfig(size=32, channels=3), 0)
    film = trainable_arrays(encoder, "film")
    record = numpy_to_arrays(film)
    # Flower pushes and pulls each object with its own request: 197 unpacked, 5 packed.
    assert len(film) == 98 and len(get_all_nested_objects(record)) <= 6
    back = arrays_to_numpy(record)
    assert list(back) == sorted(film)
    for name, array in film.items():
        assert back[name].dtype == array.dtype and np.array_equal(back[name], array)


def test_mixed_dtypes_scalars_and_empty_records_round_trip() -> None:
    arrays = {"q": np.arange(-3, 3, dtype=np.int8).reshape(2, 3),
              "scale": np.float32(0.5).reshape(()), "b": np.ones((2, 0), np.float16)}
    back = arrays_to_numpy(numpy_to_arrays(arrays))
    assert {k: (v.dtype, v.shape) for k, v in back.items()} == {
        k: (v.dtype, v.shape) for k, v in arrays.items()}
    assert np.array_equal(back["q"], arrays["q"])
    assert arrays_to_numpy(numpy_to_arrays({})) == {}


def _index(entries: list) -> Array:
    return Array(np.frombuffer(json.dumps(entries).encode(), np.uint8).copy())


@pytest.mark.parametrize(("record", "problem"), [
    ({PACKED_INDEX: Array(np.frombuffer(b"\xff{", np.uint8).copy())}, "unreadable"),
    ({PACKED_INDEX: _index([["w", "object", [2]]])}, "bad packed-array entry"),
    ({PACKED_INDEX: _index([["w", "float32", [3]]]),
      "packed-data:float32": Array(np.ones(2, np.float32))}, "too short"),
    ({PACKED_INDEX: _index([["w", "float32", [1]]]),
      "packed-data:float32": Array(np.ones(2, np.float32))}, "no index entry names"),
    ({PACKED_INDEX: _index([["w", "float32", [1]]]),
      "packed-data:float32": Array(np.ones(1, np.float32)),
      "extra": Array(np.ones(1, np.float32))}, "no index entry names"),
    ({PACKED_INDEX: _index([["w", "float32", [1]], ["w", "float32", [1]]]),
      "packed-data:float32": Array(np.ones(2, np.float32))}, "bad packed-array entry"),
])
def test_a_packed_record_that_does_not_add_up_is_refused(record: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        arrays_to_numpy(ArrayRecord(record))
