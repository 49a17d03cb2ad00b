import os

import pytest

from opdx.config import Config, ConfigError, all_keys, load_config


def test_defaults_are_the_demo():
    cfg = load_config()
    assert cfg.model.source == "demo" and cfg.loss.kind == "gjsd" and cfg.data.train.endswith("teacher_train.jsonl")
    assert "loss.beta" in all_keys() and "deepspeed.zero_stage" in all_keys()
    demo = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "demo.yaml")
    assert load_config(demo).to_dict() == cfg.to_dict()  # `torchrun -m opdx.train` == the demo config


def test_yaml_then_overrides_typed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("loss:\n  kind: gjsd\n  beta: 0.25\ntrain:\n  max_steps: 3\n")
    cfg = load_config(str(p), ["loss.beta=1", "train.max_steps=7", "train.resume=true", "optim.betas=[0.8,0.9]",
                               "model.lora_target_modules=q_proj,v_proj", "train.output_dir=/tmp/x"])
    assert cfg.loss.kind == "gjsd"
    assert cfg.loss.beta == 1.0 and isinstance(cfg.loss.beta, float)
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.resume is True
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("override,fragment", [
    ("loss.betta=1.0", "did you mean 'loss.beta'"),
    ("los.beta=1.0", "did you mean 'loss.beta'"),
    ("train.max_step=3", "did you mean 'train.max_steps'"),
    ("beta=1", "did you mean 'loss.beta'"),
    ("deepspeed.zero=3", "did you mean 'deepspeed.zero_stage'"),
])
def test_unknown_key_suggests_closest(override, fragment):
    with pytest.raises(ConfigError, match="unknown config key") as exc:
        load_config(None, [override])
    assert fragment in str(exc.value)


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(str(p))


@pytest.mark.parametrize("override,fragment", [
    ("train.max_steps=abc", "train.max_steps must be of type int"),
    ("train.max_steps=1.5", "must be of type int"),
    ("train.resume=maybe", "must be a boolean"),
    ("loss.kind=kl", "loss.kind must be one of"),
    ("loss.beta=2", "loss.beta must be in [0, 1]"),
    ("deepspeed.zero_stage=4", "zero_stage must be 0-3"),
    ("loss.beta", "must look like section.key=value"),
    ("model.source=path", "model.path"),
])
def test_bad_values(override, fragment):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert fragment in str(exc.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/x.yaml")


def test_shipped_configs_parse():
    import glob
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "examples", "configs")
    files = glob.glob(os.path.join(root, "*.yaml"))
    assert files
    for f in files:
        assert isinstance(load_config(f), Config)


def test_every_rule_section_runs():
    """A new `*_rules` function in opdx/config_checks.py only checks anything once it is in SECTION_RULES."""
    import inspect

    from opdx import config_checks

    sections = {name for name, fn in inspect.getmembers(config_checks, inspect.isfunction) if name.endswith("_rules")}
    assert sections == {fn.__name__ for fn in config_checks.SECTION_RULES}


def test_first_broken_rule_is_reported():
    """Rules run section by section in order: with two bad loss values the first one's message comes back."""
    with pytest.raises(ConfigError, match=r"^loss.beta must be in \[0, 1\], got 2.0$"):
        load_config(None, ["loss.beta=2", "loss.lmbda=-1"])
    with pytest.raises(ConfigError, match=r"^loss.lmbda must be in \[0, 1\], got -1.0$"):
        load_config(None, ["loss.lmbda=-1", "train.max_steps=-1"])


def test_opd_is_keys_defaults_and_types():
    loss = load_config().loss
    assert loss.kl_coef == 1.0 and loss.discount == 0.0 and loss.is_clip is None
    cfg = load_config(None, ["loss.kl_coef=2", "loss.discount=0.9", "loss.is_clip=0.2"])
    assert cfg.loss.kl_coef == 2.0 and isinstance(cfg.loss.kl_coef, float)
    assert cfg.loss.discount == 0.9 and cfg.loss.is_clip == 0.2 and isinstance(cfg.loss.is_clip, float)
    assert load_config(None, ["loss.is_clip=1"]).loss.is_clip == 1.0
    assert isinstance(load_config(None, ["loss.is_clip=1"]).loss.is_clip, float)


