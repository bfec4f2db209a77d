"""Step 6, fine-tune: knowledge distillation from the float model into the compressed one, quantization-aware.

Loss (teacher t = the float model, student s = the compressed model, calibration data only):
    language models   KL(p_t ‖ p_s) of next-token distributions at temperature τ, times τ², mean over tokens
    sentence encoders 1 − cos(e_t, e_s) of mean-pooled embeddings + 1 − cos of each token's hidden state
    classifiers       KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) · τ²   (Hinton et al. 2015)

What trains (everything else is fixed, masks included):
    integer grids   a latent float weight W̃ (initialised to Ŵ, so training starts from the compressed model) and
                    the block scales s (trained as log s: they stay positive); the forward pass uses
                    Ŵ = M ⊙ s·(⌊W̃/s + z⌉ − z)·diag(r), the rounding
                    passed by the straight-through estimator (∂⌊x⌉/∂x := 1 inside the clamp range, 0 outside;
                    Bengio et al. 2013), so s learns as in LSQ (Esser et al. 2020). Codes are re-rounded at the end.
    custom grids    the levels G (k-means centroids), the scales and a latent W̃ (starting at G[c]): the forward
                    pass uses Ŵ = M ⊙ s·G[c(W̃)], c(W̃) the nearest level, so the gradient of a centroid is the sum
                    of the gradients of the weights that share it (Deep Compression) and W̃ may move a weight to
                    another centroid (straight through the assignment).
    pruned floats   the kept values D of W ≈ M ⊙ D.
    low-rank, outliers  U, V and the outlier values.
    float tensors   biases and norms left in float.

Seeded (batches drawn by step index, so a resumed run sees the same data), Adam, cosine learning rate, and a
checkpoint (safetensors: trainable tensors + Adam state; the step and a run key in its metadata) every
`checkpoint_every` steps, resumed when the same run is started again. Held-out loss on calibration data set
aside before training is reported before and after.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from squash.errors import RecipeError, SquashError
from squash.tensor import CompressedTensor, expand_blocks

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Finetune:
    """Distil the float model into the compressed one for `steps` Adam steps of `batch` samples."""

    steps: int = 100
    lr: float = 1e-4
    lr_scale: float = 1e-3
    batch: int = 4
    seq_len: int = 256
    temperature: float = 1.0
    seed: int = 0
    held_out: int = 8
    checkpoint_every: int = 25

    name: ClassVar[str] = "finetune"
    model_level: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        for key in ("steps", "batch", "seq_len", "held_out", "checkpoint_every", "seed"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "seed" else 1):
                raise RecipeError(f"finetune.{key} = {v!r}: a positive integer")
        for key in ("lr", "lr_scale", "temperature"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 100:
                raise RecipeError(f"finetune.{key} = {v!r}: a positive number")


class TrainableWeight(nn.Module):
    """The trainable form of a CompressedTensor; forward() gives Ŵ differentiably, export() the tensor back."""

    def __init__(self, ct: CompressedTensor):
        super().__init__()
        self.ct = ct
        rows, cols = ct.matrix_shape
        self.rows, self.cols = rows, cols
        if ct.codes is not None:  # scales train as logarithms: they stay positive whatever the step size
            self.log_scale = nn.Parameter(ct.scale.float().clamp(min=1e-12).log())
            if ct.grid is None:  # latent weight on the integer grid: s·(c − z) exactly reproduces the codes
                s = expand_blocks(ct.scale.float(), ct.block, rows, cols)
                z = expand_blocks(ct.zero_point(), ct.block, rows, cols)
                self.latent = nn.Parameter(s * (ct.codes.float() - z))
            else:  # codes re-chosen as the nearest level of a latent weight, which starts at the levels
                self.grid = nn.Parameter(ct.grid.float().clone())
                self.latent = nn.Parameter(self._levels(self.grid, ct.codes).detach().clone())
        if ct.dense is not None:
            self.dense = nn.Parameter(ct.dense.float().clone())
        for f in ("u", "v", "sparse_value"):
            if getattr(ct, f) is not None:
                setattr(self, f, nn.Parameter(getattr(ct, f).float().clone()))

    def _limits(self) -> tuple[float, float]:
        lo = 1.0 if (self.ct.zero is None and self.ct.grid is None) else 0.0
        return lo, float(2**self.ct.bits - 1)

    def quantized_part(self) -> torch.Tensor:
        ct = self.ct
        if ct.codes is None:
            return self.dense if ct.dense is not None else torch.zeros(self.rows, self.cols)
        s = expand_blocks(self.log_scale.exp(), ct.block, self.rows, self.cols)
        if ct.grid is None:
            z = expand_blocks(ct.zero_point(), ct.block, self.rows, self.cols)
            q = torch.clamp(self.latent / s + z, *self._limits())
            q = q + (torch.round(q) - q).detach()  # straight-through rounding
            w = s * (q - z)
        else:
            levels = self._levels(self.grid, self.nearest_codes())
            w = s * (levels + self.latent - self.latent.detach() - ct.midpoint())  # gradients reach G and W̃
        return w if ct.col_scale is None else w * ct.col_scale.float()

    @staticmethod
    def _levels(grid: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return torch.gather(grid, 1, codes.long()) if grid.dim() == 2 else grid[codes.long()]

    @torch.no_grad()
    def nearest_codes(self) -> torch.Tensor:
        """The code of the level nearest to each latent weight (levels may have moved past each other)."""
        g = self.grid.detach() if self.grid.dim() == 2 else self.grid.detach()[None, :]  # (rows or 1, k)
        order = g.argsort(dim=1)
        sorted_g = g.gather(1, order)
        x = self.latent.detach() if self.grid.dim() == 2 else self.latent.detach().reshape(1, -1)
        idx = torch.searchsorted((sorted_g[:, 1:] + sorted_g[:, :-1]).contiguous() / 2, x.contiguous())
        return order.gather(1, idx).reshape(self.rows, self.cols)

    def forward(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.quantized_part()
        if self.ct.mask is not None:
            w = w * self.ct.mask
        if self.ct.u is not None:
            w = w + self.u @ self.v
        if self.ct.sparse_index is not None:
            w = w.reshape(-1).index_add(0, self.ct.sparse_index.long(), self.sparse_value).reshape(self.rows, self.cols)
        return w.reshape(self.ct.shape).to(dtype)

    @torch.no_grad()
    def export(self) -> CompressedTensor:
        """The trained values in the tensor's own stored dtypes; integer codes re-rounded with the stored scales."""
        ct = self.ct
        out = replace(ct, extra=dict(ct.extra))
        if ct.codes is not None:
            out.scale = self.log_scale.detach().exp().to(ct.scale.dtype)
            if ct.grid is None:
                s = expand_blocks(out.scale.float(), ct.block, self.rows, self.cols)
                z = expand_blocks(ct.zero_point(), ct.block, self.rows, self.cols)
                codes = torch.clamp(torch.round(self.latent / s + z), *self._limits()).to(torch.uint8)
                out.codes = codes if ct.mask is None else codes.masked_fill(~ct.mask, 0)
            else:
                out.grid = self.grid.detach().to(ct.grid.dtype)
                self.grid.data = out.grid.float()  # choose codes against the levels as stored
                codes = self.nearest_codes().to(torch.uint8)
                out.codes = codes if ct.mask is None else codes.masked_fill(~ct.mask, 0)
        if ct.dense is not None:
            out.dense = (self.dense.detach() * (ct.mask if ct.mask is not None else 1)).to(ct.dense.dtype)
        for f in ("u", "v", "sparse_value"):
            if getattr(ct, f) is not None:
                setattr(out, f, getattr(self, f).detach().to(getattr(ct, f).dtype))
        return out


