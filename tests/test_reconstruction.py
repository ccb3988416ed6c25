"""Closed-form reconstruction after surgery: exact on a toy model, safe and effective on every family."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from torch import nn

from models import BUILDERS, build, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.checkpoint import load_pruned_model
from optimum_isoprune.counting import count_macs
from optimum_isoprune.errors import NonFiniteError
from optimum_isoprune.reconstruction import ReconstructionSummary, reconstruct
from optimum_isoprune.report import PruningReport

SMALL_INPUT = {"timm_resnet": 32}  # resnet18's default 224 px would make the refit of its big convs slow


def _images(pruner: IsomorphicPruner, count: int, seed: int = 1, size: int | None = None) -> torch.Tensor:
    size = size or pruner.adapter.image_size()
    return torch.randn(count, pruner.adapter.num_channels(), size, size, generator=torch.Generator().manual_seed(seed))


def _toy(removed_hidden: list[int]) -> tuple[nn.Sequential, nn.Sequential, dict, torch.Tensor]:
    """An MLP and a copy with hidden neurons removed from fc1's outputs and fc2's inputs."""
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
    pruned = copy.deepcopy(original)
    kept = [i for i in range(10) if i not in removed_hidden]
    with torch.no_grad():
        fc1, fc2 = nn.Linear(6, len(kept)), nn.Linear(len(kept), 4)
        fc1.weight.copy_(original[0].weight[kept]), fc1.bias.copy_(original[0].bias[kept])
        fc2.weight.copy_(original[2].weight[:, kept]), fc2.bias.copy_(original[2].bias)
    pruned[0], pruned[2] = fc1, fc2
    removed = {(fc1, True): np.array(removed_hidden), (fc2, False): np.array(removed_hidden)}
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(2))
    return original, pruned, removed, x


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def test_toy_linear_model_reaches_the_least_squares_optimum_exactly():
    original, pruned, removed, x = _toy([1, 4, 7])
    batches = [(chunk, None) for chunk in x.split(64)]
    summary = reconstruct(pruned, original, removed, batches, _forward, "least_squares", damping=0.0)
    hidden = torch.tanh(pruned[0](x)).detach().double()
    design = torch.cat([hidden, torch.ones(len(x), 1, dtype=torch.float64)], 1).numpy()
    target = original(x).double().detach().numpy()
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)
    np.testing.assert_allclose(pruned[2].weight.detach().numpy(), solution[:-1].T, atol=1e-5)
    np.testing.assert_allclose(pruned[2].bias.detach().numpy(), solution[-1], atol=1e-5)
    assert summary.refit_layers == 1 and summary.error_after < summary.error_before


def test_a_layer_the_original_runs_without_calling_it_is_reported_and_left_as_it_is():
    """No hook sees a layer whose weights the original runs as F.linear: it has no reference output to be refit to."""
    original, pruned, removed, x = _toy([1, 4, 7])
    before = pruned[2].weight.clone()

    def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if model is pruned:
            return model(x)
        return nn.functional.linear(torch.tanh(model[0](x)), model[2].weight, model[2].bias)

    summary = reconstruct(pruned, original, removed, [(x, None)], forward, "least_squares", damping=0.01)
    assert summary.skipped_layers == {"2": "the original model runs its weights without calling it"}
    assert summary.refit_layers == 0 and torch.equal(pruned[2].weight, before)


def test_bias_mode_matches_the_mean_output_and_keeps_the_weights():
    original, pruned, removed, x = _toy([0, 2, 3, 9])
    weight = pruned[2].weight.detach().clone()
    reconstruct(pruned, original, removed, [(x, None)], _forward, "bias", damping=0.0)
    assert torch.equal(pruned[2].weight, weight)
    torch.testing.assert_close(pruned(x).mean(0), original(x).mean(0), atol=1e-5, rtol=0)


def test_damping_pulls_toward_the_pruned_weights():
    original, pruned, removed, x = _toy([1, 4, 7])
    start = pruned[2].weight.detach().clone()
    exact, damped = copy.deepcopy(pruned), copy.deepcopy(pruned)
    reconstruct(
        exact,
        original,
        {(exact[0], True): removed[(pruned[0], True)], (exact[2], False): removed[(pruned[2], False)]},
        [(x, None)],
        _forward,
        "least_squares",
        damping=0.0,
    )
    reconstruct(
        damped,
        original,
        {(damped[0], True): removed[(pruned[0], True)], (damped[2], False): removed[(pruned[2], False)]},
        [(x, None)],
        _forward,
        "least_squares",
        damping=10.0,
    )
    assert (damped[2].weight - start).norm() < (exact[2].weight - start).norm()


def test_ratio_zero_with_reconstruction_leaves_logits_unchanged():
    model = build("vit")
    pruner = IsomorphicPruner(model)
    x = _images(pruner, 16)
    pruned = pruner.prune(
        IsomorphicPruningConfig(pruning_ratio=0.0, reconstruction="least_squares"), calibration_dataset=x
    )
    assert torch.equal(logits(pruned, x), logits(model, x))
    assert pruner.report.reconstruction["refit_layers"] == 0


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_row_refits_keeps_macs_and_lowers_the_layer_error(name):
    model = build(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = IsomorphicPruner(model)
    size = SMALL_INPUT.get(name)
    x = _images(pruner, 32, size=size)
    refit = pruner.prune(
        IsomorphicPruningConfig(
            pruning_ratio=0.5,
            importance="magnitude",
            calibration_batch_size=16,
            num_calibration_batches=2,
            reconstruction="least_squares",
            image_size=size,
        ),
        calibration_dataset=x,
    )
    summary = pruner.report.reconstruction
    assert summary["mode"] == "least_squares" and summary["refit_layers"] > 0
    assert summary["error_after"] < summary["error_before"]
    assert count_macs(refit, image_size=size) == pruner.report.macs_after  # weights change, shapes do not
    assert "reconstruction" in pruner.report.timings
    assert all(torch.isfinite(p).all() for p in refit.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()), "the original model changed"


def test_transformer_logits_move_closer_to_the_original():
    """End to end on the calibration images: the refit model's logits are nearer the original's."""
    for name in ("vit", "deit_teacher", "convnext", "timm_vit", "timm_swin"):
        model = build(name)
        errors = {}
        for mode in ("none", "least_squares"):
            pruner = IsomorphicPruner(model)
            x = _images(pruner, 64)
            pruned = pruner.prune(
                IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude", reconstruction=mode),
                calibration_dataset=x,
            )
            with torch.no_grad():
                reference, output = logits(model, x), logits(pruned, x)
            errors[mode] = float((output - reference).square().mean() / reference.square().mean())
        assert errors["least_squares"] < errors["none"], (name, errors)


@pytest.mark.parametrize("name", ["vit", "resnet", "timm_swin"])
def test_save_load_after_reconstruction_is_bit_identical(tmp_path, name):
    model = build(name)
    pruner = IsomorphicPruner(model)
    x = _images(pruner, 16)
    pruned = pruner.prune(
        IsomorphicPruningConfig(pruning_ratio=0.5, reconstruction="least_squares"), calibration_dataset=x
    )
    pruner.save_pretrained(tmp_path / "out")
    loaded = load_pruned_model(tmp_path / "out")
    assert torch.equal(logits(loaded, x), logits(pruned, x))
    report = PruningReport.from_pretrained(tmp_path / "out")
    assert report.reconstruction == pruner.report.reconstruction
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Reconstruction after pruning" in card and "layers refit" in card


def test_too_few_images_warns_with_the_number_needed_and_stays_finite(caplog):
    model = build("resnet")
    pruner = IsomorphicPruner(model)
    x = _images(pruner, 4, size=32)
    with caplog.at_level(logging.WARNING, logger="optimum_isoprune"):
        pruned = pruner.prune(
            IsomorphicPruningConfig(
                pruning_ratio=0.5,
                reconstruction="least_squares",
                image_size=32,
                calibration_batch_size=4,
                num_calibration_batches=1,
            ),
            calibration_dataset=x,
        )
    message = " ".join(r.getMessage() for r in caplog.records if "unknowns" in r.getMessage())
    assert "Pass at least" in message and "calibration images" in message
    needed = int(message.split("Pass at least ")[1].split()[0])
    assert needed > 4
    assert pruner.report.reconstruction["underdetermined_layers"]
    assert all(torch.isfinite(p).all() for p in pruned.parameters())


def test_exact_solve_of_an_underdetermined_layer_stays_finite():
    original, pruned, removed, x = _toy([1, 4, 7])
    reconstruct(pruned, original, removed, [(x[:3], None)], _forward, "least_squares", damping=0.0)
    assert all(torch.isfinite(p).all() for p in pruned.parameters())


def test_non_finite_calibration_data_stops_before_any_weight_is_written():
    original, pruned, removed, x = _toy([1, 4, 7])
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    x[5, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        reconstruct(pruned, original, removed, [(x, None)], _forward, "least_squares", damping=0.01)
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in before.items())


def test_without_calibration_data_reconstruction_is_skipped_with_a_warning(caplog):
    pruner = IsomorphicPruner(build("vit"))
    with caplog.at_level(logging.WARNING, logger="optimum_isoprune"):
        pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude", reconstruction="least_squares"))
    assert any("reconstruction='least_squares' needs it" in r.getMessage() for r in caplog.records)
    assert pruner.report.reconstruction["mode"] == "none"


def test_depthwise_convolutions_are_reported_not_skipped_silently():
    model = build("convnext")
    pruner = IsomorphicPruner(model)
    pruner.prune(
        IsomorphicPruningConfig(pruning_ratio=0.5, reconstruction="least_squares"),
        calibration_dataset=_images(pruner, 16),
    )
    skipped = pruner.report.reconstruction["skipped_layers"]
    assert skipped and all("depthwise" in reason for reason in skipped.values())
    assert "not refit" in ReconstructionSummary(**pruner.report.reconstruction).describe()
    assert "reconstruction:" in pruner.report.summary()


def test_config_rejects_unknown_mode_and_negative_damping():
    with pytest.raises(ValueError, match="reconstruction"):
        IsomorphicPruningConfig(pruning_ratio=0.5, reconstruction="lsq")
    with pytest.raises(ValueError, match="reconstruction_damping"):
        IsomorphicPruningConfig(pruning_ratio=0.5, reconstruction_damping=-1.0)
