"""Any torch.nn.Module through the Python API: a MobileNet-style CNN (depthwise convolutions, BatchNorm, SiLU,
ReLU6, squeeze-excitation, a residual) that squash was never tuned on is compressed, measured against its float
self, saved with a constructor reference, reloaded without `module=`, run packed and exported to ONNX.

Budgets: int8 output cosine ≥ 0.999 and every layer's output SQNR ≥ 30 dB; rtn4 cosine ≥ 0.95; the file and the
packed runtime reproduce the reference path within 1e-5 relative RMS; ONNX Runtime within 1e-4.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import squash
from squash import SquashError
from squash.errors import FormatError
from squash.eval.guard import problems
from squash.recipe import survey


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int = 4):
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.SiLU())
        self.depthwise = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h),
                                       nn.SiLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(h, h // 4, 1), nn.ReLU(),
                                nn.Conv2d(h // 4, h, 1), nn.Sigmoid())
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.depthwise(self.expand(x))
        return x + self.project(y * self.se(y))


class TinyMobileNet(nn.Module):
    """Stem conv → two inverted residual blocks → 1×1 head → pool → linear classifier (timm's EfficientNet-Lite
    shape, at toy size)."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(width), InvertedResidual(width))
        self.head = nn.Sequential(nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width), nn.ReLU6())
        self.classifier = nn.Linear(4 * width, classes)

    def forward(self, x):
        return self.classifier(self.head(self.blocks(self.stem(x))).mean((2, 3)))


class NeedsArgs(TinyMobileNet):
    def __init__(self, width: int, classes: int):
        super().__init__(width, classes)


def _trained_like(net: nn.Module) -> nn.Module:
    """Seeded weights, and BatchNorm statistics away from their init, as a trained network has."""
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return net.eval()


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    return squash.load(_trained_like(TinyMobileNet()), example_input=X)


def test_every_conv_is_found_depthwise_included(mobilenet):
    targets, skipped = survey(mobilenet.module)
    convs = [n for n, m in mobilenet.module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert skipped == {}
    assert sorted(n for n, _, _ in targets) == sorted(convs)
    assert mobilenet.config["constructor"] == f"{TinyMobileNet.__module__}:TinyMobileNet"


def test_int8_and_rtn4_within_budget_and_guarded(mobilenet):
    small = squash.compress(mobilenet, squash.load_recipe("int8"))
    assert all(v.startswith("compressed") for v in small.layers.values())
    report = squash.evaluate(small, mobilenet, repeats=1)
    assert report["quality"]["cosine"] >= 0.999, report["quality"]
    assert all(r["output_sqnr_db"] >= 30 for r in report["layers"].values()), report["layers"]
    assert report["latency"]["float"]["median_ms"] > 0
    assert problems(report, small) == []
    low = squash.compress(mobilenet, squash.load_recipe("rtn4"))
    q = squash.evaluate(low, mobilenet, repeats=1)["quality"]
    assert q["cosine"] >= 0.95, q

    # a layer whose scales are destroyed is caught by the guard and named
    bad = squash.compress(mobilenet, squash.load_recipe("int8"))
    bad.tensors["blocks.1.depthwise.0.weight"].scale.mul_(-40.0)
    report = squash.evaluate(bad, mobilenet, repeats=1)
    assert problems(report, bad)
    worst = min(report["layers"].items(), key=lambda kv: kv[1]["output_sqnr_db"])[0]
    assert worst == "blocks.1.depthwise.0"


def test_file_rebuilds_from_its_constructor_reference(mobilenet, tmp_path):
    from squash.runtime.packed import load_packed

    small = squash.compress(mobilenet, squash.load_recipe("int8"))
    path = squash.save(small, tmp_path / "m.squash")
    again = squash.load_squash(path)  # no module=: the constructor reference builds the architecture
    with torch.inference_mode():
        want = small.module(X)
        torch.testing.assert_close(again.module(X), want, rtol=0, atol=0)
        fast = load_packed(path)
        got = fast.module(X)
    assert all(v.startswith("packed") for v in fast.runtime.values()), fast.runtime
    rel = ((got - want).pow(2).mean() / want.pow(2).mean()).sqrt().item()
    assert rel <= 1e-5, rel


def test_constructor_needs_arguments_or_module(tmp_path):
    net = _trained_like(NeedsArgs(8, 5))
    model = squash.load(net, example_input=X)
    assert "constructor" not in model.config  # its arguments are unknown
    path = squash.save(squash.compress(model, squash.load_recipe("int8")), tmp_path / "a.squash")
    with pytest.raises(FormatError, match="module="):
        squash.load_squash(path)
    assert squash.load_squash(path, module=NeedsArgs(8, 5)).module(X).shape == (2, 5)

    ref = f"{NeedsArgs.__module__}:NeedsArgs"
    model = squash.load(net, example_input=X, constructor=ref, kwargs={"width": 8, "classes": 5})
    path = squash.save(squash.compress(model, squash.load_recipe("int8")), tmp_path / "b.squash")
    assert squash.load_squash(path).module(X).shape == (2, 5)
    with pytest.raises(SquashError, match="different architecture"):
        squash.load(net, constructor=ref, kwargs={"width": 8, "classes": 6})
    with pytest.raises(SquashError, match="not an nn.Module class"):
        squash.load(net, constructor="os:getcwd")  # a file never names anything else to call
    with pytest.raises(SquashError, match="cannot be imported"):
        squash.load(net, constructor="no_such_package.nets:Net")
    with pytest.raises(SquashError, match="starting with '_'"):  # pkg.__main__ would run a program on import
        squash.load(net, constructor="unittest.__main__:X")
    # a class whose no-argument form is another architecture is simply not recorded (nn.Sequential)
    seq = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert "constructor" not in squash.load(seq).config


@pytest.mark.parametrize("recipe", ["int8", "rtn4"])
def test_onnx_export_runs_in_onnxruntime(mobilenet, tmp_path, recipe):
    import onnxruntime as ort

    from squash.io.onnx_export import export_onnx, session_options

    small = squash.compress(mobilenet, squash.load_recipe(recipe))
    out = tmp_path / "m.onnx"
    report = export_onnx(small, out)
    assert len(report["tensors"]) == len(small.tensors)
    sess = ort.InferenceSession(str(out), session_options(), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))  # another batch size
    (got,) = sess.run(None, {"input": x.numpy()})
    with torch.inference_mode():
        want = small.module(x).numpy()
    rel = float(((got - want) ** 2).mean() / (want**2).mean()) ** 0.5
    assert rel <= 1e-4, rel


def test_a_module_without_example_input_says_what_to_do(tmp_path):
    from squash.io.onnx_export import export_onnx

    model = squash.load(_trained_like(TinyMobileNet()))
    small = squash.compress(model, squash.load_recipe("int8"))
    with pytest.raises(SquashError, match="example_input"):
        export_onnx(small, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
