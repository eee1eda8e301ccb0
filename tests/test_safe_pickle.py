"""The restricted unpickler of the dataset releases (``storygptv.data.safe_pickle``)."""

import collections
import pickle

import numpy as np
import pytest

from storygptv.data.safe_pickle import UnsafePickleError, safe_load_dict, safe_load_npy, safe_load_pickle
from tests.fixtures.story_releases import MarkerPayload

DATA = {
    "ids": ["a", "b"],
    b"raw": (1, 2.5, None, True, 3 + 1j),
    "set": {1, 2},
    "frozen": frozenset({"x"}),
    "array": np.arange(6, dtype=np.int16).reshape(2, 3),
    "strings": np.array([b"Pororo_ENGLISH1_1_ep6/12.png"]),
    "objects": np.array([np.array([1, 0]), np.array([2])], dtype=object),
    "scalars": [np.int64(5), np.float32(0.5), np.bytes_(b"s"), np.str_("t"), np.bool_(True)],
    "dtype": np.dtype([("a", "<i4"), ("b", "<f8")]),
    "ordered": collections.OrderedDict(a=1),
    "default": collections.defaultdict(list, a=[1]),
    "buffer": bytearray(b"q"),
}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_data_types_load_with_every_protocol(tmp_path, protocol):
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps(DATA, protocol=protocol))
    loaded = safe_load_pickle(path)
    assert loaded.keys() == DATA.keys()
    assert np.array_equal(loaded["array"], DATA["array"]) and loaded["array"].dtype == np.int16
    assert [list(a) for a in loaded["objects"]] == [[1, 0], [2]]
    assert loaded["scalars"] == DATA["scalars"] and type(loaded["scalars"][0]) is np.int64
    assert loaded["dtype"] == DATA["dtype"] and loaded["default"]["a"] == [1]
    assert loaded["set"] == {1, 2} and loaded[b"raw"] == DATA[b"raw"] and loaded["buffer"] == b"q"


def test_numpy_1_names_are_accepted(tmp_path):
    """Releases written by numpy 1.x name ``numpy.core.multiarray``; numpy 2 moved it to ``numpy._core``."""
    data = pickle.dumps({"labels": np.array([1, 0, 1])}, protocol=2)
    assert b"numpy._core.multiarray" in data
    path = tmp_path / "old.pkl"
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert safe_load_pickle(path)["labels"].tolist() == [1, 0, 1]


def test_payloads_are_refused_before_they_run(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ok": 1, "payload": MarkerPayload(marker)}))
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl.*io\.open.*nothing from this file was run"):
        safe_load_pickle(path)
    npy = tmp_path / "evil.npy"
    np.save(npy, np.array({"payload": MarkerPayload(marker)}, dtype=object), allow_pickle=True)
    with pytest.raises(UnsafePickleError, match=r"evil\.npy"):
        safe_load_npy(npy)
    assert not marker.exists()
    # Protocol-2 bytes go through `_codecs.encode`; only pickle's own latin-1 codec is admitted.
    codec = tmp_path / "codec.pkl"
    codec.write_bytes(b"c_codecs\nencode\n(Vx\nVrot13\ntR.")
    with pytest.raises(UnsafePickleError, match="codec 'rot13'"):
        safe_load_pickle(codec)


def test_npy_files(tmp_path):
    plain = tmp_path / "plain.npy"
    np.save(plain, np.arange(4))
    assert safe_load_npy(plain).tolist() == [0, 1, 2, 3]
    objects = tmp_path / "dict.npy"
    np.save(objects, np.array({"a": ["x", "y"]}, dtype=object), allow_pickle=True)
    assert safe_load_npy(objects).item() == {"a": ["x", "y"]}


def test_broken_files_are_clear_errors(tmp_path):
    truncated = tmp_path / "cut.pkl"
    truncated.write_bytes(pickle.dumps({"a": list(range(50))})[:-10])
    with pytest.raises(ValueError, match=r"cut\.pkl' is not a readable pickle"):
        safe_load_pickle(truncated)
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"not numpy")
    with pytest.raises(ValueError, match=r"garbage\.npy' is not a readable \.npy file"):
        safe_load_npy(garbage)
    not_array = tmp_path / "list.npy"
    np.save(not_array, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    data = not_array.read_bytes()
    header_end = data.index(b"\n") + 1
    not_array.write_bytes(data[:header_end] + pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="holds a dict after its .npy header"):
        safe_load_npy(not_array)


def test_safe_load_dict_reads_pickles_and_object_npy(tmp_path):
    pkl = tmp_path / "labels.pkl"
    pkl.write_bytes(pickle.dumps({"a": [1, 0]}))
    npy = tmp_path / "descriptions.npy"
    np.save(npy, np.array({"a/1": ["caption"]}, dtype=object), allow_pickle=True)
    assert safe_load_dict(pkl) == {"a": [1, 0]}
    assert safe_load_dict(npy) == {"a/1": ["caption"]}
    listed = tmp_path / "list.pkl"
    listed.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"should hold a pickled dict, got list\. Expected layout: L"):
        safe_load_dict(listed, layout="L")
