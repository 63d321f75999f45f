"""`steerserve vectors info|convert` on files (no engine)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import HIDDEN, random_vector

from server.vector_commands import _ranges, main
from steering.vectors import SteeringVector, export_gguf, import_gguf, load_vector, save_vector

DIRS = {1: random_vector(1), 2: random_vector(2), 3: random_vector(3), 7: random_vector(7)}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def test_ranges():
    assert _ranges([1, 2, 3, 7]) == "1-3, 7"
    assert _ranges([0]) == "0" and _ranges([]) == ""


def test_convert_round_trip_and_info(tmp_path, capsys):
    gguf = tmp_path / "v.gguf"
    export_gguf(SteeringVector(directions=DIRS, hidden_size=HIDDEN), gguf)
    st = tmp_path / "v.safetensors"
    code, out, _ = _run(
        capsys,
        "convert",
        str(gguf),
        str(st),
        "--architecture",
        "LlamaForCausalLM",
        "--num-layers",
        "8",
        "--description",
        "d",
    )
    assert code == 0 and "layers 1-3, 7" in out
    back = load_vector(st)
    assert back.num_layers == 8 and back.architecture == "LlamaForCausalLM"
    assert all(np.array_equal(back.directions[k], DIRS[k]) for k in DIRS)
    again = tmp_path / "again.gguf"
    assert _run(capsys, "convert", str(st), str(again))[0] == 0
    assert all(np.array_equal(import_gguf(again).directions[k], DIRS[k]) for k in DIRS)

    code, out, _ = _run(capsys, "info", str(st), str(gguf))
    assert code == 0 and "1-3, 7 (4 of 8)" in out and "LlamaForCausalLM" in out
    code, out, _ = _run(capsys, "info", "--json", str(st))
    (info,) = json.loads(out)
    assert info["layers"] == [1, 2, 3, 7] and info["norms"]["1"] == pytest.approx(8.0, rel=1e-5)


def test_errors_name_the_file_and_reason(tmp_path, capsys):
    st = tmp_path / "zero.safetensors"
    save_vector(SteeringVector(directions={0: random_vector(0)}, hidden_size=HIDDEN), st)
    with pytest.raises(SystemExit, match="direction.0"):
        main(["convert", str(st), str(tmp_path / "zero.gguf")])
    with pytest.raises(SystemExit, match="num_layers=2"):  # layer 5 of a 2-layer model
        main(
            ["convert", str(_deep(tmp_path)), str(tmp_path / "y.safetensors"), "--num-layers", "2"]
        )
    with pytest.raises(SystemExit, match="write .safetensors or .gguf"):
        main(["convert", str(st), str(tmp_path / "x.npy")])
    (tmp_path / "junk.gguf").write_bytes(b"junk")
    code, out, err = _run(capsys, "info", str(tmp_path / "junk.gguf"), str(st))
    assert code == 1 and "junk.gguf" in err and "zero.safetensors" in out
    assert not (tmp_path / "zero.gguf").exists()


def _deep(tmp_path):
    path = tmp_path / "deep.safetensors"
    save_vector(SteeringVector(directions={5: random_vector(5)}, hidden_size=HIDDEN), path)
    return path