# ---------------------------------------------------------------- data and losses


def training_data(model, config: Finetune) -> tuple[Callable[[int], dict], list[dict]]:
    """(batch for a step index, held-out batches) from the calibration data only."""
    from squash.data import calibration_text, paragraphs
    from squash.models import tokenizer_for

    if model.kind == "causal-lm":
        ids = tokenizer_for(model)(calibration_text(), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        n = len(ids) // config.seq_len
        windows = ids[: n * config.seq_len].reshape(n, config.seq_len)  # (n, T)
        held, train = windows[: config.held_out], windows[config.held_out :]
        if len(train) < 1:
            raise SquashError("not enough calibration text for fine-tuning at this seq_len")

        def batch(step: int) -> dict:
            g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            return {"input_ids": train[torch.randint(len(train), (config.batch,), generator=g)], "use_cache": False}

        return batch, [{"input_ids": held[i : i + config.batch], "use_cache": False}
                       for i in range(0, len(held), config.batch)]
    if model.kind == "encoder":
        tok = tokenizer_for(model)
        texts = paragraphs(calibration_text())
        held, train = texts[: config.held_out], texts[config.held_out :]

        def encode(chosen: list[str]) -> dict:
            return dict(tok(chosen, padding=True, truncation=True, max_length=128, return_tensors="pt"))

        def batch(step: int) -> dict:
            g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            return encode([train[i] for i in torch.randint(len(train), (config.batch,), generator=g).tolist()])

        return batch, [encode(held[i : i + config.batch]) for i in range(0, len(held), config.batch)]
    if model.kind == "classifier":
        from squash.digits import digits_split

        x = digits_split()["x_train"]
        held, train = x[: config.held_out], x[config.held_out :]

        def batch(step: int) -> dict:
            g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            return {"x": train[torch.randint(len(train), (config.batch,), generator=g)]}

        return batch, [{"x": held[i : i + config.batch]} for i in range(0, len(held), config.batch)]
    raise SquashError(f"fine-tuning needs a bundled kind of model (language model, encoder, classifier), not {model.kind}")


def distillation_loss(kind: str, student: nn.Module, teacher_out, batch: dict, temperature: float) -> torch.Tensor:
    out = student(**batch)
    tau = temperature
    if kind == "causal-lm":
        logp_s = F.log_softmax(out.logits.float() / tau, dim=-1)
        logp_t = F.log_softmax(teacher_out.logits.float() / tau, dim=-1)
        return (logp_t.exp() * (logp_t - logp_s)).sum(-1).mean() * tau**2
    if kind == "encoder":
        mask = batch["attention_mask"][..., None].float()  # (B, T, 1)
        hs, ht = out.last_hidden_state.float(), teacher_out.last_hidden_state.float()
        pooled = 1 - F.cosine_similarity((hs * mask).sum(1), (ht * mask).sum(1), dim=-1).mean()
        tokens = ((1 - F.cosine_similarity(hs, ht, dim=-1)) * mask[..., 0]).sum() / mask.sum()
        return pooled + tokens
    logp_s = F.log_softmax(out.float() / tau, dim=-1)
    logp_t = F.log_softmax(teacher_out.float() / tau, dim=-1)
    return (logp_t.exp() * (logp_t - logp_s)).sum(-1).mean() * tau**2


# ---------------------------------------------------------------- the loop


def _attach(student: nn.Module) -> dict[str, TrainableWeight]:
    """A TrainableWeight on every CompressedWeight of the student (tied weights share one)."""
    from squash.runtime.modules import CompressedWeight

    out = {}
    for name, m in student.named_modules():
        if isinstance(m, CompressedWeight) and getattr(m, "trainable", None) is None:
            m.trainable = TrainableWeight(m.ct)
            out[name] = m.trainable
    return out


def _trainable_params(student: nn.Module, config: Finetune) -> tuple[list[dict], dict[str, nn.Parameter]]:
    named = {}
    for name, p in student.named_parameters():
        if ".trainable." in name or p.dim() <= 1:  # compressed-tensor fields; biases and norms
            p.requires_grad_(True)
            named[name] = p
        else:
            p.requires_grad_(False)
    fast = {n for n in named if n.endswith((".log_scale", ".grid")) or named[n].dim() <= 1}
    groups = [{"params": [named[n] for n in named if n not in fast], "lr": config.lr},
              {"params": [named[n] for n in named if n in fast], "lr": config.lr_scale}]
    return [g for g in groups if g["params"]], named


def run_key(model, config: Finetune) -> str:
    """Identifies a run: the same compressed model and settings resume from the same checkpoint."""
    h = hashlib.sha256(json.dumps({"source": model.source, "recipe": model.recipe, "ft": asdict(config)},
                                  sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _save_checkpoint(path: Path, step: int, key: str, named: dict, opt: torch.optim.Optimizer) -> None:
    from safetensors.torch import save_file

    tensors = {f"param.{n}": p.detach().contiguous() for n, p in named.items()}
    index = {id(p): n for n, p in named.items()}
    for p, state in opt.state.items():
        for k in ("exp_avg", "exp_avg_sq"):
            if k in state:
                tensors[f"adam.{k}.{index[id(p)]}"] = state[k].contiguous()
    steps = {index[id(p)]: float(s["step"]) for p, s in opt.state.items() if "step" in s}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"squash_finetune": json.dumps({"step": step, "key": key, "adam_steps": steps})})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_checkpoint(path: Path, key: str, named: dict, opt: torch.optim.Optimizer) -> int:
    """The step to resume from (0 when there is no usable checkpoint of this run)."""
    from safetensors import safe_open

    if not path.is_file():
        return 0
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("squash_finetune", "{}"))
            if meta.get("key") != key:
                return 0
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # a damaged checkpoint is ignored, never trusted
        return 0
    with torch.no_grad():
        for n, p in named.items():
            if f"param.{n}" not in tensors or tensors[f"param.{n}"].shape != p.shape:
                return 0
        for n, p in named.items():
            p.copy_(tensors[f"param.{n}"])
            if f"adam.exp_avg.{n}" in tensors:
                opt.state[p] = {"step": torch.tensor(meta["adam_steps"][n]),
                                "exp_avg": tensors[f"adam.exp_avg.{n}"].clone(),
                                "exp_avg_sq": tensors[f"adam.exp_avg_sq.{n}"].clone()}
    return int(meta["step"])


