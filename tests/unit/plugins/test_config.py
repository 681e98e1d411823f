"""Every kind of bad config stops with one message naming the field and what is allowed."""

import json

import pytest
from pydantic import ValidationError

from afterburner.plugins.config import (
    ENV_VAR,
    AfterburnerConfig,
    ConfigError,
    from_additional_config,
    from_env,
    parse_config,
)


def test_defaults_when_absent():
    assert from_additional_config(None) == AfterburnerConfig()
    assert from_additional_config({"other_plugin": {"x": 1}}) == AfterburnerConfig()
    assert from_env({}) == AfterburnerConfig()


def test_values_reach_the_typed_config():
    config = from_additional_config({"afterburner": {"attention": {"sparse": {"budget_ratio": 0.125}}}})
    assert config.attention.sparse.budget_ratio == 0.125
    assert config.attention.sparse.sink_pages == 1  # untouched defaults stay


@pytest.mark.parametrize(("sparse", "pages"), [
    ({}, 8),  # the default 1/4 budget: 8-token bounds (the passkey goal at 1/4)
    ({"budget_ratio": 0.5}, 8),
    ({"budget_ratio": 0.125}, 16),  # below 1/4 finer bounds bought nothing and cost speed
    ({"budget_ratio": 0.25, "token_budget": 512}, 16),  # an absolute budget: no ratio to go by
    ({"budget_ratio": 0.125, "page_size": 8}, 8),  # a page size that is set wins
    ({"page_size": 32}, 32),
])
def test_the_page_size_in_force_follows_the_budget_unless_set(sparse, pages):
    config = from_additional_config({"afterburner": {"attention": {"sparse": sparse}}})
    assert config.attention.sparse.page_tokens == pages


def test_local_linear_is_a_method_with_its_settings():
    config = from_additional_config({"afterburner": {"attention": {
        "method": "local_linear", "local_linear": {"lam": 1e9, "jacobi": True}}}})
    settings = config.attention.local_linear
    assert config.attention.method == "local_linear"
    assert (settings.lam, settings.cg_iters, settings.jacobi) == (1e9, 32, True)


@pytest.mark.parametrize(
    "section, field, allowed",
    [
        ({"atention": {}}, "afterburner.atention", "allowed keys here: attention, enabled"),
        ({"attention": {"sparse": {"budjet": 1}}}, "afterburner.attention.sparse.budjet", "budget_ratio"),
        ({"enabled": "sometimes"}, "afterburner.enabled", "valid boolean"),
        ({"attention": {"sparse": {"sink_pages": "two"}}}, "afterburner.attention.sparse.sink_pages", "integer"),
        ({"attention": {"sparse": {"budget_ratio": 1.5}}}, "afterburner.attention.sparse.budget_ratio",
         "less than or equal to 1"),
        ({"attention": {"sparse": {"budget_ratio": 0}}}, "afterburner.attention.sparse.budget_ratio", "greater than 0"),
        ({"attention": {"squeezed": {"threshold_quantile": 1}}}, "afterburner.attention.squeezed.threshold_quantile",
         "less than 1"),
        ({"attention": {"method": "flash"}}, "afterburner.attention.method",
         "'dense', 'sparse', 'squeezed', 'local_linear' or 'speckv'"),
        ({"attention": {"local_linear": {"lam": 0}}}, "afterburner.attention.local_linear.lam", "greater than 0"),
        ({"attention": {"local_linear": {"lam": float("inf")}}}, "afterburner.attention.local_linear.lam",
         "finite number"),
        ({"attention": {"local_linear": {"cg_iters": 0}}}, "afterburner.attention.local_linear.cg_iters",
         "greater than or equal to 1"),
        ({"attention": {"local_linear": {"jacobi": "sometimes"}}}, "afterburner.attention.local_linear.jacobi",
         "valid boolean"),
        ({"attention": {"local_linear": {"lambda": 2.0}}}, "afterburner.attention.local_linear.lambda",
         "allowed keys here: cg_iters, direct_max_queries, jacobi, lam"),
    ],
)
def test_bad_values_name_field_and_allowed(section, field, allowed):
    with pytest.raises(ConfigError) as err:
        from_additional_config({"afterburner": section})
    message = str(err.value)
    assert field in message and allowed in message
    assert "--additional-config" in message and "\n" not in message


