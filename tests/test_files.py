"""Atomic writes and readers that name the damaged file (argrpo.files)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from argrpo.files import atomic_output, read_json, read_npz, savez_atomic, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def test_json_round_trip_replaces_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "deep" / "m.json"
    write_json_atomic(path, {"b": 1, "a": [1.5, 2]})
    write_json_atomic(path, {"fid": 3.25})
    assert read_json(path) == {"fid": 3.25}
    assert path.read_text() == '{\n  "fid": 3.25\n}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.json"]


def test_a_writer_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "stats.npz"
    savez_atomic(path, mu=np.arange(3.0))
    with pytest.raises(RuntimeError, match="disk full"), atomic_output(path) as tmp:
        tmp.write_bytes(b"PK\x03\x04 half a zip")
        raise RuntimeError("disk full")
    np.testing.assert_array_equal(read_npz(path)["mu"], np.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]


def test_a_process_killed_while_writing_leaves_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"fid": 1.0})
    script = ("import os, signal, sys\nfrom argrpo.files import atomic_output\n"
              "with atomic_output(sys.argv[1]) as tmp:\n"
              "    tmp.write_text('{\"fid\": 2')\n"  # half the new content, then the kill
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True, timeout=60)
    assert done.returncode == -9, done.stderr
    assert read_json(path) == {"fid": 1.0}


def test_savez_writes_exactly_the_given_name(tmp_path):
    path = tmp_path / "samples.part"  # np.savez would write samples.part.npz
    savez_atomic(path, compressed=False, images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([0, 1]))
    assert path.is_file() and not (tmp_path / "samples.part.npz").exists()
    z = read_npz(path, ["labels"])
    assert list(z) == ["labels"] and z["labels"].tolist() == [0, 1]


@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped", "not_npz"])
def test_a_damaged_npz_raises_naming_its_path(tmp_path, damage):
    path = tmp_path / "ref_stats.npz"
    rng = np.random.default_rng(0)
    savez_atomic(path, mu=rng.normal(size=4000), sigma=rng.normal(size=(60, 60)))
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    elif damage == "flipped":  # inside the first member's deflate stream: its CRC or inflation fails
        for i in range(200, 260):
            data[i] ^= 0xFF
    else:
        data = bytearray(b"this is not a numpy file at all" * 10)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as err:
        read_npz(path)
    assert str(path) in str(err.value) and "corrupt or truncated" in str(err.value)
    assert "rerun the stage" in str(err.value)


def test_missing_npz_and_missing_keys_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        read_npz(tmp_path / "absent.npz")
    path = tmp_path / "s.npz"
    savez_atomic(path, mu=np.zeros(2))
    with pytest.raises(KeyError) as err:
        read_npz(path, ["mu", "sigma"])
    assert str(path) in str(err.value) and "sigma" in str(err.value) and "mu" in str(err.value)


def test_truncated_json_raises_naming_its_path(tmp_path):
    path = tmp_path / "metrics.json"
    text = json.dumps({"base_cfg": {"fid": 3.5, "recall": 0.4}})
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError) as err:
        read_json(path)
    assert str(path) in str(err.value) and "corrupt or truncated" in str(err.value)
