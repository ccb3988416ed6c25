"""What LeViT adds to the support matrix (tests/models.py VARIANT_BUILDERS "levit", "levit_teacher";
TIMM_FAMILY_BUILDERS "timm_levit", "timm_levit_plain"): q / k / v laid out head by head in one Linear + BatchNorm
(keys narrower than values), attention biases per head, subsampling attention between stages with its own queries.
Heads leave whole, with every row that belongs to them."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainerState

from models import build, inputs, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig

NAMES = ["levit", "levit_teacher", "timm_levit", "timm_levit_plain"]
# transformers' and timm's names: (q / k / v, subsample's k / v, subsample's queries, projection, BatchNorm, heads)
PARTS = {
    "transformers": (
        "queries_keys_values",
        "keys_values",
        "queries",
        "projection",
        "batch_norm",
        "num_attention_heads",
    ),
    "timm": ("qkv", "kv", "q.ln", "proj.ln", "bn", "num_heads"),
}


def _parts(module: torch.nn.Module) -> tuple[str, ...]:
    return PARTS["timm" if type(module).__module__.startswith("timm.") else "transformers"]


def _value_dim(attention: torch.nn.Module) -> int:
    return int(getattr(attention, "val_dim", None) or attention.attention_ratio * attention.key_dim)


def _attentions(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "attention_biases")}


def _kept_heads(original: torch.nn.Module, pruned: torch.nn.Module) -> list[int]:
    """Original index of each kept head, found by its (distinct, random) attention-bias row."""
    rows = original.attention_biases.detach()
    kept = []
    for row in pruned.attention_biases.detach():
        matches = [h for h in range(rows.shape[0]) if torch.equal(rows[h], row)]
        assert len(matches) == 1
        kept.append(matches[0])
    assert kept == sorted(kept)
    return kept


def _rows(heads: list[int], per_head: int) -> torch.Tensor:
    return (torch.tensor(heads)[:, None] * per_head + torch.arange(per_head)).flatten()


def _assert_rows(pruned_pair: torch.nn.Module, original_pair: torch.nn.Module, rows: torch.Tensor, norm: str) -> None:
    """A Linear + BatchNorm1d pair keeps exactly the original's `rows`."""
    assert torch.equal(pruned_pair.linear.weight, original_pair.linear.weight[rows])
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(getattr(pruned_pair, norm), name), getattr(getattr(original_pair, norm), name)[rows])


@pytest.fixture(scope="module", params=NAMES)
def heads_only(request):
    """Half the heads pruned, nothing else (no calibration data: no reconstruction)."""
    model = build(request.param)
    config = IsomorphicPruningConfig(pruning_ratio=0.0, head_pruning_ratio=0.5, importance="magnitude")
    return model, IsomorphicPruner(model).prune(config)


def test_heads_leave_whole_with_their_rows(heads_only):
    model, pruned = heads_only
    originals, prunings = _attentions(model), _attentions(pruned)
    assert originals.keys() == prunings.keys()
    qkv, kv, queries, projection, norm, heads = _parts(model)
    assert sum(getattr(p, heads) for p in prunings.values()) < sum(getattr(o, heads) for o in originals.values())
    for name, original in originals.items():
        attention = prunings[name]
        kept = _kept_heads(original, attention)
        key_dim, value_dim = original.key_dim, _value_dim(original)
        assert attention.key_dim == key_dim and getattr(attention, heads) == len(kept) >= 1
        if hasattr(original, kv):  # subsampling: keys and values per head, queries apart
            _assert_rows(
                attention.get_submodule(kv), original.get_submodule(kv), _rows(kept, key_dim + value_dim), norm
            )
            _assert_rows(attention.get_submodule(queries), original.get_submodule(queries), _rows(kept, key_dim), norm)
        else:
            rows = _rows(kept, 2 * key_dim + value_dim)
            _assert_rows(attention.get_submodule(qkv), original.get_submodule(qkv), rows, norm)
        out = attention.get_submodule(projection).linear
        stock = original.get_submodule(projection).linear
        assert torch.equal(out.weight, stock.weight[:, _rows(kept, value_dim)])
        assert out.in_features == len(kept) * value_dim
        assert out.out_features == stock.out_features  # the stage width (the residual it writes) is kept


