"""The CLI is declared once: each option is a field of a typed record (config.Config, options.py) and its flag,
type, bounds and help come from that field; the commands are short; `--help` imports no heavy library."""

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from lmtune import cli, config, options

CLI = Path(cli.__file__)
COMMANDS = {  # each command and the records whose fields are its flags
    "finetune": (cli.finetune, [config.Config, options.Launch]),
    "prepare": (cli.prepare, [options.Preparing]),
    "generate": (cli.generate, [options.Generation, options.Sampling]),
    "eval": (cli.eval_, [options.Scoring, options.Answering]),
    "data show": (cli.data_show, [options.Showing]),
}


def test_cli_is_at_most_400_lines_and_no_function_over_40():
    source = CLI.read_text()
    assert len(source.splitlines()) <= 400
    long = {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 40
    }
    assert not long, f"functions over 40 lines in cli.py: {long}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_of_a_commands_records_is_its_flag_with_the_fields_help(command):
    function, records = COMMANDS[command]
    params = inspect.signature(function).parameters
    for record in records:
        for key, field in record.model_fields.items():
            assert key in params, f"{record.__name__}.{key} is no flag of `lmtune {command}`"
            option = params[key].annotation.__metadata__[0]
            assert field.description and option.help.startswith(field.description), (
                f"--{key}: help is not its docstring"
            )
            assert f"--{key.replace('_', '-')}" in option.default.split("/")[0]  # the flag is the key's name


def test_bounds_and_defaults_come_from_the_record(cli):
    r = cli("generate", "--help")
    assert r.code == 0 and "[x>=1]" in r.out and "[default: 50]" in r.out  # max_new_tokens: Field(50, ge=1)
    r = cli("generate", "hi", "--top-p", "1.5")
    assert r.code == 2 and "--top-p" in r.err and "less than or equal to 1" in r.err  # le=1.0, checked while parsing
    r = cli("generate", "hi", "--dtype", "float8")
    assert r.code == 1 and "--dtype float8: choose float32, bfloat16, float16 or auto" in r.err


def test_a_run_config_flag_left_out_leaves_the_recipes_value(tmp_path):
    # Config's flags are None when not given, so that defaults < recipe < flags < key=value holds.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.003\nbatch_size: 3\n")
    flags = {name: p.default for name, p in inspect.signature(cli.finetune).parameters.items() if name != "args"}
    flags.update(recipe=str(recipe), batch_size=5)
    cfg, how = cli.run_config(["lr=0.004"], flags)
    assert (cfg.lr, cfg.batch_size, how["resume"]) == (0.004, 5, False)
    cfg, _ = cli.run_config([], flags)
    assert cfg.lr == 0.003


def test_a_run_flags_help_adds_the_choices_and_default_its_docstring_leaves_out():
    assert config.help_for("schedule").endswith("One of: cosine, linear, constant. Default: cosine.")
    assert config.help_for("packing").endswith("Default: on.")
    assert "Default: 5e-05" not in config.help_for("lr")  # its docstring says the default itself
    assert "One of: paragraph, line, file." in config.help_for("txt_documents")  # its docstring names no choice


def test_records_hold_no_field_twice_within_a_command():
    for command, (_, records) in COMMANDS.items():
        keys = [key for record in records for key in record.model_fields]
        assert len(keys) == len(set(keys)), f"`lmtune {command}` would declare a flag twice"


def test_every_record_is_declared_in_options_with_docstrings():
    records = [
        v for v in vars(options).values() if isinstance(v, type) and issubclass(v, BaseModel) and v is not BaseModel
    ]
    assert records and all(v.__module__ == "lmtune.options" for v in records)
    for record in records:
        for key, field in record.model_fields.items():
            assert field.description, f"{record.__name__}.{key} has no docstring, so its flag would have no help"


def test_help_imports_no_heavy_library():
    code = (
        "import sys; from lmtune.cli import main\n"
        "try: main(['finetune', '--help'])\nexcept SystemExit: pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'accelerate', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
