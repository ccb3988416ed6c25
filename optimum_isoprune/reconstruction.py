"""Closed-form recovery at pruning time: refit the layers whose inputs lost channels.

After surgery, every Linear / Conv2d that lost input channels (an MLP's output projection after
removed neurons, an attention output projection after removed heads or head dims, a layer reading a
narrower residual stream, a convolution after removed channels) is refit so that, on the
calibration batches, its output matches the unpruned model's output at the same place:

    W* = argmin_W ||[X 1] W - Y||^2 + lambda ||W - W0||^2,   lambda = damping * mean(diag(X^T X))

with X the pruned model's inputs to the layer (upstream pruning included), Y the original layer's
outputs on its kept channels and W0 the weights left by surgery (so an underdetermined layer stays
near them). Only [X 1]^T [X 1] and [X 1]^T Y are kept, in float64, streamed over the batches; every
layer is solved once from them. "bias" keeps W0 and refits the bias alone (mean compensation), then
re-estimates BatchNorm running statistics on the same batches. The least-squares refit leaves BatchNorm
as it is: a refit convolution reproduces the original BatchNorm input, and re-estimating its statistics
on a few hundred images measured worse (a trained ResNet at 50% / 25% MACs: 77.9 / 84.0 top-1 with,
78.7 / 84.8 without).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import NonFiniteError
from .guards import hooks_removed
from .layers import channels, mixes_channels

logger = logging.getLogger(__name__)


HELD_OUTPUT_BYTES = 2 * 2**30  # original outputs held at once; larger models recompute them in every pass
CHANNEL_WISE = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)

Forward = Callable[[nn.Module, torch.Tensor], Any]


@dataclass
class ReconstructionSummary:
    """What the reconstruction step did; stored in the pruning report and shown on the model card.

    Errors are the mean over refit layers of ||[X 1] W - Y||^2 / ||Y||^2 on the calibration data,
    with the weights left by surgery (`error_before`) and after the refit (`error_after`).
    """

    mode: str
    refit_layers: int = 0
    skipped_layers: dict[str, str] = field(default_factory=dict)  # layer -> why it was not refit
    batchnorm_layers: int = 0
    calibration_images: int = 0
    error_before: float | None = None
    error_after: float | None = None
    underdetermined_layers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for summaries and model cards."""
        if self.mode == "none":
            return "none"
        text = f"{self.mode}: {self.refit_layers} layers refit on {self.calibration_images} calibration images"
        if self.error_before is not None and self.error_after is not None:
            text += f" (layer output error {self.error_before:.4f} -> {self.error_after:.4f})"
        if self.batchnorm_layers:
            text += f", {self.batchnorm_layers} BatchNorm layers re-estimated"
        if self.skipped_layers:
            reasons: dict[str, int] = {}
            for reason in self.skipped_layers.values():
                reasons[reason] = reasons.get(reason, 0) + 1
            text += "; not refit: " + ", ".join(f"{n} x {r}" for r, n in sorted(reasons.items()))
        return text