def test_removed_heads_are_the_heads_whose_output_is_zeroed(heads_only):
    """The pruned model computes what the original computes with the removed heads' projection columns zeroed
    (in eval mode: the attention-bias caches hold the kept heads only)."""
    model, pruned = heads_only
    masked = copy.deepcopy(model)
    projection, heads = _parts(model)[3], _parts(model)[5]
    for name, attention in _attentions(masked).items():
        kept = _kept_heads(attention, _attentions(pruned)[name])
        removed = [h for h in range(getattr(attention, heads)) if h not in kept]
        if removed:
            with torch.no_grad():
                attention.get_submodule(projection).linear.weight[:, _rows(removed, _value_dim(attention))] = 0
    pruner_input = inputs(IsomorphicPruner(model))
    pruned.eval()
    for _ in range(2):  # the second call reads the bias caches
        torch.testing.assert_close(logits(pruned, pruner_input), logits(masked, pruner_input), rtol=1e-5, atol=1e-5)


def test_checkpoint_summary_lists_every_attentions_heads(heads_only, tmp_path):
    """config.json's readable summary names the heads of every attention, the subsampling ones included."""
    import json

    from optimum_isoprune import save_pruned_model

    _, pruned = heads_only
    save_pruned_model(pruned, tmp_path)
    summary = json.loads((tmp_path / "config.json").read_text())
    heads = [int(getattr(m, _parts(m)[-1])) for m in _attentions(pruned).values()]
    assert summary["layer_num_heads"] == heads and len(heads) == 5


def test_model_with_filled_bias_caches_is_pruned_and_left_as_it_is():
    """An eval forward with autograd on caches gathered biases that `copy.deepcopy` refuses; the pruner copies the
    model without them and leaves the user's caches alone."""
    model = build("timm_levit")
    x = inputs(IsomorphicPruner(model))
    expected = logits(model, x)  # fills the caches (not under no_grad)
    caches = {n: dict(m.attention_bias_cache) for n, m in _attentions(model).items()}
    assert all(caches.values())
    pruned = IsomorphicPruner(model).prune(IsomorphicPruningConfig(pruning_ratio=0.0, importance="magnitude"))
    assert torch.equal(logits(pruned, x), expected)
    for name, attention in _attentions(model).items():
        assert attention.attention_bias_cache.keys() == caches[name].keys()


def test_ema_average_of_a_pruned_levit_with_filled_bias_caches():
    """The EMA callback copies the student through its adapter: a pruned LeViT that ran an eval forward with autograd
    on (filled caches, which `copy.deepcopy` refuses) still gets its average."""
    from optimum_isoprune.ema import EMACallback

    model = build("levit")
    x = inputs(IsomorphicPruner(model))
    pruned = IsomorphicPruner(model).prune(IsomorphicPruningConfig(pruning_ratio=0.3, importance="magnitude"))
    logits(pruned.eval(), x)  # fills the caches
    with pytest.raises(RuntimeError):
        copy.deepcopy(pruned)
    callback = EMACallback(decay=0.9)
    callback.on_train_begin(None, TrainerState(), None, model=pruned)
    averaged, live = callback.ema_model.state_dict(), pruned.state_dict()
    assert averaged.keys() == live.keys() and all(torch.equal(averaged[k], live[k]) for k in live)
    assert logits(callback.ema_model, x).shape == (len(x), 10)


def test_mlp_hidden_channels_are_pruned_and_stage_widths_kept():
    model = build("levit")
    pruned = IsomorphicPruner(model).prune(IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude"))
    hidden = [m.linear_up.linear.out_features for m in pruned.modules() if hasattr(m, "linear_up")]
    stock = [m.linear_up.linear.out_features for m in model.modules() if hasattr(m, "linear_up")]
    assert sum(hidden) < sum(stock)
    assert pruned.config.layer_intermediate_sizes == hidden
    assert pruned.config.layer_num_heads == [m.num_attention_heads for m in _attentions(pruned).values()]
    assert list(pruned.config.hidden_sizes) == list(model.config.hidden_sizes)
    writers = [m.linear.out_features for n, m in pruned.named_modules() if n.endswith(("projection", "linear_down"))]
    assert writers == [
        m.linear.out_features for n, m in model.named_modules() if n.endswith(("projection", "linear_down"))
    ]


def test_taylor_importance_over_several_batches():
    """Calibration runs the copy in eval mode, one backward per batch: LeViT's cached biases must not carry the
    first batch's graph into the second."""
    model = build("levit")
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    config = IsomorphicPruningConfig(pruning_ratio=0.5, calibration_batch_size=4, num_calibration_batches=4)
    pruner = IsomorphicPruner(model)
    pruned = pruner.prune(config, calibration_dataset=x)
    assert pruner.report.macs_after < pruner.report.macs_before
    assert torch.isfinite(logits(pruned, x[:2])).all()
