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


def test_generate_takes_the_model_first_like_chat_and_serve(tmp_path, capsys):
    folder = str(tmp_path / "m")
    make_checkpoint(folder, "llama-gqa")
    common = ["--raw", "--max-tokens", "4", "--dtype", "float32"]
    assert main(["generate", folder, "t5 t6 t7", *common]) == 0
    positional = capsys.readouterr().out
    assert main(["generate", "t5 t6 t7", "--model", folder, *common]) == 0
    assert capsys.readouterr().out == positional and len(positional.split()) == 4


def test_generate_streams_each_piece_as_it_comes(tmp_path, monkeypatch):
    """Text is printed (and flushed) once per step, not once at the end."""
    import builtins
    folder = str(tmp_path / "m")
    make_checkpoint(folder, "llama-gqa")
    pieces = []
    real_print = builtins.print
    monkeypatch.setattr(builtins, "print", lambda *a, **k: pieces.append((a, k)) or real_print(*a, **k))
    assert main(["generate", folder, "t5 t6", "--raw", "--max-tokens", "6", "--dtype", "float32"]) == 0
    flushed = [a for a, k in pieces if k.get("flush") and a and a[0]]
    assert len(flushed) == 6


def test_version_and_log_level_after_the_subcommand(capsys):
    import keel
    import pytest
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"keel {keel.__version__}"
    assert main(["generate", "hi", "--model", "/no/such/model", "--log-level", "debug"]) == 2
    assert main(["--log-level", "INFO", "generate", "hi", "--model", "/no/such/model", "-q"]) == 2


def test_quantize_group_size_reaches_the_engine(tmp_path, capsys, monkeypatch):
    import keel.llm
    folder = str(tmp_path / "m")
    make_checkpoint(folder, "llama-gqa")
    seen = {}
    real = keel.llm.LLM

    def spy(*a, **kw):
        seen["llm"] = llm = real(*a, **kw)
        return llm
    monkeypatch.setattr(keel.llm, "LLM", spy)
    monkeypatch.setattr("keel.LLM", spy)
    args = ["generate", folder, "t5", "--raw", "--max-tokens", "2", "--dtype", "float32", "--quantize", "int4"]
    assert main(args + ["--quantize-group-size", "32"]) == 0
    quant = seen["llm"].engine.quantization
    assert quant.method == "int4" and quant.group_size == 32
    assert main(args + ["--quantize-group-size", "64"]) == 2  # the tiny model's 96-wide layer: refused
    assert "group size 64 does not divide" in capsys.readouterr().err