class _Statistics:
    """Running sums of [X 1]^T [X 1], [X 1]^T Y and ||Y||^2, accumulated in float64."""

    def __init__(self, inputs: int, outputs: int, device: torch.device):
        self.xtx = torch.zeros(inputs + 1, inputs + 1, dtype=torch.float64, device=device)
        self.xty = torch.zeros(inputs + 1, outputs, dtype=torch.float64, device=device)
        self.yy = torch.zeros((), dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = torch.cat([x, x.new_ones(len(x), 1)], dim=1)
        self.xtx += (x.T @ x).double()
        self.xty += (x.T @ y).double()
        self.yy += y.double().square().sum()
        self.rows += len(x)

    def error(self, w: torch.Tensor) -> float:
        """||[X 1] w - Y||^2 / ||Y||^2 for weights `w` of shape (inputs + 1, outputs)."""
        residual = (w * (self.xtx @ w)).sum() - 2 * (w * self.xty).sum() + self.yy
        return float(residual.clamp_min(0) / self.yy.clamp_min(torch.finfo(torch.float64).tiny))


@dataclass(eq=False)
class _Layer:
    """A pruned layer to refit, its original counterpart and the original output channels it kept."""

    name: str
    pruned: nn.Linear | nn.Conv2d
    original: nn.Linear | nn.Conv2d
    kept_out: torch.Tensor
    stats: _Statistics | None = None
    rows_per_image: int = 0

    def weights(self) -> torch.Tensor:
        """The layer as a (inputs + 1, outputs) float64 matrix; the last row is the bias (zeros if none)."""
        weight = self.pruned.weight.detach().reshape(self.pruned.weight.shape[0], -1).T
        bias = self.pruned.bias.detach() if self.pruned.bias is not None else weight.new_zeros(weight.shape[1])
        return torch.cat([weight, bias[None]]).double()

    def write(self, w: torch.Tensor) -> None:
        weight = self.pruned.weight
        with torch.no_grad():
            weight.copy_(w[:-1].T.reshape(weight.shape).to(weight.dtype))
            if self.pruned.bias is not None:
                self.pruned.bias.copy_(w[-1].to(self.pruned.bias.dtype))


def refit_targets(
    removed: dict[tuple[nn.Module, bool], np.ndarray], pruned: nn.Module, original: nn.Module
) -> tuple[list[_Layer], dict[str, str]]:
    """Layers of `pruned` whose inputs lost channels, paired by name with `original`'s; and those that cannot be refit."""
    names = {module: name for name, module in pruned.named_modules()}
    originals = dict(original.named_modules())
    layers, skipped = [], {}
    for (module, is_out), _ in removed.items():
        if module not in names or isinstance(module, CHANNEL_WISE):
            continue  # norms scale each channel on its own: nothing to refit
        name = names[module]
        # a layer only the copy being pruned has (an adapter's traceable form, e.g. a packed SwiGLU's halves)
        reason = _unsupported(module) or (None if name in originals else "no such layer in the original model")
        if reason:
            skipped[name] = reason
        if reason or is_out:
            continue
        gone = removed.get((module, True), np.empty(0, dtype=np.int64))
        kept = np.setdiff1d(np.arange(channels(originals[name])), gone)
        layers.append(_Layer(name, module, originals[name], torch.as_tensor(kept, dtype=torch.long)))
    return layers, skipped


def _unsupported(module: nn.Module) -> str | None:
    if not mixes_channels(module):
        if isinstance(module, nn.Conv2d):
            return "grouped or depthwise convolution (channels are not mixed)"
        return f"{type(module).__name__} (only Linear and Conv2d are refit)"
    if isinstance(module, nn.Conv2d) and (isinstance(module.padding, str) or module.padding_mode != "zeros"):
        return f"convolution with padding {module.padding!r} / {module.padding_mode!r}"
    return None


def _original_rows(layer: _Layer, output: torch.Tensor) -> torch.Tensor:
    """The original layer's output on the channels the pruned layer kept, one row per position; must be finite."""
    if isinstance(layer.original, nn.Conv2d):
        output = output.movedim(1, -1)
    rows = output.reshape(-1, output.shape[-1]).index_select(1, layer.kept_out.to(output.device))
    _check_finite(rows, f"the original model's output of {layer.name}")
    return rows


def _input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        patches = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def reconstruct(
    pruned: nn.Module,
    original: nn.Module,
    removed: dict[tuple[nn.Module, bool], np.ndarray],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    forward: Forward,
    mode: str,
    damping: float,
    warn: bool = True,
) -> ReconstructionSummary:
    """Refit `pruned`'s layers in place toward `original`'s outputs on `batches` (see the module docstring).

    Layers are refit in the order the forward pass reaches them, so each one is fit to inputs that the
    layers before it already produce after their own refit; layers reading the same tensor (q, k, v)
    share a pass. Each pass stops the forward right after its layers.
    """
    summary = ReconstructionSummary(mode, calibration_images=sum(len(x) for x, _ in batches))
    if mode == "none":
        return summary
    layers, summary.skipped_layers = refit_targets(removed, pruned, original)
    training = original.training, pruned.training
    original.eval(), pruned.eval()
    try:
        reached = _reached_in_original(original, layers, batches[0][0][:1], forward)
        for layer in layers:
            if layer not in reached:  # its weights run as a functional call (F.linear), which no hook sees
                summary.skipped_layers[layer.name] = "the original model runs its weights without calling it"
        layers = [layer for layer in layers if layer in reached]
        levels, calls, output_bytes = _levels(pruned, layers, batches[0][0][:1], forward)
        for layer in layers:
            if layer not in calls:
                summary.skipped_layers[layer.name] = "not reached by the forward pass"
        # The original model's outputs do not change between passes: hold them all when they fit.
        held = None
        if output_bytes * summary.calibration_images <= HELD_OUTPUT_BYTES:
            held = _original_outputs(original, [layer for level in levels for layer in level], batches, forward)
        errors: list[tuple[float, float]] = []
        for level in tqdm(levels, desc="Reconstruction", leave=False, disable=not warn):
            _accumulate(pruned, original, level, calls, batches, forward, held)
            errors += _solve_level(level, mode, damping, summary)
    finally:
        original.train(training[0]), pruned.train(training[1])
    if errors:
        summary.error_before, summary.error_after = (float(np.mean(e)) for e in zip(*errors))
    if warn:
        _warn_underdetermined(summary, layers)
    if mode == "bias":  # a least-squares refit reproduces the original inputs of BatchNorm: its statistics hold
        summary.batchnorm_layers = reestimate_batchnorm(pruned, batches, forward)
    return summary


class _Stop(Exception):
    """Raised by a hook once every layer of the current pass has run: the rest of the forward is not needed."""


def _reached_in_original(
    original: nn.Module, layers: list[_Layer], probe: torch.Tensor, forward: Forward
) -> set[_Layer]:
    """The layers whose original counterpart one forward pass of the original model calls (their refit targets)."""
    reached: set[_Layer] = set()
    handles = [
        layer.original.register_forward_hook(lambda module, inputs, output, layer=layer: reached.add(layer))
        for layer in layers
    ]
    with hooks_removed(handles), torch.no_grad():
        forward(original, probe)
    return reached


def _levels(
    pruned: nn.Module, layers: list[_Layer], probe: torch.Tensor, forward: Forward
) -> tuple[list[list[_Layer]], dict[_Layer, int], int]:
    """Layers in the order one forward pass calls them, grouped by the input tensor they read; how
    many times each is called per forward; and the bytes of all their outputs for one image."""
    seen: list[tuple[_Layer, torch.Tensor]] = []  # inputs kept alive so that tensor ids stay unique
    output_bytes = 0

    def record(layer: _Layer):
        def hook(module, inputs, output):
            nonlocal output_bytes
            seen.append((layer, inputs[0]))
            output_bytes += output.numel() * output.element_size() // len(probe)

        return hook

    handles = [layer.pruned.register_forward_hook(record(layer)) for layer in layers]
    with hooks_removed(handles), torch.no_grad():
        forward(pruned, probe)
    calls: dict[_Layer, int] = {}
    levels: list[list[_Layer]] = []
    last_input = None
    for layer, tensor in seen:
        calls[layer] = calls.get(layer, 0) + 1
        if calls[layer] > 1:
            continue
        if levels and tensor is last_input:
            levels[-1].append(layer)
        else:
            levels.append([layer])
        last_input = tensor
    return levels, calls, output_bytes


def _original_outputs(
    original: nn.Module, layers: list[_Layer], batches, forward: Forward
) -> dict[_Layer, list[list[torch.Tensor]]]:
    """Every layer's original outputs (kept channels, as rows) for every batch, from one forward pass each."""
    outputs: dict[_Layer, list[list[torch.Tensor]]] = {layer: [] for layer in layers}

    def keep(layer: _Layer):
        def hook(module, inputs, output):
            outputs[layer][-1].append(_original_rows(layer, output))

        return hook

    handles = [layer.original.register_forward_hook(keep(layer)) for layer in layers]
    with hooks_removed(handles), torch.no_grad():
        for pixel_values, _ in batches:
            for layer in layers:
                outputs[layer].append([])
            forward(original, pixel_values)
    return outputs


def _accumulate(
    pruned: nn.Module,
    original: nn.Module,
    level: list[_Layer],
    calls: dict[_Layer, int],
    batches,
    forward: Forward,
    outputs: dict[_Layer, list[list[torch.Tensor]]] | None,
) -> None:
    """Statistics of one level: the original model's outputs of its layers (from `outputs` when held,
    else from a forward pass), then the pruned model's inputs."""
    held: dict[_Layer, list[torch.Tensor]] = {layer: [] for layer in level}
    remaining: dict[_Layer, int] = {}

    def count_down(layer: _Layer) -> None:
        remaining[layer] -= 1
        if not any(remaining.values()):
            raise _Stop

    def keep_output(layer: _Layer):
        def hook(module, inputs, output):
            held[layer].append(_original_rows(layer, output))
            count_down(layer)

        return hook

    def add_input(layer: _Layer):
        def hook(module, inputs):
            x = _input_rows(module, inputs[0])
            _check_finite(x, f"the pruned model's input of {layer.name}")
            if layer.stats is None:
                layer.stats = _Statistics(x.shape[1], len(layer.kept_out), x.device)
            layer.stats.add(x, held[layer].pop(0))
            count_down(layer)

        return hook

    handles = [] if outputs else [layer.original.register_forward_hook(keep_output(layer)) for layer in level]
    handles += [layer.pruned.register_forward_pre_hook(add_input(layer)) for layer in level]
    with hooks_removed(handles), torch.no_grad():
        for index, (pixel_values, _) in enumerate(batches):
            if outputs:
                held.update({layer: list(outputs[layer][index]) for layer in level})
            for model in (pruned,) if outputs else (original, pruned):
                remaining.update({layer: calls[layer] for layer in level})
                try:
                    forward(model, pixel_values)
                except _Stop:
                    pass
            for layer in level:
                held[layer].clear()
                if outputs:
                    outputs[layer][index] = []  # this level is done with them
    images = sum(len(x) for x, _ in batches)
    for layer in level:
        layer.rows_per_image = max(1, layer.stats.rows // images)


def _solve_level(
    layers: list[_Layer], mode: str, damping: float, summary: ReconstructionSummary
) -> list[tuple[float, float]]:
    """Solve and write every layer of a level; returns each layer's (error before, error after)."""
    errors = []
    for layer in layers:
        stats, w0 = layer.stats, layer.weights()
        has_bias = layer.pruned.bias is not None
        if mode == "least_squares" and stats.rows < w0.shape[0] - (0 if has_bias else 1):
            summary.underdetermined_layers.append(layer.name)
        w = _least_squares(stats, w0, damping, has_bias) if mode == "least_squares" else _bias_only(stats, w0, has_bias)
        if w is None:
            summary.skipped_layers[layer.name] = "no bias to compensate (bias mode)"
        else:
            _check_finite(w, f"the refit weights of {layer.name}")
            errors.append((stats.error(w0), stats.error(w)))
            layer.write(w)
            summary.refit_layers += 1
        layer.stats = None  # free the statistics as soon as the layer is solved
    return errors


def _warn_underdetermined(summary: ReconstructionSummary, layers: list[_Layer]) -> None:
    if not summary.underdetermined_layers:
        return
    names = set(summary.underdetermined_layers)
    needed = max(math.ceil((_inputs(layer) + 1) / layer.rows_per_image) for layer in layers if layer.name in names)
    shown = ", ".join(sorted(names)[:5]) + (" ..." if len(names) > 5 else "")
    logger.warning(
        "Reconstruction: %d layer(s) have more unknowns than calibration rows (%s); they use the damped solution, "
        "which stays near the pruned weights. Pass at least %d calibration images for a determined least-squares "
        "fit (num_calibration_batches x calibration_batch_size).",
        len(names),
        shown,
        needed,
    )


def _inputs(layer: _Layer) -> int:
    weight = layer.pruned.weight
    return weight[0].numel()


def _least_squares(stats: _Statistics, w0: torch.Tensor, damping: float, has_bias: bool) -> torch.Tensor:
    """argmin ||[X 1] W - Y||^2 + lambda ||W - W0||^2; without a bias the last row stays 0."""
    size = w0.shape[0] if has_bias else w0.shape[0] - 1
    a, c, start = stats.xtx[:size, :size], stats.xty[:size], w0[:size]
    inputs = stats.xtx.shape[0] - 1
    scale = float(a.diagonal()[:inputs].mean())
    if damping > 0 and scale > 0:
        solved = torch.linalg.solve(
            a + damping * scale * torch.eye(size, dtype=a.dtype, device=a.device), c + damping * scale * start
        )
    else:  # the exact optimum; where it is not unique, the one nearest to W0
        solved = start + torch.linalg.pinv(a, hermitian=True) @ (c - a @ start)
    return torch.cat([solved, w0[size:]])


def _bias_only(stats: _Statistics, w0: torch.Tensor, has_bias: bool) -> torch.Tensor | None:
    """Keep the weights; the bias that makes the mean output match: b = mean(Y) - mean(X) W."""
    if not has_bias:
        return None
    rows = stats.xtx[-1, -1]
    mean_x, mean_y = stats.xtx[-1, :-1] / rows, stats.xty[-1] / rows
    bias = mean_y - mean_x @ w0[:-1]
    return torch.cat([w0[:-1], bias[None]])


def reestimate_batchnorm(model: nn.Module, batches, forward: Forward) -> int:
    """Recompute every BatchNorm's running mean / variance on `batches` (cumulative average); returns their count."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    training, momenta = model.training, [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    try:
        with torch.no_grad():
            for pixel_values, _ in batches:
                forward(model, pixel_values)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.train(training)
    for norm in norms:
        _check_finite(norm.running_var, "the re-estimated running variance of a BatchNorm layer")
    return len(norms)


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(
            f"Reconstruction found NaN or inf in {what}; check the calibration data and the "
            "model's weights for non-finite values."
        )
