"""Parameter loading and validation: every bad input fails at once, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fcr.config import SCHEMA, ConfigError, from_namespace, load_params, load_yaml, merge, validate

PARAMS_DIR = Path(__file__).resolve().parents[1] / "params"


def test_defaults_are_valid() -> None:
    params = validate({})
    assert set(params) == set(SCHEMA)
    assert params["stride"] == SCHEMA["stride"].default


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"strid": 5}, r"unknown parameter 'strid' \(did you mean 'stride'\?\)"),
        ({"learning_rate": "1e-4"}, r"'learning_rate'.*YAML 1.1.*1.0e-4"),
        ({"learning_rate": "fast"}, r"'learning_rate': expected float, got str"),
        ({"stride": 2.5}, r"'stride': expected int"),
        ({"stride": True}, r"'stride': expected int, got bool"),
        ({"parallel_decoding": "yes"}, r"'parallel_decoding': expected bool"),
        ({"stride": 0}, r"'stride': must be >= 1"),
        ({"strides": [5, 0]}, r"'strides': every entry must be >= 1"),
        ({"strides": []}, r"'strides': must not be empty"),
        ({"delta_max": 0}, r"'delta_max': must be >= 1"),
        ({"lambda_fcr": -0.1}, r"'lambda_fcr': must be >= 0"),
        ({"guidance_scale": 0.5}, r"'guidance_scale': must be >= 1"),
        ({"scheduler": "pndm"}, r"'scheduler': allowed \['ddim', 'dpmsolver\+\+', 'euler'\]"),
        ({"feature_group": "shallow"}, r"'feature_group': allowed"),
        ({"key_schedule": "fast"}, r"'key_schedule': allowed 'uniform', '50ls'"),
        ({"key_schedule": [1, 5]}, r"'key_schedule': must start with key step 0"),
        ({"key_schedule": [0, 5, 3]}, r"'key_schedule': key steps must be strictly increasing"),
        ({"key_schedule": [0, 5, 5]}, r"'key_schedule': key steps must be strictly increasing"),
        ({"key_schedule": [0, 10, 60]}, r"'key_schedule': key steps must lie in \[0, num_inference_steps=50\)"),
        ({"key_schedule": []}, r"'key_schedule': an explicit list must not be empty"),
        ({"prior_noise_threshold": 1.5}, r"'prior_noise_threshold': must be within \[0, 1\]"),
        ({"learning_rate": float("nan")}, r"'learning_rate': must be a finite number"),
    ],
)
def test_bad_parameters_fail_with_the_key(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(params)


def test_yaml_trap_from_a_real_file(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("learning_rate: 1e-4\n")
    assert load_yaml(f) == {"learning_rate": "1e-4"}  # YAML 1.1 really reads it as a string
    with pytest.raises(ConfigError, match="YAML 1.1"):
        load_params(f)
    f.write_text("learning_rate: 1.0e-4\n")
    assert load_params(f)["learning_rate"] == pytest.approx(1e-4)


def test_merge_is_shallow_and_ordered(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("stride: 5\nstrides: [1, 5]\n")
    b.write_text("stride: 10\n")
    params = load_params(a, b, overrides={"seed": 3})
    assert (params["stride"], params["strides"], params["seed"]) == (10, [1, 5], 3)
    assert merge({"x": 1}, {"x": 2, "y": 3}) == {"x": 2, "y": 3}


def test_nested_and_non_mapping_yaml_fail(tmp_path: Path) -> None:
    f = tmp_path / "nested.yaml"
    f.write_text("training:\n  learning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match="flat keys"):
        load_yaml(f)
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_unsafe_yaml_is_not_executed(tmp_path: Path) -> None:
    f = tmp_path / "evil.yaml"
    f.write_text("seed: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(Exception, match="constructor|could not determine"):
        load_yaml(f)


def test_from_namespace_catches_injected_unknown_keys() -> None:
    before = {"fcr", "np"}
    namespace = {"fcr": object(), "np": object(), "_hidden": 1, "stride": 10, "seed": 2}
    opts = from_namespace(namespace, before)
    assert opts.sampling.stride == 10 and opts.run.seed == 2
    namespace["stirde"] = 3  # a typo papermill would only warn about
    with pytest.raises(ConfigError, match="unknown parameter 'stirde'"):
        from_namespace(namespace, before)


@pytest.mark.parametrize("path", sorted(PARAMS_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(PARAMS_DIR)))
def test_shipped_parameter_files_are_valid(path: Path) -> None:
    if path.name == "experiments.yaml":
        pytest.skip("the experiments manifest is not a flat parameter file")
    if path.name.startswith("inpainting_"):  # the in-painting runner's own parameters, checked by its loader
        from fcr.experiments.inpainting import InpaintingDemo

        assert InpaintingDemo.from_yaml(path).runs()
        return
    validate(load_yaml(path))