@pytest.mark.parametrize("text", ["null", "none", "None", "~", ""])
def test_optional_float_accepts_null_spellings(text):
    assert load_config(None, ["loss.is_clip=0.3", f"loss.is_clip={text}"]).loss.is_clip is None


def test_optional_float_from_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("loss:\n  is_clip: 0.25\n")
    assert load_config(str(p)).loss.is_clip == 0.25
    p.write_text("loss:\n  is_clip: ~\n")
    assert load_config(str(p), []).loss.is_clip is None
    p.write_text("loss:\n  is_clip: null\n")
    assert load_config(str(p), ["loss.is_clip=0.1"]).loss.is_clip == 0.1


@pytest.mark.parametrize("override,fragment", [
    ("loss.is_clip=abc", "loss.is_clip must be of type float or null"),
    ("loss.is_clip=true", "loss.is_clip must be of type float or null"),
    ("loss.kl_coef=-0.5", "loss.kl_coef must be >= 0"),
    ("loss.kl_coef=.nan", "loss.kl_coef must be >= 0"),
    ("loss.discount=1.5", "loss.discount must be in [0, 1]"),
    ("loss.discount=-0.1", "loss.discount must be in [0, 1]"),
    ("loss.is_clip=0", "loss.is_clip must be > 0"),
    ("loss.is_clip=-0.2", "loss.is_clip must be > 0"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens must be >= 1"),
    ("eval.max_new_tokens=-1", "eval.max_new_tokens must be >= 1, or 0"),
])
def test_opd_is_and_generation_length_errors(override, fragment):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert fragment in str(exc.value)


def test_opd_is_and_generation_length_edges_are_valid():
    cfg = load_config(None, ["loss.kl_coef=0", "loss.discount=1", "eval.max_new_tokens=0", "rollout.max_new_tokens=1"])
    assert cfg.loss.kl_coef == 0.0 and cfg.loss.discount == 1.0 and cfg.eval.max_new_tokens == 0


def test_nested_section_from_yaml_and_dotted_overrides(tmp_path):
    """log.completions is a section inside log: YAML nesting and three-part dotted keys both reach it."""
    p = tmp_path / "c.yaml"
    p.write_text("log:\n  progress: false\n  completions:\n    every: 10\n    num: 2\n"
                 "eval:\n  metrics: [exact_match, 'five=regex:is (\\d+)']\n")
    cfg = load_config(str(p))
    assert (cfg.log.progress, cfg.log.completions.every, cfg.log.completions.num) == (False, 10, 2)
    assert cfg.eval.metrics == ["exact_match", r"five=regex:is (\d+)"]
    cfg = load_config(str(p), ["log.completions.num=5", "eval.metrics=[exact_match]"])
    assert (cfg.log.completions.every, cfg.log.completions.num, cfg.eval.metrics) == (10, 5, ["exact_match"])
    assert "log.completions.num" in all_keys() and cfg.to_dict()["log"]["completions"] == {"every": 10, "num": 5}
    defaults = load_config()
    assert (defaults.log.completions.every, defaults.log.completions.num) == (0, 3)
    assert defaults.eval.metrics == ["exact_match"]


@pytest.mark.parametrize("override,fragment", [
    ("log.completions.num=-1", "log.completions.num must be >= 0"),
    ("log.completions.every=-3", "log.completions.every must be >= 0"),
    ("log.completions.num=two", "log.completions.num must be of type int"),
    ("log.completions=3", "log.completions is a section: set its keys, e.g. log.completions.every="),
    ("log.completion.num=3", "did you mean 'log.completions.num'"),
    ("log.completions.num.x=3", "unknown config key 'log.completions.num.x'"),
    ("eval.metrics=[bogus]", "eval.metrics: unknown metric spec 'bogus'"),
    ("eval.metrics=['regex:no group']", "has no capture group"),
    ("eval.metrics=[python:opdx_no_such_module:f]", "cannot import module 'opdx_no_such_module'"),
    ("eval.metrics=[exact_match, exact_match]", "duplicate metric name"),
    ('eval.metrics=["a\\d"]', "is not a YAML list"),
])
def test_bad_completions_and_metrics_values(override, fragment):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert fragment in str(exc.value)
