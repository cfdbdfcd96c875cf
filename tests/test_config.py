import pytest

from feddtl.config import ConfigError, ExperimentConfig, load_config, to_toml


def test_presets_load_and_validate():
    demo = load_config("demo")
    assert (demo.dataset, demo.num_clients, demo.shots, demo.rounds) == ("fashion-mnist", 5, 16, 20)
    assert demo.switch_round == 10  # M defaults to T/2
    assert load_config("tiny").rounds == 4


def test_paper_defaults():
    c = ExperimentConfig()
    assert (c.client.lr, c.client.batch_size, c.rounds, c.num_clients) == (1e-3, 64, 20, 5)
    assert (c.client.sft_epochs, c.client.rl_epochs, c.lora.rank) == (2, 3, 4)
    assert (c.grpo.group_size, c.grpo.sigma, c.grpo.clip_eps, c.grpo.beta) == (3, 0.1, 0.2, 0.5)


def test_overrides_are_typed_and_nested():
    c = load_config("tiny", ["grpo.sigma=0.03", "rounds=6", "shots=none", "client.switch_round=3", "dataset=mnist5k"])
    assert c.grpo.sigma == 0.03 and c.rounds == 6 and c.shots is None and c.switch_round == 3
    assert c.dataset == "mnist5k"


@pytest.mark.parametrize(
    "override, message",
    [
        ("nosuchkey=1", "unknown config key 'nosuchkey'"),
        ("grpo.nosuch=1", "unknown config key 'grpo.nosuch'"),
        ("rounds=abc", "rounds: expected int"),
        ("alpha=0", "alpha must be > 0"),
        ("grpo.group_size=1", "grpo.group_size must be >= 2"),
        ("partition=random", "partition='random' is not allowed; allowed: 'iid', 'dirichlet', 'pathological'"),
        ("method=fedsomething", "method='fedsomething' is unknown; allowed:"),
        ("backbone=resnet", "backbone='resnet' is unknown"),
        ("grpo.noise_space=pixels", "grpo.noise_space='pixels' is not allowed"),
        ("client.switch_round=99", "client.switch_round must be <= rounds"),
        ("grpo=3", "grpo is a section"),
        ("client_fraction=1.5", "client_fraction must be in (0, 1]"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert message in str(err.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="presets: .*demo.*tiny"):
        load_config("nope")


def test_resolved_toml_round_trips(tmp_path):
    c = load_config("demo", ["grpo.sigma=0.05", "shots=none", "lora.image_start_block=12"])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(c))
    assert load_config(str(path)) == c


def test_central_dp_refuses_a_robust_aggregation_rule():
    with pytest.raises(ConfigError, match="server.aggregation='median' is not allowed with it; allowed: 'fedavg'"):
        load_config("tiny", ["privacy.lora_epsilon=4", "privacy.lora_clip_norm=0.2", "server.aggregation=median"])
