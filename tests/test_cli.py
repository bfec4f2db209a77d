"""The command line end to end on digits-cnn, and one clear error line for each bad input."""
import json
import subprocess
import sys

import pytest
import torch

from squash.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def digits_file(tmp_path, capsys):
    """digits-cnn compressed at int8 by the CLI, a fresh file for each test (some damage it)."""
    out = tmp_path / "d.squash"
    assert run(capsys, "compress", "digits-cnn", "-o", str(out), "--json", "--quick")[0] == 0
    return out


def test_compress_eval_inspect_end_to_end(tmp_path):
    """The installed `squash` command, as a user runs it."""
    out = tmp_path / "digits.squash"
    cmd = [sys.executable, "-m", "squash.cli"]
    r = subprocess.run(cmd + ["compress", "digits-cnn", "--recipe", "int8", "-o", str(out), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert out.is_file() and report["file_bytes"] == out.stat().st_size
    assert report["weight_bytes"] <= 0.30 * report["float_weight_bytes"]
    q = report["quality"]
    assert q["accuracy_float"] - q["accuracy"] <= 0.005
    assert report["latency"]["float"]["median_ms"] > 0

    r = subprocess.run(cmd + ["eval", str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["quality"]["accuracy"] == q["accuracy"]  # same file, same answer

    r = subprocess.run(cmd + ["inspect", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "conv1.weight" in r.stdout and "int8" in r.stdout


def test_inspect_json_lists_every_tensor_with_its_error(tmp_path, capsys, digits_file):
    code, stdout, _ = run(capsys, "inspect", str(digits_file), "--json")
    rows = {r["name"]: r for r in json.loads(stdout)["tensors"]}
    assert set(rows) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    assert all(r["sqnr_db"] > 30 for r in rows.values())
    # codes at 8 bits plus one float32 scale per output channel: 8 + 32 / (inputs per channel)
    assert rows["conv1.weight"]["bits_per_weight"] == pytest.approx(8 + 32 / 9)
    assert rows["fc1.weight"]["bits_per_weight"] == pytest.approx(8 + 32 / 512)


def test_models_lists_the_bundled_models(capsys):
    code, stdout, _ = run(capsys, "models", "--json")
    names = {r["name"]: r for r in json.loads(stdout)}
    assert code == 0 and set(names) == {"smollm2-135m", "minilm-l6", "digits-cnn"}
    assert "Q4_1" in names["smollm2-135m"]["origin"]
    assert 134e6 < names["smollm2-135m"]["parameters"] < 136e6


def _one_error_line(code, err, *needles):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    text = " ".join(err.split())
    for needle in needles:
        assert needle in text, err


def test_unknown_model_name(tmp_path, capsys):
    code, _, err = run(capsys, "compress", "gpt-17", "-o", str(tmp_path / "x.squash"))
    _one_error_line(code, err, "gpt-17", "bundled")
    assert not list(tmp_path.iterdir())


def test_missing_path(tmp_path, capsys):
    code, _, err = run(capsys, "compress", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.squash"))
    _one_error_line(code, err, "nowhere")
    assert not list(tmp_path.iterdir())


def test_unsupported_file(tmp_path, capsys):
    f = tmp_path / "model.pkl"
    f.write_bytes(b"\x80\x04not a model")
    code, _, err = run(capsys, "compress", str(f), "-o", str(tmp_path / "x.squash"))
    _one_error_line(code, err, "unsupported")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pkl"]


def test_corrupt_gguf(tmp_path, capsys):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    before = f.read_bytes()
    code, _, err = run(capsys, "compress", str(f), "-o", str(tmp_path / "x.squash"))
    _one_error_line(code, err, "broken.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"] and f.read_bytes() == before


def test_not_a_gguf(tmp_path, capsys):
    f = tmp_path / "fake.gguf"
    f.write_bytes(b"PK\x03\x04 a zip file")
    code, _, err = run(capsys, "compress", str(f), "-o", str(tmp_path / "x.squash"))
    _one_error_line(code, err, "not a GGUF")


@pytest.mark.parametrize("recipe,needle", [
    ("[[steps]]\nstep = 'quantize'\nbits = 12\n", "bits"),
    ("[[steps]]\nstep = 'sharpen'\n", "sharpen"),
    ("[[steps]]\nstep = 'quantize'\ncolour = 'red'\n", "colour"),
    ("steps = [\n", "invalid TOML"),
    ("name = 'empty'\n", "no steps"),
])
def test_invalid_recipe(tmp_path, capsys, recipe, needle):
    f = tmp_path / "r.toml"
    f.write_text(recipe)
    code, _, err = run(capsys, "compress", "digits-cnn", "--recipe", str(f), "-o", str(tmp_path / "x.squash"))
    _one_error_line(code, err, needle)
    assert not (tmp_path / "x.squash").exists()


def test_unknown_recipe_name(tmp_path, capsys):
    code, _, err = run(capsys, "compress", "digits-cnn", "--recipe", "int7", "-o", str(tmp_path / "x.squash"))
    _one_error_line(code, err, "int7", "int8")


def test_existing_output_survives_a_failed_run(tmp_path, capsys):
    out = tmp_path / "x.squash"
    out.write_bytes(b"keep me")
    code, _, err = run(capsys, "compress", "gpt-17", "-o", str(out))
    assert code == 2 and out.read_bytes() == b"keep me"


def test_nan_weights_in_a_model_folder(tmp_path, capsys, tiny_bert_dir):
    from safetensors.torch import load_file, save_file

    weights = tiny_bert_dir / "model.safetensors"
    state = load_file(weights)
    name = next(k for k in state if k.endswith("intermediate.dense.weight"))
    state[name][3, 4] = float("inf")
    save_file(state, weights, metadata={"format": "pt"})
    before = weights.read_bytes()
    code, _, err = run(capsys, "compress", str(tiny_bert_dir), "-o", str(tmp_path / "x.squash"))
    _one_error_line(code, err, "intermediate.dense.weight", "NaN/Inf")
    assert not (tmp_path / "x.squash").exists() and weights.read_bytes() == before


def test_hf_folder_compresses(tmp_path, capsys, tiny_bert_dir):
    out = tmp_path / "tiny.squash"
    code, stdout, err = run(capsys, "compress", str(tiny_bert_dir), "-o", str(out), "--json", "--quick")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["kind"] == "encoder" and report["quality"]["cosine"] > 0.99


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_bad_squash_files_for_eval_and_inspect(tmp_path, capsys, damage, digits_file):
    out = digits_file
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"\x00" * 100)
    for verb in ("eval", "inspect"):
        code, _, err = run(capsys, verb, str(out))
        _one_error_line(code, err, "d.squash")


def test_generate_refuses_a_non_language_model(tmp_path, capsys, digits_file):
    out = digits_file
    code, _, err = run(capsys, "generate", str(out), "hello")
    _one_error_line(code, err, "language model")


def test_error_text_is_not_read_as_markup(tmp_path, capsys):
    code, _, err = run(capsys, "compress", "[bold]model[/x]", "-o", str(tmp_path / "x.squash"))
    _one_error_line(code, err, "[bold]model[/x]")


def test_non_utf8_recipe(tmp_path, capsys):
    f = tmp_path / "r.toml"
    f.write_bytes(b"\xff\xfe\x00name")
    code, _, err = run(capsys, "compress", "digits-cnn", "--recipe", str(f), "-o", str(tmp_path / "x.squash"))
    _one_error_line(code, err, "r.toml")


def test_structurally_broken_header_for_inspect_and_eval(tmp_path, capsys, digits_file):
    from test_squash_file import _rewrite_header

    out = digits_file

    def break_it(h):
        meta = json.loads(h["__metadata__"]["squash"])
        meta["tensors"]["fc1.weight"] = ["not", "a", "table"]
        h["__metadata__"]["squash"] = json.dumps(meta)

    bad = _rewrite_header(out, tmp_path / "bad.squash", break_it)
    for verb in ("inspect", "eval"):
        code, _, err = run(capsys, verb, str(bad))
        _one_error_line(code, err, "corrupt squash header")


def test_written_file_is_readable_by_others(tmp_path, capsys, digits_file):
    out = digits_file
    assert out.stat().st_mode & 0o044  # not mkstemp's private 0600


def test_a_missing_tensor_is_refused_but_a_missing_pooler_is_not(tmp_path, capsys, tiny_bert_dir):
    """transformers fills a tensor the weights lack with random values; squash refuses such a folder. An encoder's
    pooler is the exception: RoBERTa and most fine-tunes do not store one and squash's embeddings never use it."""
    from safetensors.torch import load_file, save_file

    from squash import load

    weights = tiny_bert_dir / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if not k.startswith("pooler.")}, weights, metadata={"format": "pt"})
    assert load(tiny_bert_dir).kind == "encoder"
    gone = next(k for k in state if k.endswith("intermediate.dense.bias"))
    save_file({k: v for k, v in state.items() if k != gone}, weights, metadata={"format": "pt"})
    code, _, err = run(capsys, "compress", str(tiny_bert_dir), "-o", str(tmp_path / "x.squash"))
    _one_error_line(code, err, "lack", gone)
