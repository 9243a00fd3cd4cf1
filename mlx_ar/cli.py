"""The `mlx-ar` command line: one click group whose subcommands load lazily.

Each subcommand lives in its own module and is imported only when it runs (or when --help
lists it), and those modules import mlx, torch, pyarrow and git only inside their functions,
so `mlx-ar --help` stays fast and works without any backend installed.
"""
import importlib

import click

# name -> "module:attribute" of a click.Command
COMMANDS = {
    "prepare": "mlx_ar.data.prepare:prepare_command",
    "train": "mlx_ar.harness.cli:train_command",
    "bench": "mlx_ar.bench:bench_command",
    "run": "mlx_ar.ledger.cli:run_command",
    "noise": "mlx_ar.ledger.cli:noise_command",
    "results": "mlx_ar.ledger.cli:results_command",
    "workers": "mlx_ar.ledger.cli:workers_command",
    "compare": "mlx_ar.compare.cli:compare_command",
    "transplant": "mlx_ar.compare.cli:transplant_command",
    "plot": "mlx_ar.compare.cli:plot_command",
    "doctor": "mlx_ar.doctor:doctor_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-autoresearch")
def main():
    """Autonomous training-recipe research: edit train.py, train 5 minutes, keep what wins."""


if __name__ == "__main__":
    main()
