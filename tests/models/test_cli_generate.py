"""`keel generate` end to end on a tiny checkpoint, dense and quantized at load."""

from keel.cli import main
from tests.models.conftest import make_checkpoint


def test_generate_raw_dense_and_int8(tmp_path, capsys):
    folder = str(tmp_path / "m")
    make_checkpoint(folder, "llama-gqa")
    args = ["generate", "t5 t6 t7", "--raw", "--model", folder, "--max-tokens", "5", "--dtype", "float32"]
    assert main(args) == 0
    dense = capsys.readouterr().out.split()
    assert main(args + ["--quantize", "int8"]) == 0
    quant = capsys.readouterr().out.split()
    assert len(dense) == 5 and len(quant) == 5 and all(t.startswith("t") for t in dense + quant)


def test_generate_reports_a_missing_model_as_an_error(tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
