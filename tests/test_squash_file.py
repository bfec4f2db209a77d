"""The .squash file: bit-identical round trips, atomic writes, and one clear error for each bad file."""
import json
import struct

import pytest
import torch
from torch import nn

import squash
from squash import FormatError, SquashError, compress, load, load_recipe, load_squash, save
from squash.io.squash_file import read_header


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied, as in most language models

    def forward(self, ids):
        return self.head(self.norm(torch.relu(self.proj(self.embed(ids)))))


@pytest.fixture(scope="module")
def small_digits(digits):
    return compress(digits, load_recipe("int8"))


def test_round_trip_is_bit_identical(tmp_path, small_digits):
    path = save(small_digits, tmp_path / "d.squash")
    back = load_squash(path)
    assert set(back.tensors) == set(small_digits.tensors)
    for name, ct in small_digits.tensors.items():
        assert torch.equal(back.tensors[name].codes, ct.codes)
        assert torch.equal(back.tensors[name].scale, ct.scale)
        assert back.tensors[name].block == ct.block
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(back.module(x), small_digits.module(x))
    # saving what was loaded gives the same bytes again
    again = save(back, tmp_path / "again.squash")
    assert again.read_bytes() == path.read_bytes()


def test_file_is_readable_with_plain_safetensors(tmp_path, small_digits):
    from safetensors import safe_open

    path = save(small_digits, tmp_path / "d.squash")
    with safe_open(path, framework="pt") as f:
        header = json.loads(f.metadata()["squash"])
        assert header["format_version"] == 2
        assert f.get_tensor("fc1.weight.codes").dtype == torch.uint8
        assert "fc1.bias" in f.keys()


def test_tied_weights_stay_tied(tmp_path):
    torch.manual_seed(0)
    model = load(TiedLM())
    small = compress(model, load_recipe("int8"))
    assert small.tied == {"head.weight": "embed.weight"}
    assert small.module.head.weight_q is small.module.embed.weight_q
    assert model.module.head.weight is model.module.embed.weight  # the float model is untouched
    path = save(small, tmp_path / "t.squash")
    back = load_squash(path, module=TiedLM())
    assert back.module.head.weight_q is back.module.embed.weight_q
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(back.module(ids), small.module(ids))
    # stored once: the file holds one set of codes for the shared table
    assert sum(1 for k in read_header(path)["tensors"] if k.startswith(("embed", "head"))) == 1


def test_compress_leaves_the_float_model_untouched(digits):
    before = {k: v.clone() for k, v in digits.module.state_dict().items()}
    compress(digits, load_recipe("int8"))
    assert all(torch.equal(before[k], v) for k, v in digits.module.state_dict().items())


def test_every_dequantized_weight_is_within_half_a_scale(small_digits, digits):
    for name, ct in small_digits.tensors.items():
        w = digits.module.get_parameter(name)
        s = ct.scale.reshape(-1, *([1] * (w.dim() - 1)))  # per output channel
        assert ((w - ct.dequantize()).abs() <= s / 2 + 1e-7 * w.abs()).all(), name


def test_nan_weights_are_refused():
    m = TiedLM()
    with torch.no_grad():
        m.proj.weight[0, 0] = float("nan")
    with pytest.raises(SquashError, match="proj.weight.*NaN"):
        compress(m, load_recipe("int8"))


def test_unknown_exclude_is_refused(digits):
    with pytest.raises(SquashError, match="conv9"):
        compress(digits, squash.Recipe([squash.Quantize()], exclude=["conv9"]))


def test_exclude_keeps_a_layer_float(digits):
    small = compress(digits, squash.Recipe([squash.Quantize()], exclude=["fc2"]))
    assert "fc2.weight" not in small.tensors
    assert torch.equal(small.module.fc2.weight, digits.module.fc2.weight)


# ---------------------------------------------------------------- bad files


@pytest.fixture
def good_file(tmp_path, small_digits):
    return save(small_digits, tmp_path / "good.squash")


def _rewrite_header(path, out, edit):
    """Rewrite the safetensors JSON header of `path` through `edit`, keeping the data bytes."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    out.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return out


def test_missing_file(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        load_squash(tmp_path / "nope.squash")


def test_truncated_file(tmp_path, good_file):
    cut = tmp_path / "cut.squash"
    cut.write_bytes(good_file.read_bytes()[: good_file.stat().st_size // 2])
    with pytest.raises(FormatError, match="truncated"):
        load_squash(cut)


def test_not_a_safetensors_file(tmp_path):
    junk = tmp_path / "junk.squash"
    junk.write_bytes(b"hello, this is not a model" * 10)
    with pytest.raises(FormatError):
        load_squash(junk)


def test_newer_format_version(tmp_path, good_file):
    def bump(h):
        meta = json.loads(h["__metadata__"]["squash"])
        meta["format_version"] = 99
        h["__metadata__"]["squash"] = json.dumps(meta)

    newer = _rewrite_header(good_file, tmp_path / "newer.squash", bump)
    with pytest.raises(FormatError, match="newer"):
        load_squash(newer)


def test_corrupt_header_json(tmp_path, good_file):
    def garble(h):
        h["__metadata__"]["squash"] = "{not json"

    with pytest.raises(FormatError, match="corrupt squash header"):
        load_squash(_rewrite_header(good_file, tmp_path / "bad.squash", garble))


def test_flipped_byte_in_the_arrays_is_caught(tmp_path, good_file):
    raw = bytearray(good_file.read_bytes())
    raw[-10] ^= 0xFF
    bad = tmp_path / "flipped.squash"
    bad.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="checksum"):
        load_squash(bad)


def test_save_is_atomic_and_refuses_bad_targets(tmp_path, small_digits):
    with pytest.raises(SquashError):
        save(small_digits, tmp_path / "missing-folder" / "x.squash")
    with pytest.raises(SquashError):
        save(small_digits, tmp_path / "x.bin")
    save(small_digits, tmp_path / "x.squash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.squash"]  # no temporary file left behind


def test_a_header_that_does_not_fit_the_arrays(tmp_path, good_file):
    def wrong_block(h):
        meta = json.loads(h["__metadata__"]["squash"])
        meta["tensors"]["fc1.weight"]["block"] = [1, 7]
        h["__metadata__"]["squash"] = json.dumps(meta)

    with pytest.raises(FormatError, match="scale has shape"):
        load_squash(_rewrite_header(good_file, tmp_path / "b.squash", wrong_block))


@pytest.mark.parametrize("edit", [
    lambda m: m["tensors"]["fc1.weight"].update(kept=10**30),
    lambda m: m["tensors"]["fc1.weight"].update(zero_frac=10**30),
    lambda m: m["model"]["config"].update(resized={"fc1": [1]}),
])
def test_damaged_header_values_are_format_errors(tmp_path, good_file, edit):
    def change(h):
        meta = json.loads(h["__metadata__"]["squash"])
        edit(meta)
        h["__metadata__"]["squash"] = json.dumps(meta)

    with pytest.raises(FormatError):
        load_squash(_rewrite_header(good_file, tmp_path / "b.squash", change))
