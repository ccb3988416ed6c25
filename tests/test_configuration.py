import pytest

from optimum_isoprune import ConfigurationError, IsomorphicPruningConfig, IsoPruneError


def test_round_trip_through_json(tmp_path):
    config = IsomorphicPruningConfig(target_macs=1.2e9, importance="magnitude", ignored_modules=["classifier"])
    config.save_pretrained(tmp_path)
    assert IsomorphicPruningConfig.from_pretrained(tmp_path) == config
    assert IsomorphicPruningConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one"),
        ({"target_macs": 1e9, "pruning_ratio": 0.5}, "exactly one"),
        ({"pruning_ratio": -0.1}, "pruning_ratio"),
        ({"pruning_ratio": 1.0}, "pruning_ratio"),
        ({"target_macs": -5}, "target_macs"),
        ({"pruning_ratio": 0.5, "importance": "hessian"}, "importance"),
        ({"pruning_ratio": 0.5, "grouping": "local"}, "grouping"),
        ({"pruning_ratio": 0.5, "round_to": 0}, "round_to"),
        ({"pruning_ratio": 0.5, "head_pruning_ratio": 1.5}, "head_pruning_ratio"),
        ({"pruning_ratio": 0.5, "seed": 2**70}, r"seed must be in \[0, 2\*\*32\)"),  # torch: "Overflow when unpacking"
        ({"pruning_ratio": 0.5, "seed": -1}, "seed"),  # datasets' shuffle: "expected non-negative integer"
        ({"pruning_ratio": "0.5"}, "finite number"),
    ],
)
def test_bad_values_are_rejected_with_the_field_name(kwargs, message):
    with pytest.raises(ConfigurationError, match=message) as info:
        IsomorphicPruningConfig(**kwargs)
    assert isinstance(info.value, (IsoPruneError, ValueError, TypeError))  # catchable as the built-in errors too


def test_unknown_fields_are_named(tmp_path):
    with pytest.raises(ValueError, match="ratio_typo"):
        IsomorphicPruningConfig.from_dict({"pruning_ratio": 0.5, "ratio_typo": 1})
    with pytest.raises(ConfigurationError, match="'pruning_rate': did you mean 'pruning_ratio'"):
        IsomorphicPruningConfig.from_dict({"pruning_rate": 0.5})
    with pytest.raises(ConfigurationError, match="takes a mapping .* got list"):
        IsomorphicPruningConfig.from_dict([("pruning_ratio", 0.5)])


def test_allocate_policy_warns_that_it_is_deprecated_and_still_loads(tmp_path):
    with pytest.warns(FutureWarning, match="'allocate' is deprecated"):
        config = IsomorphicPruningConfig(target_macs=1e9, budget_policy="allocate")
    config.save_pretrained(tmp_path)
    with pytest.warns(FutureWarning, match="'allocate' is deprecated"):
        assert IsomorphicPruningConfig.from_pretrained(tmp_path) == config


def test_a_damaged_file_is_named(tmp_path):
    # json's own error gave a line and column but not the file
    (tmp_path / "pruning_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"pruning_config.json is not valid JSON \(Expecting property name"):
        IsomorphicPruningConfig.from_pretrained(tmp_path)
    (tmp_path / "pruning_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigurationError, match="takes a mapping"):
        IsomorphicPruningConfig.from_pretrained(tmp_path)
