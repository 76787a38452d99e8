"""The typed config: precedence, errors with suggestions, and every shipped recipe."""

import pytest
import yaml

from lmtune import config
from lmtune.errors import LmtuneError


def test_precedence_defaults_then_recipe_then_flags_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1.0e-3\nbatch_size: 4\nepochs: 3\n")
    cfg = config.build(str(recipe), {"batch_size": 2, "epochs": None}, ["epochs=5", "seed=7"])
    assert cfg.lr == 1e-3  # recipe over default
    assert cfg.batch_size == 2  # flag over recipe
    assert cfg.epochs == 5  # override over recipe (an unset flag does not count)
    assert cfg.seed == 7
    assert cfg.weight_decay == config.Config().weight_decay  # untouched default


def test_override_values_read_as_yaml():
    cfg = config.build(None, {}, ["lr=2e-5", "from_scratch=true", "max_steps=null", "block-size=64"])
    assert cfg.lr == 2e-5 and cfg.from_scratch is True and cfg.max_steps is None and cfg.block_size == 64


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lrr=1"], "unknown config key `lrr`; did you mean `lr`?"),
        (["batchsize=2"], "did you mean `batch_size`?"),
        (["nonsense"], "write it as key=value"),
    ],
)
def test_bad_overrides(overrides, message):
    with pytest.raises(LmtuneError, match=message.replace("?", r"\?").replace("`", "`")):
        config.build(None, {}, overrides)


def test_every_problem_reported_at_once():
    with pytest.raises(LmtuneError) as err:
        config.build(None, {}, ["lr=-1", "batch_size=0", "mixed_precision=fp8"])
    msg = str(err.value)
    assert "lr:" in msg and "batch_size:" in msg and "mixed_precision:" in msg


def test_unknown_key_in_recipe_suggests(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 1e-3\nbatchsize: 2\n")
    with pytest.raises(LmtuneError, match="unknown config key `batchsize`; did you mean `batch_size`"):
        config.build(str(recipe))


def test_recipe_cannot_run_code(tmp_path):
    recipe = tmp_path / "evil.yaml"
    recipe.write_text("lr: !!python/object/apply:os.system ['echo pwned > pwned.txt']\n")
    with pytest.raises(LmtuneError, match="could not be read safely"):
        config.build(str(recipe))
    assert not (tmp_path / "pwned.txt").exists()


def test_shape_must_divide():
    with pytest.raises(LmtuneError, match="multiple of n_head"):
        config.build(None, {"n_embd": 30, "n_head": 4})


def test_resolved_config_round_trips_as_a_recipe(tmp_path):
    cfg = config.build(None, {"lr": 3e-4, "data": "x.txt", "output": "somewhere"})
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    again = config.build(str(path), {"output": "somewhere"})
    assert again == cfg


SHIPPED = config.list_recipes()


def test_the_promised_recipes_ship():
    assert {"gpt2-wikitext2", "scratch-wikitext2", "tiny-cpu", "tiny-scratch"} <= set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_recipe_loads_and_documents_itself(name):
    path = SHIPPED[name]
    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any("Run:" in line and "lmtune " in line for line in header), "header must give the command"
    assert any("Expect:" in line for line in header), "header must say what to expect"
    values = yaml.safe_load(text)
    cfg = config.build(name)
    # Only keys that differ from the defaults.
    defaults = config.Config()
    for key, value in values.items():
        assert getattr(defaults, key) != value, f"{name}: {key} repeats the default"
        assert getattr(cfg, key) == value


@pytest.mark.parametrize(
    "override",
    ["lr=inf", "lr=.inf", "lr=nan", "warmup_ratio=nan", "weight_decay=inf", "weight_decay=.inf",
     "max_grad_norm=inf", "dropout=nan", "lora_dropout=nan", "validation_percent=nan", "validation_percent=-.inf"],
)  # fmt: skip
def test_non_finite_numbers_are_refused(override):
    key = override.partition("=")[0]
    with pytest.raises(LmtuneError, match=rf"^bad configuration: {key}: Input should be a finite number"):
        config.build(None, {}, [override])


def test_non_finite_numbers_in_a_recipe_or_a_flag_are_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: .inf\nmax_grad_norm: .nan\n")
    with pytest.raises(LmtuneError, match=f"in {recipe}: lr: .*finite.*; max_grad_norm: .*finite"):
        config.build(str(recipe))
    with pytest.raises(LmtuneError, match="weight_decay: Input should be a finite number"):
        config.build(None, {"weight_decay": float("inf")})


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_seed_must_be_what_numpy_and_torch_accept(seed):
    with pytest.raises(LmtuneError, match=r"^bad configuration: seed: Input should be"):
        config.build(None, {}, [f"seed={seed}"])
    assert config.build(None, {}, ["seed=0"]).seed == 0
    assert config.build(None, {}, ["seed=4294967295"]).seed == 2**32 - 1


@pytest.mark.parametrize(
    "content",
    [b"\x7fELF\x02\x01\x01\x00\xff\xfe\x00\x00", bytes(range(256)) * 4, bytes(64)],
    ids=["elf", "bytes", "zeros"],
)
def test_a_binary_recipe_is_refused_in_one_line(tmp_path, content):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(content)
    with pytest.raises(LmtuneError, match=f"^cannot read recipe {recipe}: not a text file"):
        config.build(str(recipe))


def test_every_config_key_says_whether_it_may_change_on_resume():
    """A new key must be classified: resuming with it changed either is refused (must match) or is not."""
    from lmtune.config import RESUME_MAY_CHANGE, RESUME_MUST_MATCH, Config

    must, may = set(RESUME_MUST_MATCH), set(RESUME_MAY_CHANGE)
    assert not must & may, must & may
    assert must | may == set(Config.model_fields), set(Config.model_fields) ^ (must | may)