def test_section_must_be_an_object():
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        from_additional_config({"afterburner": [1, 2]})


def test_env_json_text_and_wrapped_form():
    assert from_env({ENV_VAR: '{"enabled": false}'}).enabled is False
    assert from_env({ENV_VAR: '{"afterburner": {"enabled": false}}'}).enabled is False


def test_env_malformed_json():
    with pytest.raises(ConfigError, match=r"AFTERBURNER_CONFIG \(JSON text\) is not valid JSON: .*line 1 column"):
        from_env({ENV_VAR: '{"enabled": false'})


def test_env_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="names a file that does not exist: .*nope.yaml"):
        from_env({ENV_VAR: str(tmp_path / "nope.yaml")})


def test_env_yaml_and_json_files(tmp_path):
    yaml_file = tmp_path / "ab.yaml"
    yaml_file.write_text("attention:\n  sparse:\n    recent_pages: 4\n")
    assert from_env({ENV_VAR: str(yaml_file)}).attention.sparse.recent_pages == 4
    json_file = tmp_path / "ab.json"
    json_file.write_text(json.dumps({"afterburner": {"attention": {"sparse": {"recent_pages": 5}}}}))
    assert from_env({ENV_VAR: str(json_file)}).attention.sparse.recent_pages == 5


def test_env_bad_yaml_and_bad_value_in_file(tmp_path):
    bad_yaml = tmp_path / "bad.yml"
    bad_yaml.write_text("attention: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        from_env({ENV_VAR: str(bad_yaml)})
    bad_value = tmp_path / "bad.json"
    bad_value.write_text('{"attention": {"sparse": {"recent_pages": -1}}}')
    with pytest.raises(ConfigError, match=r"file .*bad.json: afterburner.attention.sparse.recent_pages"):
        from_env({ENV_VAR: str(bad_value)})


def test_config_is_frozen():
    config = AfterburnerConfig()
    with pytest.raises(ValidationError, match="frozen"):
        config.enabled = False


def test_vllm_falls_back_to_the_env_variable_only_without_an_afterburner_section():
    environ = {ENV_VAR: '{"attention": {"sparse": {"sink_pages": 7}}}'}
    assert from_additional_config({}, environ).attention.sparse.sink_pages == 7
    assert from_additional_config({"afterburner": {}}, environ).attention.sparse.sink_pages == 1
    with pytest.raises(ConfigError, match="AFTERBURNER_CONFIG"):
        from_additional_config(None, {ENV_VAR: '{"attention": 1}'})


def test_the_former_medusa_section_is_read_as_speculative():
    config = parse_config({"medusa": {"tree": "chain", "acceptance": "typical"}}, source="test")
    assert config.speculative.tree == "chain" and config.speculative.acceptance == "typical"
    with pytest.raises(ConfigError, match="give 'speculative' only"):
        parse_config({"medusa": {"tree": "chain"}, "speculative": {"tree": "paper"}}, source="test")


def test_text_that_is_not_json_and_huge_values_are_one_short_line(tmp_path):
    with pytest.raises(ConfigError, match="--additional-config must be a JSON object") as caught:
        from_additional_config("attention.method=sparse")
    assert "\n" not in str(caught.value)
    huge = "x" * 5_000_000
    with pytest.raises(ConfigError) as caught:
        from_additional_config({"afterburner": {"attention": {"method": huge}}})
    assert len(str(caught.value)) < 1_000 and "5000002 characters" in str(caught.value)
    with pytest.raises(ConfigError, match="names a directory, not a file"):
        from_env({ENV_VAR: str(tmp_path)})