def held_out_loss(kind: str, student: nn.Module, teacher: nn.Module, held: list[dict], temperature: float) -> float:
    with torch.no_grad():
        losses = [distillation_loss(kind, student, teacher(**b), b, temperature).item() for b in held]
    return sum(losses) / len(losses)


def finetune(student, teacher, config: Finetune, progress: Progress | None = None,
             checkpoint: str | os.PathLike | None = None) -> dict:
    """Distil `teacher` (a float Model) into `student` (a compressed Model, changed in place: its compressed
    tensors are replaced by the trained ones). Returns the held-out distillation loss before and after."""
    torch.manual_seed(config.seed)
    batch_for, held = training_data(student, config)
    weights = _attach(student.module)
    student.module.train(False)  # no dropout: the teacher is deterministic too
    groups, named = _trainable_params(student.module, config)
    opt = torch.optim.Adam(groups)
    base_lr = [g["lr"] for g in opt.param_groups]
    key = run_key(student, config)
    ckpt = Path(checkpoint) if checkpoint else None
    start = _load_checkpoint(ckpt, key, named, opt) if ckpt else 0
    before = held_out_loss(student.kind, student.module, teacher.module, held, config.temperature) if start == 0 else None
    try:
        for step in range(start, config.steps):
            for g, lr in zip(opt.param_groups, base_lr):  # cosine decay
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
            batch = batch_for(step)
            with torch.no_grad():
                t_out = teacher.module(**batch)
            loss = distillation_loss(student.kind, student.module, t_out, batch, config.temperature)
            if not torch.isfinite(loss):
                raise SquashError(f"fine-tuning diverged at step {step + 1} (loss {loss.item()}); lower lr or lr_scale")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ckpt and ((step + 1) % config.checkpoint_every == 0) and step + 1 < config.steps:
                _save_checkpoint(ckpt, step + 1, key, named, opt)
            if progress:
                progress(step + 1, config.steps, f"distillation loss {loss.item():.4f}")
    finally:
        for p in student.module.parameters():
            p.requires_grad_(False)
    _detach(student, weights)
    # measured on the tensors as stored (float16 scales, re-rounded codes), not on the training forward pass
    after = held_out_loss(student.kind, student.module, teacher.module, held, config.temperature)
    if ckpt:
        ckpt.unlink(missing_ok=True)
    return {"held_out_loss_before": before, "held_out_loss_after": after, "steps": config.steps,
            "resumed_from": start}


def _detach(student, weights: dict[str, TrainableWeight]) -> None:
    """Write the trained tensors back into the student and drop the trainable modules."""
    from squash.runtime.modules import CompressedWeight

    new = {}
    for name, m in student.module.named_modules():
        if isinstance(m, CompressedWeight) and getattr(m, "trainable", None) is not None:
            ct = m.trainable.export()
            for old_name, old in student.tensors.items():
                if old is m.ct:
                    new[old_name] = ct
            m.set_tensor(ct)
            m.trainable = None
    student.tensors.update(new)
